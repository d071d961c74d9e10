"""Memorization and difficulty (mem_pool, mem_models, mem_scores, mem_stats, mem_report): the estimator on
disjoint model sets, the split bookkeeping, GenEx and endpoints per example, the group-and-model bootstrap,
pooled against within-kind correlations."""
import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import forgetlab
from forgetlab import intervals, mem_models, mem_pool, mem_report, mem_scores, mem_stats, plots
from forgetlab.forget_sets import IGNORE
from forgetlab.models import build_model, model_config

VOCAB, BOS, BLOCK = 48, 0, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- estimator

def test_memorization_scores_hand_computed():
    # 4 models x 2 examples; example 0 has 4 scored tokens, example 1 has 2
    ll = np.array([[-4.0, -2.0],
                   [-8.0, -3.0],
                   [-6.0, -1.0],
                   [-12.0, -4.0]])
    seen = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    s = mem_scores.memorization_scores(ll, seen, np.array([4, 2]))
    # example 0: seen by models 0, 2 (per token -1, -1.5), unseen by 1, 3 (-2, -3)
    assert s.memorization[0] == pytest.approx(-1.25 - (-2.5))
    assert s.difficulty[0] == pytest.approx(2.5)
    se = math.sqrt(np.var([-1, -1.5], ddof=1) / 2 + np.var([-2, -3], ddof=1) / 2)
    assert s.memorization_se[0] == pytest.approx(se)
    assert s.difficulty_se[0] == pytest.approx(np.std([-2, -3], ddof=1) / math.sqrt(2))
    # example 1: seen by 1, 2 (-1.5, -0.5), unseen by 0, 3 (-1, -2)
    assert s.memorization[1] == pytest.approx(-1.0 - (-1.5))
    assert list(s.n_in) == [2, 2] and list(s.n_out) == [2, 2] and list(s.n_diff) == [2, 2]


def test_memorization_and_difficulty_come_from_disjoint_sets():
    # 4 models in two sets (A: 0, 1; B: 2, 3), each pair complementary; one scored token each
    ll = np.array([[-1.0, -5.0],      # A, sees x0
                   [-3.0, -2.0],      # A, sees x1
                   [-9.0, -4.0],      # B, sees x0
                   [-6.0, -7.0]])     # B, sees x1
    seen = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=bool)
    sets = mem_pool.model_sets(4)
    s = mem_scores.memorization_scores(ll, seen, np.array([1, 1]), sets == "A", sets == "B")
    assert list(s.memorization) == pytest.approx([-1 - (-3), -2 - (-5)])       # set A only
    assert list(s.difficulty) == pytest.approx([6.0, 4.0])                     # set B's unseen model only
    assert list(s.n_in) == [1, 1] and list(s.n_out) == [1, 1] and list(s.n_diff) == [1, 1]
    shared = mem_scores.memorization_scores(ll, seen, np.array([1, 1]))         # the old estimate: every model
    assert shared.difficulty[0] == pytest.approx((3 + 6) / 2)
    pool = pd.DataFrame({"uid": ["x0", "x1"], "kind": ["a", "a"], "n_scored": [1, 1]})
    assert mem_scores.score_table(pool, ll, seen, sets).difficulty.tolist() == pytest.approx([6.0, 4.0])


def test_memorization_scores_need_both_sides_and_give_nan_se_with_one_model():
    ll = np.array([[-1.0], [-2.0]])
    with pytest.raises(mem_pool.MemorizationInputError, match="seen by 2 and unseen by 0 memorization"):
        mem_scores.memorization_scores(ll, np.array([[True], [True]]), np.array([1]))
    s = mem_scores.memorization_scores(ll, np.array([[True], [False]]), np.array([1]))
    assert s.memorization[0] == pytest.approx(1.0) and math.isnan(s.memorization_se[0])


