"""Memorization and difficulty (mem_pool, mem_models, mem_scores, mem_report): the estimator, the split
bookkeeping, GenEx per example, the bootstrap."""
import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import forgetlab
from forgetlab import mem_models, mem_pool, mem_report, mem_scores
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
    assert list(s.n_in) == [2, 2] and list(s.n_out) == [2, 2]


def test_memorization_scores_need_both_sides_and_give_nan_se_with_one_model():
    ll = np.array([[-1.0], [-2.0]])
    with pytest.raises(mem_pool.MemorizationInputError, match="seen by 2 and unseen by 0"):
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


def test_bootstrap_rank_correlation():
    x = np.arange(10.0)
    rho, lo, hi, n = mem_scores.bootstrap_rank_correlation(x, x ** 3, resamples=200, seed=0)
    assert (rho, lo, hi, n) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), 10)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    r1 = mem_scores.bootstrap_rank_correlation(a, b, resamples=300, seed=5)
    assert r1 == mem_scores.bootstrap_rank_correlation(a, b, resamples=300, seed=5)   # seeded
    assert r1[1] <= r1[0] <= r1[2] and r1[1] < 0 < r1[2]
    assert mem_scores.bootstrap_rank_correlation([1, 2, np.nan, 4], [1, 2, 3, np.nan], 50)[3] == 2
    assert math.isnan(mem_scores.bootstrap_rank_correlation([1, 2], [2, 1], 50)[0])


def test_correlation_table_and_findings_are_written_from_the_table():
    rng = np.random.default_rng(0)
    n = 12
    mem = rng.normal(size=n)
    table = pd.DataFrame({"uid": [f"u{i}" for i in range(n)], "kind": ["id"] * 6 + ["code"] * 6,
                          "memorization": mem, "memorization_se": 0.1, "difficulty": -mem + rng.normal(0, .1, n),
                          "initial_genex_bits": 3.0, "n_in": 2, "n_out": 2,
                          "steps_to_unlearn": np.where(np.arange(n) < 10, np.arange(n), np.nan),
                          "reached": np.arange(n) < 10,
                          "ppl_increase_at_target": np.where(np.arange(n) < 10, 1.0 * np.arange(n), np.nan)})
    table["steps_censored"] = table.steps_to_unlearn.fillna(20)
    corr = mem_scores.correlation_table(table, resamples=100)
    assert set(corr.kind) == {"all", "id", "code"} and len(corr) == 3 * len(mem_scores.CORR_PAIRS)
    md = corr[(corr.kind == "all") & (corr.x == "memorization") & (corr.y == "difficulty")].iloc[0]
    assert md.spearman < -0.9 and md.ci_high < 0 and md.n == n
    util = corr[(corr.kind == "all") & (corr.y == "ppl_increase_at_target")]
    assert (util.n == 10).all()                                        # only examples that reached the target
    text = mem_report.findings_markdown(table, corr, max_steps=19, target_bits=1.0)
    assert "memorization vs difficulty: ρ = " in text and "12 pool examples" in text
    assert "the more memorized an example, the less difficult it was" in text
    shown = mem_report.correlation_display(corr)
    assert list(shown.columns) == ["all", "id", "code"] and len(shown) == len(mem_scores.CORR_PAIRS)
    assert shown.loc["memorization vs difficulty", "all"].startswith(f"{md.spearman:.2f} [")
    summary = mem_report.findings(table, corr, 19, 1.0)
    assert summary["correlations"]["memorization~difficulty"]["n"] == n
    assert summary["reached_fraction"] == pytest.approx(10 / 12)


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
