import numpy as np
import pytest
import torch

from forgetlab import experiment
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


def test_training_lowers_loss_and_is_deterministic(small_params, small_data, session_cache):
    a = experiment.get_model(small_params, small_data, "original", 0, session_cache)
    held = a.curve[a.curve.split == "held-out"].loss.to_numpy()
    assert held[-1] < held[0] - 0.5
    # same parameters, fresh training: identical weights
    from forgetlab.forget_sets import training_rows
    from forgetlab.models import build_model
    ids, labels, _ = training_rows(small_data, include_forget=True)
    b = build_model(experiment.config_for(small_params, small_data), 0)
    train_lm(b, ids, labels, epochs=small_params["epochs"], batch_size=small_params["batch_size"],
             learning_rate=small_params["learning_rate"], warmup_steps=small_params["warmup_steps"], seed=0,
             device=torch.device("cpu"))
    for (n, pa), pb in zip(a.model.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_cache_hit_returns_the_same_model(small_params, small_data, session_cache):
    a = experiment.get_model(small_params, small_data, "reference", 1, session_cache)
    b = experiment.get_model(small_params, small_data, "reference", 1, session_cache)
    rows = small_data.heldout_rows[:4]
    assert mean_token_loss(a.model, rows) == mean_token_loss(b.model, rows)
    assert b.model.lm_head.weight.data_ptr() == b.model.transformer.wte.weight.data_ptr()
    original = experiment.get_model(small_params, small_data, "original", 0, session_cache)
    if small_data.reference_data == "twins":        # twins in the reference where the original has the forget set
        assert a.meta["train_rows"] == original.meta["train_rows"]
    else:
        assert a.meta["train_rows"] < original.meta["train_rows"]


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