def _tiny_pool(kinds: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for i, kind in enumerate(kinds):
        ids = [BOS] + rng.integers(1, VOCAB, size=10).tolist()
        rows.append({"uid": f"{kind}-pool-{i:03d}", "kind": kind, "ids": ids, "score_start": 1, "n_scored": 10})
    return pd.DataFrame(rows)


def test_estimator_ranks_an_inserted_example_above_one_never_inserted():
    """Constructed case: examples inserted 30 times (when their half is seen) vs never inserted at all."""
    torch.manual_seed(0)
    pool = _tiny_pool(["a", "a", "b", "b"])
    insertions = np.array([30, 0, 30, 0])          # examples 0 and 2 inserted, 1 and 3 never
    seen = mem_pool.assign_halves(pool.kind, 4, seed=0)
    base = build_model(model_config(VOCAB, n_layer=1, n_head=2, d_model=16, block_size=BLOCK, bos=BOS), seed=0)
    shared = np.random.default_rng(2).integers(1, VOCAB, size=(30, BLOCK)).astype(np.int64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    models = []
    for m in range(len(seen)):
        ids, labels, _ = mem_models.subset_rows(pool, seen[m], insertions, shared, BLOCK, BOS)
        model, _ = mem_models.finetune_copy(base, ids, labels, epochs=2, batch_size=8, learning_rate=3e-3, seed=0)
        models.append(model)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())   # base untouched
    scores = mem_scores.score_table(pool, mem_scores.pool_logprobs(models, pool), seen)
    mem = scores.memorization.to_numpy()
    assert min(mem[0], mem[2]) > max(mem[1], mem[3])
    assert min(mem[0], mem[2]) > 0.5                                   # nats / token: clearly memorized
    assert abs(mem[1]) < 0.2 and abs(mem[3]) < 0.2                     # never inserted: about nothing
    assert (scores.memorization_se > 0).all() and np.isfinite(scores.memorization_se).all()
    assert (scores[["n_in", "n_out"]] == 2).all().all()


# ------------------------------------------------------------------------------------------ bookkeeping

def test_kind_counts():
    assert (mem_pool.kind_counts(10, ["id", "canary", "language", "code"])
            == {"id": 3, "canary": 3, "language": 2, "code": 2})
    with pytest.raises(mem_pool.MemorizationInputError, match="raise mem_pool_size"):
        mem_pool.kind_counts(3, ["id", "canary", "language", "code"])


def test_assign_halves_complementary_pairs_stratified_by_kind():
    kinds = ["id"] * 5 + ["canary"] * 4 + ["code"] * 3
    seen = mem_pool.assign_halves(kinds, 6, seed=3)
    assert seen.shape == (6, 12) and seen.dtype == bool
    assert (seen.sum(0) == 3).all()                                    # each example: 3 models in, 3 out
    for j in range(3):
        assert (seen[2 * j] ^ seen[2 * j + 1]).all()                   # a pair covers the pool exactly once
    k = np.array(kinds)
    for kind, n in (("id", 5), ("canary", 4), ("code", 3)):
        per_model = seen[:, k == kind].sum(1)
        assert set(per_model) <= {n // 2, (n + 1) // 2}               # half of each kind, odd counts alternate
    assert len({seen[2 * j].tobytes() for j in range(3)} | {seen[2 * j + 1].tobytes() for j in range(3)}) == 6
    assert np.array_equal(seen, mem_pool.assign_halves(kinds, 6, seed=3))   # deterministic
    assert not np.array_equal(seen, mem_pool.assign_halves(kinds, 6, seed=4))


def test_assign_halves_small_pool_avoids_duplicate_models_and_odd_counts():
    seen = mem_pool.assign_halves(["a", "a", "b", "b"], 4, seed=0)
    assert len({row.tobytes() for row in seen}) == 4                   # no two identical subset models
    odd = mem_pool.assign_halves(["a"] * 4, 5, seed=0)
    assert set(odd.sum(0)) <= {2, 3} and (odd.sum(0) >= 1).all() and (odd.sum(0) <= 4).all()
    with pytest.raises(mem_pool.MemorizationInputError, match="at least 2"):
        mem_pool.assign_halves(["a", "a"], 1, seed=0)


def test_membership_table_records_who_saw_what():
    pool = _tiny_pool(["a", "a", "b", "b"])
    seen = mem_pool.assign_halves(pool.kind, 4, seed=0)
    t = mem_pool.membership_table(pool, seen)
    assert len(t) == 16 and t.seen.sum() == seen.sum()
    for r in t.itertuples():
        assert r.seen == seen[r.model, pool.uid.tolist().index(r.uid)] and r.pair == r.model // 2
    assert (mem_pool.membership_summary(pool, seen).to_numpy() == 1).all()


@pytest.mark.parametrize("pairs", [1, 2])
def test_plan_unlearning_groups_cover_each_example_once_per_pair(pairs):
    kinds = np.array(["id"] * 9 + ["code"] * 6)
    seen = mem_pool.assign_halves(kinds, 4, seed=1)
    groups = mem_pool.plan_unlearning_groups(kinds, seen, group_size=3, unlearn_pairs=pairs)
    count = np.zeros(len(kinds), dtype=int)
    for g in groups:
        assert 1 <= len(g["members"]) <= 3
        assert seen[g["model"], g["members"]].all()                   # the model saw every member
        assert set(kinds[g["members"]]) == {g["kind"]}                 # one kind per group
        assert g["model"] < 2 * pairs
        count[g["members"]] += 1
    assert (count == pairs).all()
    assert [g["group"] for g in groups] == list(range(len(groups)))
    with pytest.raises(mem_pool.MemorizationInputError, match="unlearn_pairs"):
        mem_pool.plan_unlearning_groups(kinds, seen, 3, unlearn_pairs=3)
    with pytest.raises(mem_pool.MemorizationInputError, match="mem_group_size"):
        mem_pool.plan_unlearning_groups(kinds, seen, 0)


def test_model_sets_are_disjoint_whole_pairs_with_both_sides_of_every_example():
    assert mem_pool.model_sets(8).tolist() == ["A", "A", "B", "B", "A", "A", "B", "B"]
    assert mem_pool.set_pairs(mem_pool.model_sets(8), "B") == [1, 3]
    kinds = np.array(["id"] * 7 + ["code"] * 5)
    for n_models in (4, 6, 8):
        seen = mem_pool.assign_halves(kinds, n_models, seed=2)
        sets = mem_pool.model_sets(n_models)
        mem_pool.check_sets(seen, sets)                                  # passes
        for label in ("A", "B"):
            rows = seen[sets == label]
            assert rows.any(0).all() and (~rows).any(0).all()             # seen and unseen within the set
        assert set(np.flatnonzero(sets == "A")).isdisjoint(np.flatnonzero(sets == "B"))
    for bad, fix in ((2, "set mem_models to 4"), (3, "set mem_models to 4"), (5, "set mem_models to 6")):
        with pytest.raises(mem_pool.MemorizationInputError, match=fix):
            mem_pool.model_sets(bad)
    # splitting by model-index parity instead puts independent halves together: some example is seen by
    # every even model or by none, and the check says so
    seen = mem_pool.assign_halves(kinds, 4, seed=2)
    parity = np.array(["A", "B", "A", "B"], dtype=object)
    with pytest.raises(mem_pool.MemorizationInputError, match="no model that saw, or none that did not see"):
        mem_pool.check_sets(seen, parity)


def test_unlearning_uses_only_set_b_models():
    kinds = np.array(["id"] * 8 + ["code"] * 8)
    seen = mem_pool.assign_halves(kinds, 8, seed=1)
    sets = mem_pool.model_sets(8)
    groups = mem_pool.plan_unlearning_groups(kinds, seen, 3, pairs=mem_pool.set_pairs(sets, "B"))
    assert {g["model"] for g in groups} == {2, 3}                        # set B's first pair
    count = np.zeros(len(kinds), dtype=int)
    for g in groups:
        count[g["members"]] += 1
    assert (count == 1).all()
    two = mem_pool.plan_unlearning_groups(kinds, seen, 3, unlearn_pairs=2, pairs=[1, 3])
    assert {g["model"] for g in two} == {2, 3, 6, 7}
    with pytest.raises(mem_pool.MemorizationInputError, match="between 1 and 2"):
        mem_pool.plan_unlearning_groups(kinds, seen, 3, unlearn_pairs=3, pairs=[1, 3])


def test_subset_rows_insert_exactly_the_seen_examples():
    pool = _tiny_pool(["a", "a", "b"])
    shared = np.arange(2 * BLOCK, dtype=np.int64).reshape(2, BLOCK)
    ids, labels, row_uid = mem_models.subset_rows(pool, np.array([True, False, True]), 3, shared, BLOCK, BOS)
    assert np.array_equal(ids[:2], shared) and np.array_equal(labels[:2], shared)
    assert pd.Series(row_uid[row_uid != ""]).value_counts().to_dict() == {"a-pool-000": 3, "b-pool-002": 3}
    r = 2                                                              # first inserted row
    assert ids[r, :11].tolist() == pool.ids[0] and (labels[r, 11:] == IGNORE).all()
    _, _, none = mem_models.subset_rows(pool, np.array([True, True, True]), np.array([0, 2, 0]), shared, BLOCK, BOS)
    assert list(none[none != ""]) == ["a-pool-001"] * 2


# ---------------------------------------------------------------------------------- GenEx and cost per example

def test_genex_steps_and_utility_lost_per_example():
    scores = pd.DataFrame({"uid": ["x", "y"], "kind": ["id", "code"], "memorization": [0.5, 0.1],
                           "difficulty": [2.0, 3.0]})
    seen = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=bool)
    ll = np.log(np.array([[8.0, 1.0], [2.0, 4.0], [2.0, 4.0], [8.0, 1.0]]))   # reference: x -> 2, y -> 1
    rows = []
    px = [8.0, 4.0, 1.5, 1.0]           # x under model 0 at steps 0..3: GenEx 2, 1, log2 .75, -1 bits
    py = [4.0, 4.0, 4.0, 4.0]           # y under model 1: stays 2 bits (never reaches the target)
    for step in range(4):
        rows += [{"group": 0, "model": 0, "step": step, "uid": "x", "metric": "ll", "value": math.log(px[step])},
                 {"group": 0, "model": 0, "step": step, "uid": "", "metric": "heldout_ppl", "value": 10.0 + step},
                 {"group": 1, "model": 1, "step": step, "uid": "y", "metric": "ll", "value": math.log(py[step])},
                 {"group": 1, "model": 1, "step": step, "uid": "", "metric": "heldout_ppl", "value": 20.0 + 2 * step}]
    results = pd.DataFrame(rows)
    genex = mem_scores.genex_curves(results, scores, ll, seen)
    gx = genex[genex.uid == "x"].sort_values("step").genex_bits.to_numpy()
    assert gx == pytest.approx([2.0, 1.0, math.log2(0.75), -1.0])
    table = mem_scores.example_table(scores, results, genex, target_bits=1.0, max_steps=3).set_index("uid")
    assert table.steps_to_unlearn["x"] == 2 and table.reached["x"]
    assert table.ppl_increase_at_target["x"] == pytest.approx(2.0)
    assert table.initial_genex_bits["x"] == pytest.approx(2.0) and table.final_genex_bits["x"] == pytest.approx(-1.0)
    assert not table.reached["y"] and math.isnan(table.steps_to_unlearn["y"])
    assert table.steps_censored["y"] == 4 and math.isnan(table.ppl_increase_at_target["y"])
    assert table.ppl_increase_final["y"] == pytest.approx(6.0)
    # endpoints: x loses half of its 2 bits at step 2 (log2 .75 < 1) and 3 bits over 3 steps; y never moves
    assert table.steps_to_50pct["x"] == 2 and table.reached_50pct["x"]
    assert table.fraction_removed_per_step["x"] == pytest.approx((2 - (-1)) / 2 / 3)
    assert table.steps_to_50pct["y"] == 4 and not table.reached_50pct["y"]
    assert table.fraction_removed_per_step["y"] == pytest.approx(0.0)
    assert table.group["x"] == 0 and table.group["y"] == 1
    only_b = mem_scores.genex_curves(results, scores, ll, seen, reference=np.array([False, False, True, True]))
    assert only_b[only_b.uid == "x"].sort_values("step").genex_bits.iloc[0] == pytest.approx(2.0)
    with pytest.raises(mem_pool.MemorizationInputError, match="up to step 3"):
        mem_scores.example_table(scores, results, genex, target_bits=1.0, max_steps=5)


# ------------------------------------------------------------------------------------------------ endpoints

def test_curve_endpoints_hand_computed():
    steps = np.arange(5.0)
    curves = np.array([[8.0, 6.0, 4.0, 2.0, 0.0],       # half (< 4) at step 3, target (< 1) at step 4
                       [2.0, 1.5, 1.2, 1.1, 1.05],      # never half (< 1), never the target: censored at 5
                       [-1.0, -2.0, -3.0, -4.0, -5.0],  # nothing to remove; already below the target
                       [np.nan] * 5])                   # never unlearned
    e = mem_stats.curve_endpoints(curves, steps, target_bits=1.0)
    assert e["steps_to_50pct"][:2].tolist() == [3.0, 5.0] and np.isnan(e["steps_to_50pct"][2:]).all()
    assert e["fraction_removed_per_step"][:2] == pytest.approx([8 / 8 / 4, (2 - 1.05) / 2 / 4])
    assert np.isnan(e["fraction_removed_per_step"][2:]).all()
    assert e["steps_to_target"][:3].tolist() == [4.0, 5.0, 0.0] and np.isnan(e["steps_to_target"][3])
    assert e["reached_50pct"].tolist() == [True, False, False, False]
    assert e["reached_target"].tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="ascending steps"):
        mem_stats.curve_endpoints(curves, steps[::-1], 1.0)


