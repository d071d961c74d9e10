"""Metrics on hand-computed cases, and the model-level helpers against direct computations (tiny GPT-2)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from transformers import GPT2Config, GPT2LMHeadModel

from forgetlab import backend_tiny, canaries as canary_scoring, metrics
from forgetlab.forget_sets import StudyData, canary_ids, canary_prefix_ids
from forgetlab.models import bos_id, encode, train_tokenizer
from forgetlab.scoring import mean_token_loss, sequence_logprobs

LN2 = math.log(2)


# ------------------------------------------------------------------------------------------ pure

def test_log_mean_exp_extremes():
    assert metrics.log_mean_exp(np.array([1000.0, 1000.0])) == pytest.approx(1000.0)
    assert metrics.log_mean_exp(np.array([-1e4, -np.inf])) == pytest.approx(-1e4 - LN2)
    assert metrics.log_mean_exp(np.array([1e4, -1e4])) == pytest.approx(1e4 - LN2)
    assert metrics.log_mean_exp(np.array([-np.inf, -np.inf])) == -np.inf
    # log of the mean of 1/2 and 1/4 is log(3/8)
    assert metrics.log_mean_exp(np.log([0.5, 0.25])) == pytest.approx(math.log(3 / 8))
    x = np.array([[0.0, 1e4], [math.log(3), 1e4]])
    np.testing.assert_allclose(metrics.log_mean_exp(x, axis=0), [math.log(2), 1e4])
    np.testing.assert_allclose(metrics.log_mean_exp(x, axis=1), [1e4 - LN2, 1e4 - LN2])


def test_exposure_ranks_with_ties():
    cand = np.array([0.0, -1.0, -1.0, -2.0])          # |R| = 4: at most 2 bits
    assert metrics.exposure_from_logprobs(0.0, cand) == pytest.approx(2.0)    # the top candidate: log2|R|
    assert metrics.exposure_from_logprobs(-1.0, cand) == pytest.approx(1.0)   # rank 2 (tie in its favour)
    assert metrics.exposure_from_logprobs(-2.0, cand) == pytest.approx(0.0)   # the worst: rank 4
    assert metrics.exposure_rank(-1.0, cand) == 2
    # two candidates tied at the top both get the full log2|R|
    tied = np.array([0.0, 0.0, -3.0, -4.0])
    assert metrics.exposure_from_logprobs(0.0, tied) == pytest.approx(2.0)
    big = -np.arange(1024, dtype=float)
    assert metrics.exposure_from_logprobs(big[0], big) == pytest.approx(10.0)
    assert metrics.exposure_from_logprobs(big[7], big) == pytest.approx(10.0 - 3.0)   # rank 8
    assert metrics.exposure_from_logprobs(big[-1], big) == pytest.approx(0.0)
    # float noise between two scorings of the same sequence is not a rank change
    assert metrics.exposure_from_logprobs(-1e-7, cand) == pytest.approx(2.0)


def test_extrapolated_exposure_agrees_with_exact():
    rng = np.random.default_rng(0)
    nll = stats.skewnorm.rvs(4.0, loc=20.0, scale=3.0, size=10_000, random_state=rng)
    cand = -nll                                                    # the whole candidate set R
    sample = cand[rng.choice(cand.size, size=2000, replace=False)]
    for q in (0.5, 0.05, 0.01, 0.002):
        secret = -np.quantile(nll, q)
        exact = metrics.exposure_from_logprobs(secret, cand)
        assert exact == pytest.approx(-math.log2(q), abs=0.1)
        assert metrics.extrapolated_exposure(secret, sample) == pytest.approx(exact, abs=1.0)
    # vectorised over secrets, and finite far beyond the sample
    secrets = np.array([-np.quantile(nll, 0.5), 100.0])
    out = metrics.extrapolated_exposure(secrets, sample)
    assert out.shape == (2,) and np.all(np.isfinite(out)) and out[1] > 500
    assert math.isnan(metrics.extrapolated_exposure(0.0, np.ones(10)))     # no spread: no fit


def test_genex_bits():
    ll = np.log(np.array([[0.1, 0.2, 1e-300], [0.3, 0.05, 1e-290]]))
    np.testing.assert_allclose(metrics.genex_bits(ll, ll), 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics.genex_bits(ll + 3.0, ll), 3.0 / LN2)
    # p under two unlearned seeds 1/2 and 1/4 (mean 3/8), under one reference 1/8: log2 3 bits
    u = np.log([[0.5], [0.25]])
    r = np.log([[0.125]])
    np.testing.assert_allclose(metrics.genex_bits(u, r), [math.log2(3)])
    # extreme log-likelihoods (long sequences) stay finite
    np.testing.assert_allclose(metrics.genex_bits(np.full((3, 2), -5000.0), np.full((2, 2), -5001.0)), 1 / LN2)
    with pytest.raises(ValueError, match="reference examples"):
        metrics.genex_bits(np.zeros((2, 3)), np.zeros((2, 4)))


def test_relex_with_ties():
    pop = np.array([1.0, 2.0, 2.0, 3.0])
    assert metrics.relex_bits(2.0, pop) == pytest.approx(math.log2(5 / 4))   # 3 peers >= x (ties count against x)
    assert metrics.relex_bits(4.0, pop) == pytest.approx(math.log2(5))       # more likely than all
    assert metrics.relex_bits(0.0, pop) == pytest.approx(0.0)                # less likely than all
    assert metrics.relex_bits(3.0, pop) == pytest.approx(math.log2(5 / 2))
    out = metrics.relex_bits(np.array([2.0, 4.0, 0.0]), pop)
    np.testing.assert_allclose(out, [math.log2(5 / 4), math.log2(5), 0.0])
    assert isinstance(metrics.relex_bits(2.0, pop), float)


def test_membership_auc():
    assert metrics.membership_auc([3.0, 4.0], [1.0, 2.0]) == pytest.approx(1.0)
    assert metrics.membership_auc([1.0, 2.0], [3.0, 4.0]) == pytest.approx(0.0)
    assert metrics.membership_auc([1.0, 2.0], [1.0, 2.0]) == pytest.approx(0.5)
    # pairs (1,2) 0, (1,3) 0, (2,2) 1/2, (2,3) 0: 0.5 / 4
    assert metrics.membership_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.125)
    assert metrics.membership_auc([5.0], [5.0, 5.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert math.isnan(metrics.membership_auc([], [1.0]))


def test_steps_to_target():
    steps = np.array([0, 10, 20, 30])
    values = np.array([5.0, 3.0, 0.5, -1.0])
    assert metrics.steps_to_target(steps, values, 1.0) == 20
    assert metrics.steps_to_target(steps, values, 3.0) == 20        # strictly below
    assert metrics.steps_to_target(steps, values, 6.0) == 0
    assert math.isnan(metrics.steps_to_target(steps, values, -5.0))
    assert metrics.steps_to_target(steps, np.array([np.nan, 2.0, 0.0, 0.0]), 1.0) == 20
    assert metrics.steps_to_target(steps[::-1], values[::-1], 1.0) == 20   # step order, not array order


def test_rank_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert metrics.rank_correlation(x, x ** 3) == pytest.approx(1.0)
    assert metrics.rank_correlation(x, -x) == pytest.approx(-1.0)
    assert metrics.rank_correlation(x, [2.0, 1.0, 4.0, 3.0, 5.0]) == pytest.approx(0.8)
    assert metrics.rank_correlation([1.0, np.nan, 3.0, 4.0], [1.0, 9.0, 3.0, 4.0]) == pytest.approx(1.0)
    assert math.isnan(metrics.rank_correlation([1.0, 2.0], [1.0, 2.0]))
    assert math.isnan(metrics.rank_correlation(x, np.ones(5)))


def test_candidate_sequences_ordering():
    digit_ids = [100 + d for d in range(10)]
    seqs = canary_scoring.candidate_sequences([0, 5], digit_ids, 2)
    assert len(seqs) == 100
    assert seqs[0] == [0, 5, 100, 100]
    assert seqs[7] == [0, 5, 100, 107]
    assert seqs[42] == [0, 5, 104, 102]
    assert seqs[99] == [0, 5, 109, 109]
    assert canary_scoring.candidate_sequences([1], digit_ids, 1) == [[1, 100 + d] for d in range(10)]


# ------------------------------------------------------------------------------------ model-level

def _tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _manual_ll(model, ids: list[int], start: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_example_logprobs_matches_manual():
    model = _tiny_gpt2(64)
    rng = np.random.default_rng(1)
    rows = [[0] + rng.integers(1, 64, size=n).tolist() for n in (5, 12, 3, 9)]
    starts = [1, 4, 1, 9]
    ex = pd.DataFrame({"uid": list("abcd"), "ids": rows, "score_start": starts})
    got = metrics.example_logprobs(model, ex, batch_size=3)
    want = [_manual_ll(model, r, s) for r, s in zip(rows, starts)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got.shape == (4,) and np.all(got < 0)
    assert metrics.example_logprobs(model, ex.iloc[:0]).shape == (0,)


@pytest.fixture(scope="module")
def tiny_study():
    """A hand-built StudyData: a real (tiny) BPE, canaries with 2 digits, language/code/id populations."""
    texts = ["My secret number is 0123456789.\n", "Guten Tag, wie geht es dir?\n", "def f(x):\n    return x\n",
             "To be, or not to be, that is the question.\n"] * 3
    tok = train_tokenizer(texts, 300)
    bos = bos_id(tok)
    rows = []
    for role, secrets in (("forget", ["07", "42"]), ("control", ["93"])):
        for i, s in enumerate(secrets):
            ids = canary_ids(tok, s)
            start = len(canary_prefix_ids(tok))
            rows.append({"uid": f"canary-{role}-{i}", "kind": "canary", "role": role, "ids": ids,
                         "score_start": start, "n_scored": len(ids) - start, "secret": s})
    for kind, role, text in (("language", "population", "Guten Tag"), ("language", "population", "wie geht es"),
                             ("language", "forget", "es dir?"), ("code", "population", "def f(x):"),
                             ("code", "population", "return x"), ("id", "population", "To be, or not")):
        ids = [bos] + encode(tok, text)
        rows.append({"uid": f"{kind}-{role}-{len(rows)}", "kind": kind, "role": role, "ids": ids,
                     "score_start": 1, "n_scored": len(ids) - 1, "secret": ""})
    vocab = tok.get_vocab_size()
    rng = np.random.default_rng(2)
    data = StudyData(tok, pd.DataFrame(rows), rng.integers(0, vocab, size=(40, 16)),
                     rng.integers(0, vocab, size=(10, 16)), block_size=16, canary_digits=2, insertions=1,
                     background_insertions=1)
    return data, _tiny_gpt2(vocab, seed=3)


def test_canary_candidate_logprobs_match_sequence_scoring(tiny_study):
    data, model = tiny_study
    prefix = data.canary_prefix_ids()
    digit_ids = [data.tokenizer.token_to_id(str(d)) for d in range(10)]
    got = canary_scoring.candidate_logprobs_full(model, prefix, digit_ids, 2, batch_size=37)
    seqs = canary_scoring.candidate_sequences(prefix, digit_ids, 2)
    want = sequence_logprobs(model, seqs, [len(prefix)] * len(seqs))
    assert got.shape == (100,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # candidate 42 is the canary row "42" without its final "."
    row = data.examples[data.examples.secret == "42"].iloc[0]
    assert seqs[42] == list(row.ids)[: row.score_start + 2]


def test_canary_exposures_by_hand(tiny_study):
    data, model = tiny_study
    table = backend_tiny.canary_exposures(model, data, data.examples)     # non-canary rows are skipped
    assert list(table.columns) == ["uid", "exposure_bits", "rank"]
    canaries = data.examples[data.examples.kind == "canary"]
    assert table.uid.tolist() == canaries.uid.tolist()
    prefix = data.canary_prefix_ids()
    digit_ids = [data.tokenizer.token_to_id(str(d)) for d in range(10)]
    cand = np.array([_manual_ll(model, s, len(prefix)) for s in canary_scoring.candidate_sequences(prefix, digit_ids, 2)])
    for r, t in zip(canaries.itertuples(), table.itertuples()):
        own = cand[int(r.secret)]
        rank = 1 + int(np.sum(cand > own + 1e-5))
        assert t.rank == rank
        assert t.exposure_bits == pytest.approx(math.log2(100) - math.log2(rank))
    assert backend_tiny.canary_exposures(model, data, data.examples[data.examples.kind != "canary"]).empty


def test_exposure_of_most_likely_canary_is_log2_R(tiny_study):
    data, model = tiny_study
    prefix = data.canary_prefix_ids()
    digit_ids = [data.tokenizer.token_to_id(str(d)) for d in range(10)]
    cand = canary_scoring.candidate_logprobs_full(model, prefix, digit_ids, 2)
    best, worst = f"{int(np.argmax(cand)):02d}", f"{int(np.argmin(cand)):02d}"
    ex = pd.DataFrame({"uid": ["best", "worst"], "kind": "canary", "secret": [best, worst]})
    table = backend_tiny.canary_exposures(model, data, ex).set_index("uid")
    assert table.loc["best", "exposure_bits"] == pytest.approx(math.log2(100))
    assert table.loc["best", "rank"] == 1
    assert table.loc["worst", "exposure_bits"] == pytest.approx(0.0, abs=0.03)   # rank 100 (or 99 on a tie)


def test_utility_by_hand(tiny_study):
    data, model = tiny_study
    u = backend_tiny.utility(model, data, eval_rows=4)
    assert list(u) == ["heldout_ppl", "retain_loss", "loss_language", "loss_code"]
    assert u["heldout_ppl"] == pytest.approx(math.exp(mean_token_loss(model, data.heldout_rows[:4])))
    sample = metrics.seeded_rows(data.train_rows, 4)
    assert sample.shape == (4, 16)
    assert all(any((s == t).all() for t in data.train_rows) for s in sample)
    assert u["retain_loss"] == pytest.approx(mean_token_loss(model, sample))
    assert backend_tiny.utility(model, data, eval_rows=4) == u                  # the sample is fixed
    for kind in ("language", "code"):
        pop = data.examples[(data.examples.kind == kind) & (data.examples.role == "population")]
        total = sum(_manual_ll(model, list(r.ids), 1) for r in pop.itertuples())
        assert u[f"loss_{kind}"] == pytest.approx(-total / pop.n_scored.sum(), rel=1e-5)
    assert 1.0 < u["heldout_ppl"] and u["retain_loss"] > 0
