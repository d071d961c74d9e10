"""Unlearning loop: hand-checkable behaviour on a one-layer, 16-wide GPT-2 (runs in a few seconds)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from forgetlab.config import load_params
from forgetlab.forget_sets import IGNORE
from forgetlab.models import build_model, model_config
from forgetlab.scoring import token_logprob_loss
from forgetlab.unlearning import UnlearnSettings, Unlearner, forget_batch_tensors, unlearning_loss

VOCAB, BOS = 64, 0
rng = np.random.default_rng(0)
# five text-like examples (scored from 1) and one canary whose last 3 tokens are its secret
FORGET = [[BOS] + rng.integers(1, VOCAB, size=9).tolist() for _ in range(5)] + [[BOS, 7, 8, 9, 10, 3, 1, 4]]
STARTS = [1] * 5 + [5]
RETAIN = rng.integers(1, VOCAB, size=(20, 12)).astype(np.int64)


def settings(**kw) -> UnlearnSettings:
    base = dict(method="ga", lr=1e-2, steps=7, batch=2, optimizer="adam", grad_clip=1.0, record_every=1,
                retain_weight=1.0, npo_beta=0.5, seed=3)
    return UnlearnSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_state() -> dict:
    """A tiny model trained briefly on the forget set, so there is something to unlearn."""
    torch.manual_seed(0)
    model = build_model(model_config(VOCAB, n_layer=1, n_head=2, d_model=16, block_size=32, bos=BOS), seed=0)
    ids, labels = forget_batch_tensors(FORGET, STARTS, BOS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(30):
        loss = token_logprob_loss(model, ids, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def fresh(trained_state):
    def make():
        model = build_model(model_config(VOCAB, n_layer=1, n_head=2, d_model=16, block_size=32, bos=BOS), seed=1)
        model.load_state_dict(trained_state)
        return model
    return make


def forget_nll(model) -> float:
    ids, labels = forget_batch_tensors(FORGET, STARTS, BOS)
    with torch.no_grad():
        return float(token_logprob_loss(model, ids, labels).mean())


def evaluate(model, step):
    return [{"metric": "forget_nll", "value": forget_nll(model)}]


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# ---- batches and losses ---------------------------------------------------------------------------

def test_labels_mask_everything_before_score_start():
    ids, labels = forget_batch_tensors([[0, 5, 6, 7], [0, 8, 9]], [2, 1], pad_id=0)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 8, 9, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 6, 7], [IGNORE, 8, 9, IGNORE]]
    with pytest.raises(ValueError, match="score_start must be >= 1"):
        forget_batch_tensors([[0, 5]], [0], 0)
    with pytest.raises(ValueError, match="at least one scored token"):
        forget_batch_tensors([[0, 5]], [2], 0)
    with pytest.raises(ValueError, match="one per sequence"):
        forget_batch_tensors([[0, 5]], [1, 1], 0)


def test_ga_loss_covers_only_the_secret_digits(fresh):
    model = fresh()
    ids, labels = forget_batch_tensors(FORGET[-1:], STARTS[-1:], BOS)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        by_hand = -np.mean([logp[t - 1, FORGET[-1][t]].item() for t in (5, 6, 7)])   # digits 3, 1, 4
        assert unlearning_loss(model, "ga", ids, labels).item() == pytest.approx(-by_hand, rel=1e-5)


def test_npo_loss_by_hand(fresh):
    model = fresh()
    ids, labels = forget_batch_tensors(FORGET[:3], STARTS[:3], BOS)
    with torch.no_grad():
        n = (labels[:, 1:] != IGNORE).sum(1)
        lp = -token_logprob_loss(model, ids, labels) * n
        # ref one nat above the current log-prob: delta = -1, loss = -(2/b) logsigmoid(b)
        loss = unlearning_loss(model, "npo", ids, labels, ref_seq_logp=lp + 1, beta=0.5)
    assert loss.item() == pytest.approx(-(2 / 0.5) * np.log(1 / (1 + np.exp(-0.5))), rel=1e-5)
    with pytest.raises(ValueError, match="ref_seq_logp"):
        unlearning_loss(model, "npo", ids, labels)


def test_npo_gradient_at_start_is_the_summed_logprob_gradient(fresh):
    """At theta = ref: d/dtheta -(2/b) logsigmoid(-b (lp - lp_ref)) = (2/b) sigmoid(0) b d lp = d lp."""
    model = fresh()
    u = Unlearner(model, FORGET, STARTS, settings(method="npo", npo_beta=0.3), BOS)
    ids, labels = u.forget_ids, u.forget_labels
    unlearning_loss(model, "npo", ids, labels, ref_seq_logp=u.ref_seq_logp, beta=0.3).backward()
    npo_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # the mean over examples of the summed log-prob of the scored tokens, written out by hand
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    target = labels[:, 1:]
    tok = logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1) * (target != IGNORE)
    tok.sum(1).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(npo_grad[n], p.grad, rtol=1e-4, atol=1e-6)


def _one_step(fresh, **kw) -> dict:
    """Weight change of one step on the five text rows (9 scored tokens each), the whole set in one batch."""
    model = fresh()
    before = weights(model)
    Unlearner(model, FORGET[:5], STARTS[:5], settings(batch=5, **kw), BOS).run(1, lambda m, s: [])
    return {n: p - before[n] for n, p in weights(model).items()}


def test_npo_first_step_differs_from_ga_only_by_scale_which_adam_and_clipping_remove(fresh):
    """At step 0 every NPO weight is 1, so NPO's gradient is GA's times the 9 scored tokens (sum vs mean). Plain SGD
    shows that factor; a binding clip, or Adam (whose first step is lr * g / |g| per coordinate), removes it."""
    plain = {"optimizer": "sgd", "grad_clip": 0.0, "lr": 0.1}        # steps far above float32 rounding
    ga, npo = _one_step(fresh, **plain), _one_step(fresh, method="npo", **plain)
    for n in ga:
        torch.testing.assert_close(npo[n], 9.0 * ga[n], rtol=1e-3, atol=1e-6)
    # relative size of the difference of the two updates: clipped SGD equal up to float32 rounding; Adam up to its
    # eps (1e-8), which still counts on coordinates of this tiny model whose gradient is near 1e-7
    for kw, tol in (({"optimizer": "sgd", "grad_clip": 1e-3, "lr": 100.0}, 1e-4),
                    ({"optimizer": "adam", "grad_clip": 0.0}, 2e-2)):
        ga, npo = _one_step(fresh, **kw), _one_step(fresh, method="npo", **kw)
        diff = torch.sqrt(sum(((npo[n] - ga[n]) ** 2).sum() for n in ga))
        assert diff / torch.sqrt(sum((ga[n] ** 2).sum() for n in ga)) < tol


def test_npo_departs_from_ga_only_through_its_weights(fresh):
    """Under Adam (blind to a constant scale, here unclipped), NPO with a vanishing beta (every weight stays 1: its
    gradient is 9 times GA's at every step) follows GA's trajectory; with a large beta the weights of examples
    already pushed down fade and the trajectory departs."""
    w0 = weights(fresh())

    def run(method, beta):
        model = fresh()
        Unlearner(model, FORGET[:5], STARTS[:5], settings(method=method, npo_beta=beta, batch=5, lr=3e-2, grad_clip=0.0),
                  BOS).run(6, lambda m, s: [])
        return weights(model)
    ga, flat, sharp = run("ga", 0.5), run("npo", 1e-6), run("npo", 5.0)
    moved = torch.sqrt(sum(((ga[n] - w0[n]) ** 2).sum() for n in ga))

    def gap(w) -> float:            # distance to GA's weights relative to how far GA moved
        return float(torch.sqrt(sum(((w[n] - ga[n]) ** 2).sum() for n in ga)) / moved)
    assert gap(flat) < 0.1 and gap(sharp) > 0.5     # measured: 0.05 (Adam's eps, as above) and 0.85


# ---- the loop ------------------------------------------------------------------------------------

def test_ga_raises_the_forget_loss(fresh):
    model = fresh()
    u = Unlearner(model, FORGET, STARTS, settings(batch=8, steps=5), BOS)   # batch >= set: whole set each step
    recs = u.run(5, evaluate)
    nll = {r["step"]: r["value"] for r in recs}
    assert nll[5] > nll[0] + 0.1
    # the training loss at step 0 is -(mean NLL of the whole forget set) at the start weights
    assert u.losses[0] == (0, pytest.approx(-nll[0], rel=1e-5))
    assert [s for s, _ in u.losses] == [0, 1, 2, 3, 4]
    assert u.losses[-1][1] < u.losses[0][1]


def test_graddiff_with_zero_retain_weight_is_ga(fresh):
    runs = {}
    for method in ("ga", "graddiff"):
        model = fresh()
        u = Unlearner(model, FORGET, STARTS, settings(method=method, retain_weight=0.0), BOS, retain_rows=RETAIN)
        u.run(5, lambda m, s: [])
        runs[method] = (u.losses, weights(model))
    assert runs["ga"][0] == runs["graddiff"][0]
    assert_same_weights(runs["ga"][1], runs["graddiff"][1])


def test_graddiff_needs_retain_rows(fresh):
    with pytest.raises(ValueError, match="needs retain rows: pass retain_rows"):
        Unlearner(fresh(), FORGET, STARTS, settings(method="graddiff"), BOS)
    with pytest.raises(ValueError, match="2-D integer array"):
        Unlearner(fresh(), FORGET, STARTS, settings(method="graddiff"), BOS, retain_rows=RETAIN[0])


def test_evaluate_at_step_zero_every_kth_and_last(fresh):
    seen = []

    def spy(model, step):
        seen.append((step, model.training))
        return [{"metric": "x", "value": 1.0}, {"metric": "y", "value": 2.0, "step": -5}]

    model = fresh()
    u = Unlearner(model, FORGET, STARTS, settings(record_every=3), BOS)
    recs = u.run(7, spy)
    assert [s for s, _ in seen] == [0, 3, 6, 7]
    assert not any(training for _, training in seen) and model.training     # eval() while evaluating only
    assert [r["step"] for r in recs if r["metric"] == "x"] == [0, 3, 6, 7]
    assert {r["step"] for r in recs if r["metric"] == "y"} == {-5}           # an existing 'step' is kept
    assert len(u.losses) == 7
    assert u.run(2, spy) and [s for s, _ in seen][4:] == [9]                 # no second step-0 evaluation


def test_grad_clip_bounds_the_update(fresh):
    model = fresh()
    before = weights(model)
    u = Unlearner(model, FORGET, STARTS, settings(optimizer="sgd", lr=1.0, grad_clip=1e-3), BOS)
    u.run(1, lambda m, s: [])
    change = torch.sqrt(sum(((p - before[n]) ** 2).sum() for n, p in weights(model).items()))
    assert change.item() == pytest.approx(1e-3, rel=1e-3)      # SGD step = lr * clipped gradient


@pytest.mark.parametrize("method", ["ga", "graddiff", "npo"])
def test_run_in_pieces_equals_one_run_and_is_deterministic(fresh, method):
    out = []
    for pieces in ([7], [3, 4], [3, 4]):
        model = fresh()
        u = Unlearner(model, FORGET, STARTS, settings(method=method, record_every=3), BOS, retain_rows=RETAIN)
        recs = sum((u.run(n, evaluate) for n in pieces), [])
        out.append((recs, u.losses, weights(model)))
    for recs, losses, w in out[1:]:
        assert recs == out[0][0] and losses == out[0][1]
        assert_same_weights(w, out[0][2])
    assert sorted({r["step"] for r in out[0][0]}) == [0, 3, 6, 7]


def test_gradient_norm_before_clipping_is_recorded(fresh):
    """grad_norm is the pre-clipping norm of the step that led to the record; clip_fraction is 1 where clipping
    bound at that step."""
    model = fresh()
    u = Unlearner(model, FORGET, STARTS, settings(optimizer="sgd", lr=1e-12, grad_clip=1e-6, record_every=2), BOS)
    recs = u.run(4, lambda m, s: [])
    assert [r["step"] for r in recs] == [2, 2, 4, 4]                       # nothing to report at step 0
    norms = {(r["step"], r["metric"]): r["value"] for r in recs}
    assert norms[(2, "clip_fraction")] == 1.0 and norms[(2, "grad_norm")] > 1e-3
    assert norms[(2, "grad_norm")] == u.grad_norms[1] and norms[(4, "grad_norm")] == u.grad_norms[3]
    # a negligible lr leaves the weights (almost) alone, so the pre-clipping norm equals the plain gradient norm of the same batch
    unclipped = Unlearner(fresh(), FORGET, STARTS, settings(optimizer="sgd", lr=1e-12, grad_clip=0.0), BOS)
    plain = unclipped.run(1, lambda m, s: [])
    assert plain[1] == {"step": 1, "uid": "", "role": "model", "metric": "clip_fraction", "value": 0.0}
    assert plain[0]["value"] == pytest.approx(u.grad_norms[0], rel=1e-5)


@pytest.mark.parametrize("method,optimizer", [("ga", "adam"), ("graddiff", "sgd"), ("npo", "adam")])
def test_save_restore_mid_trajectory(fresh, tmp_path, method, optimizer):
    s = settings(method=method, optimizer=optimizer, record_every=2)
    whole = fresh()
    u = Unlearner(whole, FORGET, STARTS, s, BOS, retain_rows=RETAIN)
    u.run(7, evaluate)

    first = Unlearner(fresh(), FORGET, STARTS, s, BOS, retain_rows=RETAIN)
    first.run(2, evaluate)       # 2 steps x batch 2 of 6: the saved permutation is part-used
    assert len(first.queue) == 2
    save_file(first.state_tensors(), tmp_path / "traj.safetensors")
    # restore into a model with other weights: everything must come from the file
    other = build_model(model_config(VOCAB, n_layer=1, n_head=2, d_model=16, block_size=32, bos=BOS), seed=9)
    second = Unlearner(other, FORGET, STARTS, s, BOS, retain_rows=RETAIN)
    second.load_state_tensors(load_file(tmp_path / "traj.safetensors"))
    recs = second.run(5, evaluate)
    assert sorted({r["step"] for r in recs}) == [4, 6, 7]
    assert second.grad_norms == u.grad_norms             # the norms survive the save too
    assert second.losses == u.losses
    assert_same_weights(weights(other), weights(whole))

    elsewhere = Unlearner(fresh(), FORGET, STARTS, settings(method=method, optimizer=optimizer, lr=0.5), BOS,
                          retain_rows=RETAIN)
    with pytest.raises(ValueError, match="other settings"):
        elsewhere.load_state_tensors(first.state_tensors())


# ---- settings ------------------------------------------------------------------------------------

def test_settings_from_params():
    p = load_params("smoke")
    s = UnlearnSettings.from_params(p, "npo")
    assert (s.method, s.lr, s.steps, s.batch, s.npo_beta) == ("npo", p["unlearn_lr"], p["unlearn_steps"],
                                                              p["unlearn_batch"], p["npo_beta"])


@pytest.mark.parametrize("field,value,text", [
    ("method", "gd", "method = 'gd' is unknown: use one of ga, graddiff, npo"),
    ("optimizer", "adamw", "use one of adam, sgd"),
    ("steps", 0, "steps = 0 is invalid: it must be an integer >= 1"),
    ("lr", 0.0, "lr = 0.0 is invalid: it must be a number > 0"),
    ("lr", -1, "parameter unlearn_lr"),
    ("batch", 0, "parameter unlearn_batch"),
    ("grad_clip", -1.0, "0 disables clipping"),
    ("record_every", 0, "record_every = 0"),
    ("retain_weight", -0.5, "retain_weight = -0.5"),
    ("npo_beta", 0, "npo_beta = 0 is invalid"),
    ("steps", 2.5, "integer"),
])
def test_bad_settings_are_explained(field, value, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")):
        settings(**{field: value})