def test_curve_endpoints_agree_with_the_shared_interval_helpers():
    rng = np.random.default_rng(3)
    steps = np.arange(9.0)
    curves = 10 * np.cumprod(rng.uniform(0.6, 1.05, size=(20, 9)), axis=1) - rng.uniform(0, 3, size=(20, 1))
    e = mem_stats.curve_endpoints(curves, steps, target_bits=2.0)
    for c, half, rate, target in zip(curves, e["steps_to_50pct"], e["fraction_removed_per_step"], e["steps_to_target"]):
        step, censored = intervals.steps_to_fraction_removed(steps, c, 0.5)
        if c[0] > 0:
            assert half == (9.0 if censored else step)
            assert rate == pytest.approx(intervals.fraction_removed_per_step(steps, c, k=8))
        t, cens = intervals.first_crossing(steps, c, 2.0)
        assert target == (9.0 if cens else t)


def test_half_life_does_not_grow_with_initial_genex_but_raw_steps_do():
    """Three examples lose the same share per step (20%) from 4, 16 and 64 bits: the same half-life and share per
    step, while raw steps to 1 bit grow with how much there was to remove."""
    steps = np.arange(31.0)
    curves = np.array([4.0, 16.0, 64.0])[:, None] * 0.8 ** steps[None, :]
    e = mem_stats.curve_endpoints(curves, steps, target_bits=1.0)
    assert e["steps_to_50pct"].tolist() == [4.0, 4.0, 4.0]                 # 0.8^4 = 0.41 < 0.5
    assert np.ptp(e["fraction_removed_per_step"]) < 1e-12
    assert e["steps_to_target"].tolist() == [7.0, 13.0, 19.0]              # 4*0.8^7 < 1, 16*0.8^13 < 1, ...


