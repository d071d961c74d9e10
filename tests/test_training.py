import math

import numpy as np
import pytest
import torch

from forgetlab import base_models, experiment
from forgetlab.cache import ArtifactCache
from forgetlab.models import count_parameters, model_config, pick_device
from forgetlab.scoring import mean_token_loss, sequence_logprobs
from forgetlab.training import lr_at, train_lm


def test_lr_schedule_by_hand():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)


def test_parameter_count_counts_tied_weights_once():
    from transformers import GPT2LMHeadModel
    cfg = model_config(vocab_size=100, n_layer=1, n_head=2, d_model=16, block_size=32)
    m = GPT2LMHeadModel(cfg)
    by_hand = 100 * 16 + 32 * 16 + (16 * 48 + 48 + 16 * 16 + 16 + 16 * 64 + 64 + 64 * 16 + 16 + 4 * 16) + 2 * 16
    assert count_parameters(m) == by_hand


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pick_device("cuda")


REPLAY = 64           # replay rows of the fine-tuning tests (the small stream has a few hundred rows)


@pytest.fixture(scope="module")
def ft_params(small_params) -> dict:
    """The small study with models fine-tuned from a base (the shipped design), on a replay sample of 64 rows."""
    return dict(small_params, models_from="base", finetune_replay_rows=REPLAY, finetune_epochs=1.0)


@pytest.fixture(scope="module")
def scratch_params(small_params) -> dict:
    return dict(small_params, models_from="scratch")


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scratch_reproduces_the_models_of_before_bit_for_bit(scratch_params, small_data, session_cache):
    """models_from: scratch is the older design: weights and cache key exactly as before the base existed."""
    a = experiment.get_model(scratch_params, small_data, "original", 0, session_cache)
    held = a.curve[a.curve.split == "held-out"].loss.to_numpy()
    assert held[-1] < held[0] - 0.5
    # the older procedure, written out: a fresh model from the model's seed, trained on the stream plus its rows
    from forgetlab.forget_sets import training_rows
    from forgetlab.models import build_model
    ids, labels, _ = training_rows(small_data, include_forget=True)
    b = build_model(experiment.config_for(scratch_params, small_data), 0)
    train_lm(b, ids, labels, epochs=scratch_params["epochs"], batch_size=scratch_params["batch_size"],
             learning_rate=scratch_params["learning_rate"], warmup_steps=scratch_params["warmup_steps"], seed=0,
             device=torch.device("cpu"))
    assert same_weights(weights(a.model), weights(b))
    # ... and its cache key is the older one (no fine-tuning parameter in it), so older cached models load again
    from forgetlab.cache import cache_key, code_version
    from forgetlab.config import params_in
    older = {k: v for k, v in params_in(scratch_params, "model", "training").items()
             if k not in ("models_from", "finetune_epochs", "finetune_lr", "finetune_replay_rows")}
    assert experiment.model_key(scratch_params, small_data, "original", 0) == cache_key(
        "tiny-lm", code_version("models", "training"), older, small_data.fingerprint(), "original", 0)
    assert "base" not in experiment.get_models(scratch_params, small_data, session_cache)


def test_the_base_trains_on_the_stream_alone_and_lowers_its_loss(ft_params, small_data, session_cache):
    base = experiment.get_base(ft_params, small_data, session_cache)
    assert (base.role, base.seed) == ("base", ft_params["seed"])
    assert base.meta["train_rows"] == len(small_data.train_rows)                  # no inserted row at all
    assert base.meta["steps"] == math.ceil(ft_params["epochs"] * len(small_data.train_rows) / ft_params["batch_size"])
    held = base.curve[base.curve.split == "held-out"].loss.to_numpy()
    assert held[-1] < held[0] - 0.5
    # the same as a model of the older design trained from the run's seed on the stream alone
    from forgetlab.models import build_model
    b = build_model(experiment.config_for(ft_params, small_data), ft_params["seed"])
    train_lm(b, small_data.train_rows, small_data.train_rows, epochs=ft_params["epochs"],
             batch_size=ft_params["batch_size"], learning_rate=ft_params["learning_rate"],
             warmup_steps=ft_params["warmup_steps"], seed=ft_params["seed"], device=torch.device("cpu"))
    assert same_weights(weights(base.model), weights(b))


