"""The fast paths give the tables of the straightforward ones: batched scoring, the one-pass recorded step, and
trajectories on a process pool (bit for bit)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from forgetlab import engine, engine_pool, metrics
from forgetlab.backend_tiny import TinyGPT2, canary_row_numbers
from forgetlab.cache import ArtifactCache
from forgetlab.scoring import length_batches, score_rows, sequence_logprobs

sys.path.insert(0, str(Path(__file__).parent))
from fake_backend import FakeBackend, tiny_gpt2  # noqa: E402


class PoolableFake(FakeBackend):
    """The fake backend, rebuilt in each worker from its constructor arguments (its models come from seeds)."""

    def worker_recipe(self):
        return PoolableFake, (tuple(self.original_seeds), self.steps)


def test_length_batches_sort_by_length_and_respect_the_token_budget():
    # lengths 5, 2, 5, 3 sorted: rows 1 (2), 3 (3), 0 (5), 2 (5); budget 10 padded tokens per batch:
    # [1, 3] pads to 3 x 2 = 6; adding row 0 would pad to 5 x 3 = 15 > 10; [0, 2] is 5 x 2 = 10.
    got = length_batches([5, 2, 5, 3], max_tokens=10)
    assert [b.tolist() for b in got] == [[1, 3], [0, 2]]
    assert [b.tolist() for b in length_batches([7], max_tokens=3)] == [[0]]      # a long row gets its own batch


def test_score_rows_matches_sequence_logprobs_with_padding_and_score_starts():
    model = tiny_gpt2(3)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 32, size=n).tolist() for n in (7, 3, 16, 9, 9, 2)]
    starts = [1, 2, 5, 8, 1, 1]
    want = sequence_logprobs(model, seqs, starts)
    got = score_rows(model, seqs, starts, max_tokens=20)                       # several padded batches
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # row 5 scores one token: its ll by hand from the full logits
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seqs[5]])).logits[0, 0], -1)[seqs[5][1]]
    assert got[5] == pytest.approx(float(logp), rel=1e-6)
    assert model.training is False and score_rows(model, [], []).shape == (0,)


def test_canary_rows_are_recognised_by_prefix_and_digit_tokens():
    ex = pd.DataFrame({"ids": [[9, 8, 1, 2], [9, 8, 1, 5], [9, 7, 1, 2], [9, 8, 1]],
                       "score_start": [2, 2, 2, 2]})
    digits = [1, 2, 3, 4, 5, 6, 7, 0, 10, 11]          # token of digit d; digit 7 is token 0
    # [9, 8] + digits "0","1" -> 1; token 5 is digit 4 -> "04" = 4; other prefix / too short -> -1
    assert canary_row_numbers(ex, [9, 8], digits, 2).tolist() == [1, 4, -1, -1]


@pytest.fixture(scope="module")
def random_tiny(small_params, small_data):
    """The small study's data with untrained models: the evaluators' arithmetic, not the models, is under test."""
    from forgetlab.experiment import TrainedModel, config_for
    from forgetlab.models import build_model
    cfg = config_for(small_params, small_data)
    make = lambda role, s: TrainedModel(role, s, build_model(cfg, s).eval(), None, {})  # noqa: E731
    models = {"original": [make("original", s) for s in small_params["original_seeds"]],
              "reference": [make("reference", s) for s in small_params["reference_seeds"]]}
    return TinyGPT2(small_params, small_data, models)


def test_fast_evaluator_gives_the_straightforward_records(random_tiny):
    backend = random_tiny
    model = backend.original(backend.original_seeds[0])
    for kind in backend.kinds:
        view = backend.view(kind)
        fast = pd.DataFrame(engine.make_evaluator(backend, view, 10)(model, 0))
        plain = pd.DataFrame(engine.make_evaluator(backend, view, 10, fast=False)(model, 0))
        assert fast[["uid", "role", "metric"]].equals(plain[["uid", "role", "metric"]]), kind
        for metric, tol in (("ll", 1e-6), ("heldout_ppl", 1e-6), ("retain_loss", 1e-6), ("exposure_bits", 1e-4)):
            f, p = fast[fast.metric == metric].value, plain[plain.metric == metric].value
            np.testing.assert_allclose(f.to_numpy(), p.to_numpy(), rtol=tol, err_msg=f"{kind} {metric}")
        for metric in ("relex_bits", "membership_auc", "exposure_exact_bits"):     # ranks: identical
            np.testing.assert_array_equal(fast[fast.metric == metric].value, plain[plain.metric == metric].value)
        losses = plain[plain.metric.str.startswith("loss_")]
        np.testing.assert_allclose(fast[fast.metric.str.startswith("loss_")].value, losses.value, rtol=1e-6)
    assert "canary" in backend.kinds and len(backend.view("canary").population) >= 64   # the trie path ran


def test_step_scores_reads_canaries_off_the_trie(random_tiny):
    backend = random_tiny
    model = backend.original(backend.original_seeds[0])
    view = backend.view("canary")
    scored = pd.concat([view.targets, view.population], ignore_index=True)
    ll, _ = backend.step_scores(model, scored)
    np.testing.assert_allclose(ll, metrics.example_logprobs(model, scored), rtol=1e-6)


def test_utility_is_due_at_step_zero_the_last_step_and_every_kth_step():
    # utility_every 10, a 25-step run recorded every 2nd step: 0, 10, 20 and the last (25); 1 = every record
    due = [s for s in (0, 2, 4, 8, 10, 12, 18, 20, 22, 24, 25) if engine.utility_due(s, 25, 10)]
    assert due == [0, 10, 20, 25]
    assert all(engine.utility_due(s, 25, 1) for s in (0, 3, 7, 25))


def test_steps_between_utility_steps_score_the_same_rows_without_the_utility(random_tiny):
    backend = random_tiny
    model = backend.original(backend.original_seeds[0])
    for kind in backend.kinds:
        view = backend.view(kind)
        every = pd.DataFrame(engine.make_evaluator(backend, view, 12, utility_every=1)(model, 2))
        sparse = pd.DataFrame(engine.make_evaluator(backend, view, 12, utility_every=4)(model, 2))
        due = pd.DataFrame(engine.make_evaluator(backend, view, 12, utility_every=4)(model, 4))
        utility = every.role.eq("model") & every.metric.ne("membership_auc")
        assert utility.sum() >= 3, kind                                      # heldout_ppl, retain_loss, losses
        assert not sparse.metric.isin(every[utility].metric).any(), kind     # step 2: no utility rows
        kept = every[~utility].reset_index(drop=True)
        assert kept[["uid", "role", "metric"]].equals(sparse[["uid", "role", "metric"]]), kind
        np.testing.assert_allclose(sparse.value, kept.value, rtol=1e-6, err_msg=kind)
        assert set(every[utility].metric) <= set(due.metric), kind         # step 4: the utility again


def test_pool_gives_the_sequential_table_bit_for_bit(tmp_path, monkeypatch):
    seq = engine.run_study(PoolableFake(), ArtifactCache(tmp_path / "seq"), kinds=["a"], workers=1)
    built = []
    real = engine.unlearn_trajectory
    monkeypatch.setattr(engine, "unlearn_trajectory", lambda *a, **k: built.append(a[1:4]) or real(*a, **k))
    par = engine.run_study(PoolableFake(), ArtifactCache(tmp_path / "par"), kinds=["a"], workers=2)
    assert built == []                                  # every trajectory ran in a worker, none here
    pd.testing.assert_frame_equal(par, seq, check_exact=True)
    assert len(list((tmp_path / "par" / "trajectory").iterdir())) == 2 * 2      # methods x seeds


def test_workers_come_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.setenv(engine_pool.WORKERS_ENV, "3")
    assert engine_pool.resolve_workers() == 3 and engine_pool.resolve_workers(1) == 1
    monkeypatch.delenv(engine_pool.WORKERS_ENV)
    assert 1 <= engine_pool.resolve_workers() <= 2
    monkeypatch.setenv(engine_pool.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="FORGETLAB_WORKERS = 'two' is invalid"):
        engine_pool.resolve_workers()
    with pytest.raises(ValueError, match="whole number >= 1"):
        engine_pool.resolve_workers(0)
    before = torch.get_num_threads()
    with engine_pool.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