# --------------------------------------------------------------------------------------------- correlations

def test_spearman_with_ties_and_missing_values():
    assert mem_stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mem_stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [1, 2, 2, 3, np.nan], [1, 3, 2, 4, 9]
    assert mem_stats.spearman(x, y) == pytest.approx(mem_stats.spearman([1, 2, 2, 3], [1, 3, 2, 4]))
    assert mem_stats.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)   # scipy's value
    assert math.isnan(mem_stats.spearman([1, 2], [1, 2])) and math.isnan(mem_stats.spearman([1, 1, 1], [1, 2, 3]))
    v = np.random.default_rng(0).integers(0, 5, size=40).astype(float)
    assert mem_stats.average_ranks(v) == pytest.approx(scipy.stats.rankdata(v))


def test_weighted_spearman_equals_spearman_on_the_expanded_resample():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, size=12).astype(float)                      # ties between values
    y = rng.normal(size=12)
    x[3], y[7] = np.nan, np.inf                                        # dropped pairs
    counts = rng.integers(0, 3, size=(50, 12)).astype(float)           # 0, 1 or 2 copies of each pair
    got = mem_stats.weighted_spearman(np.broadcast_to(x, counts.shape), np.broadcast_to(y, counts.shape), counts)
    want = [mem_stats.spearman(x[np.repeat(np.arange(12), c.astype(int))], y[np.repeat(np.arange(12), c.astype(int))])
            for c in counts]
    assert got == pytest.approx(want, nan_ok=True)
    assert math.isnan(mem_stats.weighted_spearman(x, y, np.r_[np.ones(2), np.zeros(10)])[0])   # < 3 pairs
    assert mem_stats.weighted_spearman(x, y, np.ones(12))[0] == pytest.approx(mem_stats.spearman(x, y))