def test_originals_and_references_start_from_the_same_base(ft_params, small_data, session_cache, monkeypatch,
                                                            tmp_path):
    """Every fine-tuning starts from the base's weights (captured as they are handed over), and the base is
    left untouched by it."""
    base = experiment.get_base(ft_params, small_data, session_cache)
    before = weights(base.model)
    started, finetune = [], base_models.finetune

    def spy(p, start, *args, **kwargs):
        started.append(weights(start))
        return finetune(p, start, *args, **kwargs)

    monkeypatch.setattr(base_models, "finetune", spy)
    cache = ArtifactCache(tmp_path / "fresh")                                # nothing cached: every model is built
    models = experiment.get_models(dict(ft_params, original_seeds=[0, 10], reference_seeds=[1]), small_data, cache)
    assert len(started) == 3 and all(same_weights(w, before) for w in started)
    assert same_weights(weights(base.model), before)
    assert same_weights(weights(models["base"][0].model), before)
    # step 0 of every fine-tuning curve is the base's last held-out loss
    final = base.curve[base.curve.split == "held-out"].loss.iloc[-1]
    for m in models["original"] + models["reference"]:
        assert m.curve[m.curve.split == "held-out"].loss.iloc[0] == pytest.approx(final, abs=1e-6)
        assert m.meta["base"] == experiment.base_key(ft_params, small_data)
    # the seed only sets the order: two seeds differ, and the same seed is the same model
    a, b = (m.model for m in models["original"])
    assert not same_weights(weights(a), weights(b))
    again = experiment.get_model(ft_params, small_data, "original", 0, ArtifactCache(tmp_path / "again"))
    assert same_weights(weights(again.model), weights(a))


def test_originals_and_references_see_the_same_rows_and_steps(ft_params, small_data, session_cache):
    """Hand count (small study: 4 kinds x 3 forget examples x 20 insertions; 3 kinds with background, ID has none,
    x 4 examples x 5 insertions; 64 replay rows; batch 32, 1 epoch)."""
    assert small_data.reference_data == "twins"
    forget, background = 4 * 3 * 20, 3 * 4 * 5
    assert (forget, background) == (240, 60)
    rows = REPLAY + forget + background
    models = experiment.get_models(ft_params, small_data, session_cache)
    for m in models["original"] + models["reference"]:
        assert m.meta["finetune_rows"] == rows == 364
        assert (m.meta["replay_rows"], m.meta["inserted_rows"]) == (64, 300)
        assert m.meta["finetune_steps"] == math.ceil(364 / 32) == 12
        assert m.meta["train_rows"] == len(small_data.train_rows) + 364
    original, reference = models["original"][0], models["reference"][0]
    assert original.meta["finetune_tokens"] == reference.meta["finetune_tokens"]    # twins have the same lengths
    table = experiment.model_table(models)
    assert table.model.tolist()[0] == f"base (seed {ft_params['seed']})"
    assert table.set_index("role").loc[["original", "reference"], "finetune_steps"].tolist() == [12, 12]
    assert table.set_index("role").loc["base", ["finetune_rows", "finetune_steps"]].tolist() == [0, 0]
    curves = experiment.loss_curve_table(models)
    assert curves.groupby("stage").model.nunique().to_dict() == {"pretraining": 1, "fine-tuning": 2}


def test_the_fine_tuning_rows_are_the_replay_then_each_roles_inserted_rows(ft_params, small_data):
    from forgetlab.forget_sets import training_rows
    replay = base_models.replay_indices(len(small_data.train_rows), REPLAY, ft_params["seed"])
    n = len(small_data.train_rows)
    for role in ("original", "reference"):
        ids, labels, row_uid = base_models.finetune_rows(small_data, role, replay)
        full_ids, _, full_uid = training_rows(small_data, role)
        assert np.array_equal(ids[:REPLAY], small_data.train_rows[replay])
        assert np.array_equal(ids[REPLAY:], full_ids[n:]) and list(row_uid[REPLAY:]) == list(full_uid[n:])
        assert (row_uid[:REPLAY] == "").all() and (row_uid[REPLAY:] != "").all()
    _, _, uid_o = base_models.finetune_rows(small_data, "original", replay)
    _, _, uid_r = base_models.finetune_rows(small_data, "reference", replay)
    roles = small_data.examples.set_index("uid").role
    assert set(roles[uid_o[REPLAY:]]) == {"forget", "background"}
    assert set(roles[uid_r[REPLAY:]]) == {"twin", "background"}


