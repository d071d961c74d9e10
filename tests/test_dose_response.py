"""Matched memorization (notebook 07): binning and overlap, the matched difference, its interval and verdicts on
hand-built tables, censoring, the fine-tuning rows, and cache keys that change with the insertion count."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from forgetlab import dose_matching as dm
from forgetlab import dose_response as dr
from forgetlab.config import load_params

# ------------------------------------------------------------------------------------ binning / overlap

def test_overlap_edges_cover_only_the_range_both_kinds_have():
    edges = dm.overlap_edges([0, 4, 10, 30], [6, 8, 20, 50], bins=2)
    assert edges.tolist() == [6.0, 18.0, 30.0]
    assert dm.overlap_edges([0, 1], [2, 3], bins=4) is None           # disjoint: no matched comparison
    assert dm.overlap_edges([], [2, 3], bins=4) is None
    with pytest.raises(ValueError, match="at least 1"):
        dm.overlap_edges([0, 1], [0, 1], bins=0)


def test_bin_index_keeps_the_top_edge_and_drops_the_outside():
    edges = np.array([0.0, 10.0, 20.0])
    assert dm._bin_index(np.array([-1.0, 0.0, 9.99, 10.0, 20.0, 20.5]), edges).tolist() == [-1, 0, 0, 1, 1, -1]


def test_matched_difference_on_two_lines_with_a_known_offset():
    # steps = 2 * GenEx for ID and 2 * GenEx + 5 for OOD: at equal GenEx, ID - OOD = -5 in every bin, whatever the
    # kinds' ranges. Unmatched means differ by much more because ID is memorized more strongly here.
    gid = np.array([10.0, 12.0, 14.0, 16.0, 30.0, 40.0])
    good = np.array([2.0, 4.0, 10.0, 12.0, 16.0])
    est, bins = dm.matched_difference(gid, 2 * gid, good, 2 * good + 5, dm.overlap_edges(gid, good, 1))
    # overlap [10, 16], one bin: ID {10,12,14,16} mean steps 26; OOD {10,12,16} mean 2*38/3+5
    assert est == pytest.approx(26 - (2 * 38 / 3 + 5))
    assert bins.n_a.tolist() == [4] and bins.n_b.tolist() == [3]
    # with bins narrow enough that each holds equal GenEx on both sides, the offset comes back exactly
    est2, bins2 = dm.matched_difference([10, 12, 16], [20, 24, 32], [10, 12, 16], [25, 29, 37],
                                        np.array([9.0, 11.0, 13.0, 17.0]))
    assert est2 == pytest.approx(-5.0)
    assert bins2.used.tolist() == [True, True, True]


def test_bins_are_weighted_by_n_a_n_b_over_n_a_plus_n_b():
    # bin 0: ID 1 example (steps 10), OOD 1 (steps 20): diff -10, weight 1/2
    # bin 1: ID 2 examples (steps 4, 6), OOD 2 (steps 1, 3): diff 3, weight 1
    est, bins = dm.matched_difference([1, 6, 7], [10, 4, 6], [2, 6, 8], [20, 1, 3], np.array([0.0, 5.0, 10.0]))
    assert bins.weight.tolist() == [0.5, 1.0]
    assert est == pytest.approx((0.5 * -10 + 1 * 3) / 1.5)


def test_a_bin_without_enough_examples_of_one_arm_is_left_out():
    est, bins = dm.matched_difference([1, 6, 7], [10, 4, 6], [2, 6, 8], [20, 1, 3], np.array([0.0, 5.0, 10.0]),
                                      min_per_arm=2)
    assert bins.used.tolist() == [False, True] and est == pytest.approx(3.0)
    est, _ = dm.matched_difference([1], [10], [2], [20], np.array([0.0, 5.0]), min_per_arm=2)
    assert math.isnan(est)


# ------------------------------------------------------------------------------ interval and verdicts

def endpoint_table(offset: float, counts=(1, 2, 5, 10), per=4, censor_at: float | None = None) -> pd.DataFrame:
    """ID and OOD examples at several counts on lines steps = 2 * initial (+ offset for OOD); initial GenEx grows
    with the count, OOD less steeply (so raw means differ even without an offset)."""
    rows = []
    for c in counts:
        for kind, slope in (("id", 4.0), ("canary", 2.0)):
            for i in range(per):
                initial = slope * c + i
                steps = 2 * initial + (offset if kind == "canary" else 0.0)
                cens = censor_at is not None and steps >= censor_at
                rows.append({"count": c, "kind": kind, "seed": 0, "uid": f"{kind}-{c}-{i}", "initial": initial,
                             "steps_to_target": min(steps, censor_at) if censor_at else steps, "censored": cens,
                             "steps_to_50pct": steps / 2, "censored_50pct": False})
    return pd.DataFrame(rows)


def test_matched_interval_recovers_the_offset_and_the_verdict_agrees():
    t = endpoint_table(offset=6.0)
    interval, bins = dm.matched_interval(t[t.kind == "id"], t[t.kind == "canary"], "steps_to_target", bins=20,
                                         resamples=200, rng_seed=1)
    assert interval.estimate < 0 and interval.high < 0
    assert interval.n_seeds == 4 and interval.n_units == len(t)
    assert bins.used.sum() >= 2
    # the estimate is the bins' difference: lines differ by 6 at equal initial, plus within-bin spread
    assert -6.0 - 2 * (bins.high - bins.low).max() <= interval.estimate <= -6.0 + 2 * (bins.high - bins.low).max()
    from forgetlab.intervals import verdict
    assert verdict(interval, "negative") == "agrees"


def test_no_offset_gives_a_matched_difference_near_zero_while_the_unmatched_one_is_large():
    t = endpoint_table(offset=0.0, per=6)
    verdicts, bins = dm.verdict_table(t, bins=12, resamples=200, rng_seed=2, measures=("steps_to_target",))
    m = verdicts[verdicts.comparison == "matched"].iloc[0]
    u = verdicts[verdicts.comparison == "unmatched"].iloc[0]
    assert abs(m.estimate) < abs(u.estimate) / 4
    # unmatched: ID is memorized twice as much, so it needs more steps: ID - OOD > 0, "disagrees" with the claim
    assert u.estimate > 0 and u.verdict == "disagrees"
    assert m.verdict in ("inconclusive", "agrees", "disagrees") and m.low <= m.estimate <= m.high
    assert set(bins.kind) == {"canary"} and bins.used.any()


def test_the_unmatched_comparison_pairs_only_the_counts_both_kinds_kept():
    """A count where one kind kept no example (found with the classroom profile) leaves both arms, not the run."""
    t = endpoint_table(offset=0.0, per=6)
    counts = sorted(t["count"].unique())
    dropped = t[~((t.kind == "canary") & (t["count"] == counts[1]))]
    got = dm.unmatched_interval(dropped[dropped.kind == "id"], dropped[dropped.kind == "canary"], "steps_to_target",
                                resamples=200, rng_seed=2)
    kept = t[t["count"] != counts[1]]
    want = dm.unmatched_interval(kept[kept.kind == "id"], kept[kept.kind == "canary"], "steps_to_target",
                                 resamples=200, rng_seed=2)
    assert got == want and math.isfinite(got.estimate)
    nan_rows = t.copy()
    nan_rows.loc[(nan_rows.kind == "canary") & (nan_rows["count"] == counts[1]), "steps_to_target"] = np.nan
    assert dm.unmatched_interval(nan_rows[nan_rows.kind == "id"], nan_rows[nan_rows.kind == "canary"],
                                 "steps_to_target", resamples=200, rng_seed=2) == want
    none = dm.unmatched_interval(t[(t.kind == "id") & (t["count"] == counts[0])],
                                 t[(t.kind == "canary") & (t["count"] == counts[1])], "steps_to_target", resamples=10)
    assert math.isnan(none.estimate) and none.n_units == 0


def test_disjoint_ranges_are_not_measurable():
    t = endpoint_table(offset=0.0)
    t.loc[t.kind == "canary", "initial"] -= 1000
    verdicts, bins = dm.verdict_table(t, resamples=50, measures=("steps_to_target",))
    m = verdicts[verdicts.comparison == "matched"].iloc[0]
    assert m.verdict == "not measurable" and m.bins_used == 0 and bins.empty


def test_censored_steps_count_at_the_budget_and_nan_rows_are_left_out():
    t = endpoint_table(offset=6.0, censor_at=40.0)
    assert t.censored.any() and t.steps_to_target.max() == 40.0
    a, b = t[t.kind == "id"], t[t.kind == "canary"]
    est, _ = dm.matched_difference(a.initial, a.steps_to_target, b.initial, b.steps_to_target,
                                   dm.overlap_edges(a.initial, b.initial, 3))
    interval, _ = dm.matched_interval(a, b, "steps_to_target", bins=3, resamples=50)
    assert interval.estimate == pytest.approx(est)
    b = b.assign(steps_to_target=np.where(b.initial > 15, np.nan, b.steps_to_target))  # nothing to remove: NaN
    interval2, bins2 = dm.matched_interval(a, b, "steps_to_target", bins=3, resamples=50)
    assert bins2.high.max() <= 15 and np.isfinite(interval2.estimate)


def test_endpoints_and_targets_from_a_tidy_dose_table():
    # two counts, one kind; forget GenEx falls 10 -> 4 -> 0.5 over steps 0, 1, 2; controls at step 0: |0.2|, |1.5|
    rows = []
    for c in (1, 4):
        for step, v in zip((0, 1, 2), (10.0 * c, 4.0 * c, 0.5)):
            rows.append({"count": c, "kind": "id", "seed": 0, "uid": "f", "role": "forget", "step": step,
                         "metric": "genex_seed_bits", "value": v, "method": "ga"})
        for uid, v in (("c1", 0.2), ("c2", -1.5)):
            rows.append({"count": c, "kind": "id", "seed": 0, "uid": uid, "role": "control", "step": 0,
                         "metric": "genex_seed_bits", "value": v, "method": "ga"})
    table = pd.DataFrame(rows)
    targets = dm.kind_targets(table, minimum=1.0, quantile=1.0, calibrated=False)      # raw GenEx
    assert targets == {"id": 1.5}
    ends = dm.dose_endpoints(table, targets, calibrated=False).set_index("count")
    assert ends.initial.tolist() == [10.0, 40.0]
    assert ends.steps_to_target.tolist() == [2.0, 2.0] and not ends.censored.any()
    assert ends.steps_to_50pct.tolist() == [1.0, 1.0]
    assert dm.kind_targets(table, minimum=3.0, quantile=1.0, calibrated=False) == {"id": 3.0}
    # calibrated (the default): the controls' mean, -0.65, is every count's offset; they sit at -/+0.85
    assert dm.kind_targets(table, minimum=0.0, quantile=1.0) == pytest.approx({"id": 0.85})
    cal = dm.dose_endpoints(table, {"id": 1.0}).set_index("count")
    assert cal.offset.tolist() == pytest.approx([-0.65, -0.65])
    assert cal.initial.tolist() == pytest.approx([10.65, 40.65])
    assert cal.steps_to_target.tolist() == [2.0, 2.0]      # 0.5 + 0.65 = 1.15 at step 2: censored at step 2
    assert cal.censored.tolist() == [True, True]


# ---------------------------------------------------------------------------- models and cache keys

def test_finetune_rows_insert_each_example_count_times():
    ex = pd.DataFrame({"role": ["forget", "forget", "twin"], "ids": [[0, 5, 6], [0, 7], [0, 8, 9]]})
    shared = np.arange(8).reshape(2, 4)
    ids, labels = dr.finetune_rows(ex, "forget", 3, shared, block=4, pad=0)
    assert ids.shape == (2 + 6, 4)
    assert ids[2:5].tolist() == [[0, 5, 6, 0]] * 3 and ids[5:].tolist() == [[0, 7, 0, 0]] * 3
    assert labels[2].tolist() == [0, 5, 6, -100]
    ids, _ = dr.finetune_rows(ex, "twin", 2, shared, block=4, pad=0)
    assert ids[2:].tolist() == [[0, 8, 9, 0]] * 2
    ids, _ = dr.finetune_rows(ex, None, 5, shared, block=4, pad=0)
    assert ids.tolist() == shared.tolist()


class _Data:
    def fingerprint(self) -> str:
        return "fp"


def test_the_model_key_changes_with_the_count_the_role_and_the_examples():
    p = load_params("smoke")
    ex = pd.DataFrame({"role": ["forget", "twin"], "ids": [[0, 1], [0, 2]]})
    k = {(role, c): dr.dose_model_key(p, _Data(), "base", ex, role, c) for role in ("original", "reference")
         for c in (1, 2)}
    assert len(set(k.values())) == 4
    other = ex.assign(ids=[[0, 3], [0, 2]])                                # another forget example
    assert dr.dose_model_key(p, _Data(), "base", other, "original", 1) != k[("original", 1)]
    assert dr.dose_model_key(p, _Data(), "base", other, "reference", 1) == k[("reference", 1)]
    # the analysis-only and unlearning-only parameters do not touch the models
    q = dict(p, dose_insertions=[1, 2, 3, 4], dose_unlearn_steps=99, bootstrap=77)
    assert dr.dose_model_key(q, _Data(), "base", ex, "original", 1) == k[("original", 1)]
    r = dict(p, mem_finetune_epochs=2.0)
    assert dr.dose_model_key(r, _Data(), "base", ex, "original", 1) != k[("original", 1)]


def test_dose_kinds_need_id_and_an_ood_kind():
    assert dr.dose_kinds({"forget_kinds": ["id", "code", "custom"]}) == ["id", "code"]
    with pytest.raises(dr.DoseInputError, match="needs id"):
        dr.dose_kinds({"forget_kinds": ["canary", "code"]})
    with pytest.raises(dr.DoseInputError, match="at least one"):
        dr.dose_kinds({"forget_kinds": ["id", "custom"]})


def test_no_cache_key_reads_the_insertion_counts():
    # a grid unit holds one count of dose_insertions: every entry it shares with the full run must keep its key
    from forgetlab.experiment import data_key, model_key
    p = load_params("smoke")
    one = dict(p, dose_insertions=[4])
    ex = pd.DataFrame({"role": ["forget", "twin"], "ids": [[0, 1], [0, 2]]})
    assert data_key(one) == data_key(p)
    assert dr.examples_key(one, _Data()) == dr.examples_key(p, _Data())
    assert model_key(one, "fp", "reference", 1) == model_key(p, "fp", "reference", 1)
    for role in ("original", "reference"):
        assert dr.dose_model_key(one, _Data(), "base", ex, role, 4) == dr.dose_model_key(p, _Data(), "base", ex,
                                                                                            role, 4)
    assert dr.dose_model_key(one, _Data(), "base", ex, "original", 4) != dr.dose_model_key(p, _Data(), "base", ex,
                                                                                            "original", 16)


# ------------------------------------------------------------------------------ the grid as a sweep

def test_the_grid_is_a_sweep_with_one_unit_per_count(tmp_path):
    from forgetlab import dose_grid
    from forgetlab.sweep import load_sweep
    p = load_params("smoke", {"dose_insertions": [16, 1, 4]})
    sweep = dose_grid.grid_sweep(p, tmp_path)
    assert sweep.root == (tmp_path / "07_dose_sweep").resolve() and sweep.stages == ("dose",)
    assert [u.swept for u in sweep.units] == [{"dose_insertions": [c]} for c in (1, 4, 16)]
    assert [u.params for u in sweep.units] == [dict(p, dose_insertions=[c]) for c in (1, 4, 16)]
    assert sweep.units[0].unit_id.startswith("dose_insertions-1-")
    # the files stay, so the same sweep runs from the command line; writing it again changes nothing
    files = {f: (sweep.root / f).stat().st_mtime_ns for f in ("sweep.yaml", "base.yaml")}
    again = dose_grid.grid_sweep(p, tmp_path)
    assert [u.unit_id for u in again.units] == [u.unit_id for u in sweep.units]
    assert {f: (sweep.root / f).stat().st_mtime_ns for f in files} == files
    assert [u.unit_id for u in load_sweep(sweep.root / "sweep.yaml", tmp_path).units] == \
        [u.unit_id for u in sweep.units]
    # another parameter, other units (their ids hash every parameter)
    other = dose_grid.grid_sweep(dict(p, dose_unlearn_steps=p["dose_unlearn_steps"] + 1), tmp_path)
    assert not {u.unit_id for u in other.units} & {u.unit_id for u in sweep.units}
    with pytest.raises(dr.DoseInputError, match="executor = 'threads' is invalid"):
        dose_grid.run_dose_grid(p, None, tmp_path, executor="threads")


def test_a_unit_computed_by_other_code_is_dropped_not_read(tmp_path):
    from forgetlab import dose_grid, sweep_store
    sweep = dose_grid.grid_sweep(load_params("smoke"), tmp_path)
    code = dose_grid.loaded_code()
    modules = code.modules[0].split()
    assert {"__init__", "dose_grid", "dose_response", "engine"} <= set(modules)
    for i, u in enumerate(sweep.units):                      # unit 0: this code; unit 1: a changed module; 2: none
        tmp = sweep_store.new_unit_dir(sweep.units_dir, u.unit_id)
        if i < 2:
            code.assign(version=code.version if i == 0 else "012345678901").to_csv(tmp / "code.csv", index=False)
        sweep_store.commit_unit(tmp, sweep.units_dir, u.unit_id, {"index": i})
    assert dose_grid.drop_stale_units(sweep) == [u.unit_id for u in sweep.units[1:]]
    assert [sweep_store.read_done(sweep.units_dir, u.unit_id) is not None for u in sweep.units] == [True, False, False]
    assert dose_grid.drop_stale_units(sweep) == []


def _entries(root) -> set[str]:
    return {str(m.parent.relative_to(root)) for m in root.glob("*/*/meta.json") if not m.parts[-3].startswith(".")}


@pytest.mark.slow
def test_the_grid_gives_the_sequential_table_bit_for_bit_resumes_and_shares_the_cache(tmp_path, monkeypatch):
    import shutil

    from forgetlab import dose_grid, mem_models
    from forgetlab.cache import ArtifactCache
    from forgetlab.experiment import get_study_data
    p = load_params("smoke", {"max_train_tokens": 20000, "vocab_size": 400, "population_size": 8,
                              "background_size": 4, "forget_size": 3, "control_size": 2, "epochs": 0.5,
                              "reference_seeds": [1], "original_seeds": [0], "forget_kinds": ["id", "canary"],
                              "dose_insertions": [3, 1], "dose_forget_size": 2, "dose_unlearn_steps": 3})
    # the sequential path, in this process, in cache A
    a = tmp_path / "cache-a"
    cache = ArtifactCache(a)
    data = get_study_data(p, cache)
    examples = dr.get_dose_examples(p, data, cache)
    models = dr.get_dose_models(p, data, examples, mem_models.get_base_model(p, data, cache), cache)
    expected = dr.run_dose_study(p, data, examples, models, cache)
    expected_models = dr.model_table(models)
    # the grid in cache B: the same data and base model, but every dose model and trajectory built by the workers
    b = tmp_path / "cache-b"
    for kind in a.iterdir():
        if kind.name not in ("dose-models", "trajectory", ".locks"):
            shutil.copytree(kind, b / kind.name)
    monkeypatch.setenv("FORGETLAB_CACHE", str(b))
    grid = dose_grid.run_dose_grid(p, data, tmp_path / "run", executor="local", workers=2, progress=False)
    assert "2 finished (0 from earlier runs), ran 2" in grid.report
    pd.testing.assert_frame_equal(grid.results, expected, check_exact=True)
    assert np.array_equal(grid.results.value.to_numpy(), expected.value.to_numpy(), equal_nan=True)
    pd.testing.assert_frame_equal(grid.models, expected_models, check_exact=True)
    assert set(grid.results["count"]) == {1, 3}
    # the units' summaries are the sweep's collected table
    results = pd.read_csv(grid.sweep.results_path)
    assert set(results.dose_insertions) == {"[1]", "[3]"} and set(results.kind) == {"id", "canary"}
    # a rerun resumes: nothing recomputed, the same table
    done = {u.unit_id: (grid.sweep.units_dir / u.unit_id / "done.json").read_text() for u in grid.sweep.units}
    again = dose_grid.run_dose_grid(p, data, tmp_path / "run", executor="inline", progress=False)
    assert "2 finished (2 from earlier runs), ran 0" in again.report
    assert {uid: (grid.sweep.units_dir / uid / "done.json").read_text() for uid in done} == done
    pd.testing.assert_frame_equal(again.results, expected, check_exact=True)
    # in cache A, the grid's units find everything the sequential path built: no entry is built twice
    before = _entries(a)
    monkeypatch.setenv("FORGETLAB_CACHE", str(a))
    shared = dose_grid.run_dose_grid(p, data, tmp_path / "run-a", executor="inline", progress=False)
    assert _entries(a) == before
    pd.testing.assert_frame_equal(shared.results, expected, check_exact=True)