def test_cluster_draws_keep_groups_together_within_kinds():
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    kinds = np.array(["a"] * 6 + ["b"] * 6)
    draws = mem_stats.cluster_draws(clusters, kinds, 200, np.random.default_rng(0))
    for idx in draws:
        counts = np.bincount(idx, minlength=12)
        assert (counts.reshape(4, 3) == counts.reshape(4, 3)[:, :1]).all()    # a group's members come together
        assert (kinds[idx] == "a").sum() == 6 and (kinds[idx] == "b").sum() == 6
    assert len({tuple(d) for d in draws}) > 10


def test_group_bootstrap_known_correlation_and_wider_than_the_example_bootstrap():
    # a perfect monotone relation across groups stays perfect in every resample
    groups = np.repeat(np.arange(5), 4)
    x = groups + np.tile([0.0, 0.1, 0.2, 0.3], 5)
    r = mem_stats.cluster_rank_correlation(x, 2 * x, groups, resamples=200, seed=0)
    assert (r["spearman"], r["ci_low"], r["ci_high"]) == (pytest.approx(1.0),) * 3
    assert r["n"] == 20 and r["n_clusters"] == 5
    # 6 groups of 5 examples that share their group's values (plus a little noise): the data hold 6
    # independent points, not 30, and only the group bootstrap knows it
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(6), 5)
    gx, gy = rng.normal(size=6), rng.normal(size=6)
    x, y = gx[groups] + rng.normal(0, 0.01, 30), gy[groups] + rng.normal(0, 0.01, 30)
    by_group = mem_stats.cluster_rank_correlation(x, y, groups, resamples=400, seed=2)
    by_example = mem_stats.cluster_rank_correlation(x, y, None, resamples=400, seed=2)
    assert by_group["spearman"] == by_example["spearman"]
    assert by_group["ci_high"] - by_group["ci_low"] > 1.5 * (by_example["ci_high"] - by_example["ci_low"])
    assert by_example["n_clusters"] == 30 and by_group["n_clusters"] == 6