def test_the_replay_rows_are_the_same_for_every_model(ft_params, small_data, session_cache):
    """The replay sample depends on the run's seed only: every model of a run replays the same rows."""
    a = base_models.replay_indices(1000, 50, seed=0)
    assert np.array_equal(a, base_models.replay_indices(1000, 50, seed=0))
    assert len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0) and a.max() < 1000
    assert not np.array_equal(a, base_models.replay_indices(1000, 50, seed=1))
    assert np.array_equal(base_models.replay_indices(40, 50, seed=0), np.arange(40))     # a short stream: all rows
    models = experiment.get_models(ft_params, small_data, session_cache)
    digests = {m.meta["replay_digest"] for m in models["original"] + models["reference"]}
    replay = base_models.replay_indices(len(small_data.train_rows), REPLAY, ft_params["seed"])
    assert digests == {base_models.rows_digest(small_data.train_rows[replay])}


def test_the_base_key_ignores_fine_tuning_and_the_forget_sets(ft_params, small_data):
    key = experiment.base_key(ft_params, small_data)
    assert experiment.model_key(ft_params, small_data, "base", 123) == key
    for change in ({"finetune_lr": 0.5}, {"finetune_replay_rows": 7}, {"finetune_epochs": 3.0},
                   {"models_from": "scratch"}):
        assert experiment.base_key(dict(ft_params, **change), small_data) == key
        assert (experiment.model_key(dict(ft_params, **change), small_data, "original", 0)
                != experiment.model_key(ft_params, small_data, "original", 0))
    assert experiment.base_key(dict(ft_params, seed=1), small_data) != key
    assert experiment.base_key(dict(ft_params, learning_rate=0.1), small_data) != key
    assert experiment.base_key(dict(ft_params, insertions=3), "other stream") != key


def test_no_fine_tuning_rows_gives_the_base_as_it_is(ft_params, small_data, session_cache):
    base = experiment.get_base(ft_params, small_data, session_cache)
    empty = np.zeros((0, small_data.block_size), dtype=np.int64)
    model, curve = base_models.finetune(ft_params, base.model, empty, empty, 0, torch.device("cpu"),
                                        small_data.heldout_rows[:4])
    assert same_weights(weights(model), weights(base.model)) and model is not base.model
    assert curve.split.tolist() == ["held-out"] and base_models.steps_of(curve) == 0


def test_cache_hit_returns_the_same_model(ft_params, small_data, session_cache):
    a = experiment.get_model(ft_params, small_data, "reference", 1, session_cache)
    b = experiment.get_model(ft_params, small_data, "reference", 1, session_cache)
    rows = small_data.heldout_rows[:4]
    assert mean_token_loss(a.model, rows) == mean_token_loss(b.model, rows)
    assert same_weights(weights(a.model), weights(b.model))
    assert b.model.lm_head.weight.data_ptr() == b.model.transformer.wte.weight.data_ptr()


def test_sequence_logprobs_by_hand():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(model_config(vocab_size=20, n_layer=1, n_head=2, d_model=8, block_size=16)).eval()
    seqs = [[0, 3, 4, 5], [0, 7, 8], [0, 1, 2, 3, 4, 5]]
    starts = [2, 1, 4]
    got = sequence_logprobs(m, seqs, starts, batch_size=2)
    for s, st, g in zip(seqs, starts, got):
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=torch.tensor([s])).logits[0], -1)
        want = sum(float(logp[t - 1, s[t]]) for t in range(st, len(s)))
        assert g == pytest.approx(want, abs=1e-5)


def test_bad_role_is_rejected(small_params, small_data, session_cache):
    with pytest.raises(ValueError, match="'original' or 'reference'"):
        experiment.get_model(small_params, small_data, "unlearned", 0, session_cache)