def _hand_arrays(mem, diff, genex, steps):
    """4 models (sets A, A, B, B; pairs complementary): model 0 and 2 see every example, 1 and 3 none; one scored
    token each. ll: model 0 = mem, 1 = 0, 2 = 0, 3 = -diff; unlearned curves make GenEx equal `genex`."""
    mem, diff, genex = (np.asarray(v, dtype=np.float64) for v in (mem, diff, genex))
    n = len(mem)
    seen = np.array([[1] * n, [0] * n, [1] * n, [0] * n], dtype=bool)
    return mem_stats.StudyArrays(ll=np.vstack([mem, np.zeros(n), np.zeros(n), -diff]), n_scored=np.ones(n),
                                 seen=seen, sets=mem_pool.model_sets(4),
                                 unlearned=-diff[:, None] + math.log(2) * genex, steps=np.asarray(steps, float))


def _half_life_curves(half_lives, steps):
    """GenEx 10 bits until step h, then 1 bit: the half-life is h."""
    return np.where(np.asarray(steps)[None, :] < np.asarray(half_lives)[:, None], 10.0, 1.0)


def test_pooled_correlation_can_be_positive_while_within_each_kind_it_is_negative():
    """Simpson: kind b is both more memorized and slower than kind a, but within each kind the more memorized
    examples are the faster ones. Pooled ρ = 1 - 6 * 16 / (6 * 35) = 0.543; within each kind ρ = -1."""
    steps = np.arange(11)
    arr = _hand_arrays(mem=[0.1, 0.2, 0.3, 1.1, 1.2, 1.3], diff=[2.0, 1.0, 3.0, 5.0, 4.0, 6.0],
                       genex=_half_life_curves([3, 2, 1, 9, 8, 7], steps), steps=steps)
    kinds = np.array(["a"] * 3 + ["b"] * 3)
    corr = mem_stats.correlation_bootstrap(arr, kinds, np.arange(6), target_bits=0.5, resamples=100, seed=0)
    c = corr.set_index(["kind", "x", "y"])
    assert c.loc[("all", "memorization", "steps_to_50pct"), "spearman"] == pytest.approx(1 - 6 * 16 / (6 * 35))
    for kind in ("a", "b"):
        row = c.loc[(kind, "memorization", "steps_to_50pct")]
        assert row.spearman == pytest.approx(-1.0)
        assert row.ci_high == pytest.approx(-1.0) and row.n == 3 and row.n_groups == 3   # every resample: -1
    assert c.loc[("a", "difficulty", "steps_to_50pct"), "spearman"] == pytest.approx(1 - 6 * 6 / (3 * 8))
    assert c.loc[("all", "memorization", "difficulty"), "spearman"] == pytest.approx(1 - 6 * 4 / (6 * 35))
    assert set(corr.kind) == {"all", "a", "b"} and len(corr) == 3 * len(mem_stats.CORR_PAIRS)


def test_unit_weights_reproduce_the_score_table_and_example_endpoints():
    """The bootstrap's vectorised scores equal the per-example tables when every model pair counts once."""
    rng = np.random.default_rng(4)
    kinds = np.array(["id"] * 6 + ["code"] * 6)
    seen = mem_pool.assign_halves(kinds, 8, seed=0)
    sets = mem_pool.model_sets(8)
    n_scored = rng.integers(2, 6, size=12)
    ll = rng.normal(-20, 3, size=(8, 12)) + 4 * seen
    pool = pd.DataFrame({"uid": [f"u{i}" for i in range(12)], "kind": kinds, "n_scored": n_scored})
    groups = mem_pool.plan_unlearning_groups(kinds, seen, 2, pairs=mem_pool.set_pairs(sets, "B"))
    rows = []
    for g in groups:
        for i in g["members"]:
            for step in range(6):
                rows.append({"group": g["group"], "model": g["model"], "step": step, "uid": f"u{i}", "metric": "ll",
                             "value": ll[g["model"], i] - step * rng.uniform(0.5, 2)})
        rows += [{"group": g["group"], "model": g["model"], "step": step, "uid": "", "metric": "heldout_ppl",
                  "value": 10.0 + step} for step in range(6)]
    results = pd.DataFrame(rows)
    scores = mem_scores.score_table(pool, ll, seen, sets)
    genex = mem_scores.genex_curves(results, scores, ll, seen, reference=sets == "B")
    table = mem_scores.example_table(scores, results, genex, target_bits=1.0, max_steps=5)
    arr = mem_scores.study_arrays(scores, results, ll, seen, sets)
    ones = [mem_stats.pair_weights(arr.pairs(s), 8, np.ones(2)) for s in ("A", "B")]
    v = mem_stats.scores_from_weights(arr, *ones, target_bits=1.0)
    for col in ("memorization", "difficulty", *mem_stats.ENDPOINTS):
        assert v[col][0] == pytest.approx(table[col].to_numpy(), nan_ok=True), col
    w = mem_stats.pair_weights([1, 3], 8, [[2, 0]])
    assert w.tolist() == [[0, 0, 2, 2, 0, 0, 0, 0]]


def test_resampling_models_widens_the_interval_when_model_pairs_disagree():
    """Two set-A pairs rank the examples' memorization in opposite orders; their mean follows the endpoint.
    With the models fixed ρ is 1 in every resample; drawing the pairs too gives -1 whenever pair 2 is drawn
    twice (one resample in four)."""
    n = 6
    sets = mem_pool.model_sets(8)                                    # A: models 0, 1, 4, 5; B: 2, 3, 6, 7
    seen = np.array([[1] * n, [0] * n] * 4, dtype=bool)
    i = np.arange(1.0, n + 1)
    ll = np.zeros((8, n))
    ll[0], ll[4] = i, 10 - 0.5 * i                                   # memorization per pair: i and 10 - i / 2
    ll[3] = ll[7] = -2.0                                             # difficulty 2 for all, same reference
    steps = np.arange(11.0)
    arr = mem_stats.StudyArrays(ll=ll, n_scored=np.ones(n), seen=seen, sets=sets,
                                unlearned=-2.0 + math.log(2) * _half_life_curves(np.arange(1, n + 1), steps),
                                steps=steps)
    kinds = np.array(["a"] * n)
    both = mem_stats.correlation_table(arr, kinds, np.arange(n), 0.5, resamples=200, seed=1)
    row = both.set_index(["bootstrap", "kind", "x", "y"])
    full = row.loc[("groups and models", "all", "memorization", "steps_to_50pct")]
    fixed = row.loc[("examples only", "all", "memorization", "steps_to_50pct")]
    assert full.spearman == pytest.approx(1.0) and fixed.spearman == pytest.approx(1.0)
    assert (fixed.ci_low, fixed.ci_high) == (pytest.approx(1.0), pytest.approx(1.0))
    assert full.ci_low == pytest.approx(-1.0) and full.ci_high == pytest.approx(1.0)
    assert (both.pairs_a == 2).all() and (both.pairs_b == 2).all()


def test_report_is_written_from_the_tables():
    steps = np.arange(11)
    curves = _half_life_curves([3, 2, 1, 9, 8, 11], steps)           # the last never loses half: censored at 11
    arr = _hand_arrays(mem=[0.1, 0.2, 0.3, 1.1, 1.2, 1.3], diff=[2.0, 1.0, 3.0, 5.0, 4.0, 6.0], genex=curves,
                       steps=steps)
    kinds = np.array(["id"] * 3 + ["code"] * 3)
    corr = mem_stats.correlation_table(arr, kinds, np.array([0, 0, 1, 2, 2, 3]), 2.0, resamples=100)
    e = mem_stats.curve_endpoints(curves, steps, 2.0)
    table = pd.DataFrame({"uid": [f"u{i}" for i in range(6)], "kind": kinds, "memorization": arr.ll[0],
                          "memorization_se": np.nan, "difficulty": -arr.ll[3], "n_in": 1, "n_out": 1, "n_diff": 1,
                          "initial_genex_bits": 10.0, "group": [0, 0, 1, 2, 2, 3],
                          "reached": False, "steps_to_unlearn": np.nan, "ppl_increase_at_target": np.nan,
                          **{k: e[k] for k in mem_stats.ENDPOINTS}, "reached_50pct": e["reached_50pct"]})
    shown = mem_report.correlation_display(corr)
    assert list(shown.columns) == ["all", "id", "code"] and len(shown) == len(mem_stats.CORR_PAIRS)
    cell = shown.loc["steps to remove 50% of initial GenEx (primary) vs memorization (set A)", "all"]
    r = corr[(corr.bootstrap == "groups and models") & (corr.kind == "all") & (corr.x == "memorization")
             & (corr.y == "steps_to_50pct")].iloc[0]
    assert cell.startswith(f"{r.spearman:.2f} [") and "4 groups" in cell
    assert "examples only" in mem_report.correlation_display(corr, "examples only").index.name
    summary = mem_report.findings(table, corr, 10, 2.0)
    assert summary["primary_endpoint"] == "steps_to_50pct" and summary["model_pairs"] == {"A": 1, "B": 1}
    assert set(summary["correlations"]) == {"all", "id", "code"}
    assert summary["correlations"]["all"]["memorization~steps_to_50pct"]["ci_low"] == r.ci_low
    assert summary["per_kind"]["code"]["reached_50pct"] == pytest.approx(2 / 3)
    text = mem_report.findings_markdown(table, corr, 10, 2.0)
    assert "memorization, all kinds pooled: ρ = " in text and "memorization, within id: ρ = -1.00" in text
    assert "cannot redraw that set's models" in text and "raw steps grow with memorization by construction" in text
    assert mem_report.interval_widths(corr).index.tolist() == ["all", "id", "code"]
    fig = plots.plot_memorization_endpoint_correlations(table, corr, 10)
    fig.canvas.draw()
    assert fig._suptitle.get_text() and all(ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
                                            for ax in fig.axes)
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "all kinds pooled" in legends and "within OOD: Python code" in legends
    import matplotlib.pyplot as plt
    plt.close(fig)

# --------------------------------------------------------------------------------------------------- pool

def test_pool_is_new_examples_of_each_kind(small_data, small_params):
    # code takes the same path as language (only the source differs) and is the slowest source to window
    p = dict(small_params, mem_pool_size=10, forget_kinds=["id", "canary", "language"])
    pool = mem_pool.build_pool(p, small_data)
    assert pool.kind.value_counts().to_dict() == mem_pool.kind_counts(10, list(p["forget_kinds"]))
    assert pool.uid.is_unique and (pool.role == "pool").all()
    used = {tuple(i) for i in small_data.examples.ids}
    assert not any(tuple(i) in used for i in pool.ids)                # never a study example
    assert len({tuple(i) for i in pool.ids}) == len(pool)
    text = pool[pool.kind != "canary"]
    assert (text.n_tokens == p["example_tokens"]).all() and (text.score_start == 1).all()
    can = pool[pool.kind == "canary"]
    assert not set(can.secret) & set(small_data.select("canary").secret)
    assert (can.n_scored == p["canary_digits"]).all()
    guard = mem_pool._ngrams(small_data.heldout_rows[:mem_pool.GUARD_ROWS].reshape(-1).tolist(), mem_pool.GUARD_NGRAM)
    assert not any(mem_pool._ngrams(list(i), mem_pool.GUARD_NGRAM) & guard for i in pool[pool.kind == "id"].ids)
    canaries = dict(p, forget_kinds=["canary"], mem_pool_size=5)      # cheap (no text sources to read)
    assert (mem_pool.build_pool(canaries, small_data).secret.tolist()
            == mem_pool.build_pool(canaries, small_data).secret.tolist())
    with pytest.raises(mem_pool.MemorizationInputError, match="raise canary_digits"):
        mem_pool.build_pool(dict(canaries, mem_pool_size=10 ** p["canary_digits"]), small_data)


# ------------------------------------------------------------------------------------------------ imports

def test_memorization_modules_never_import_plots():
    """Studies compute and report; figures live in plots, which imports them, never the other way round."""
    package = Path(forgetlab.__file__).parent
    modules = sorted(package.glob("mem_*.py"))
    assert {m.stem for m in modules} >= {"mem_pool", "mem_models", "mem_unlearning", "mem_scores", "mem_report"}
    for path in modules:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {f"{node.module or ''}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not {i for i in imported if "plots" in i.split(".")}, f"{path.name} imports plots"


def test_the_pool_covers_the_shipped_kinds_only():
    """A custom kind (the user's file) has no spare examples: the pool skips it; no shipped kind is an error."""
    from forgetlab import mem_pool
    assert mem_pool.pool_kinds({"forget_kinds": ["id", "custom", "code"]}) == ["id", "code"]
    with pytest.raises(mem_pool.MemorizationInputError, match="needs at least one of id, canary"):
        mem_pool.pool_kinds({"forget_kinds": ["custom"]})
