"""Intervals, verdicts, endpoints and survival curves on tiny hand-built tables with hand-computed answers."""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from forgetlab import intervals as iv
from forgetlab import survival as sv


def table(values_by_seed: dict, **extra) -> pd.DataFrame:
    """One row per (seed, example): {seed: [values]} -> columns seed, uid, value (+ constant extras)."""
    rows = [{"seed": s, "uid": f"x{i}", "value": float(v), **extra}
            for s, vals in values_by_seed.items() for i, v in enumerate(vals)]
    return pd.DataFrame(rows)


def recording_mean(seen: list[float]):
    """A mean that records every value it returns: the bootstrap estimates, for counting them."""
    def stat(v: np.ndarray) -> float:
        seen.append(float(np.mean(v)))
        return seen[-1]
    return stat


# ------------------------------------------------------------------------------------------ bootstrap

def test_equal_values_collapse_the_interval():
    ci = iv.hierarchical_bootstrap(table({0: [7, 7, 7], 1: [7, 7, 7]}), "value", resamples=200)
    assert (ci.estimate, ci.low, ci.high) == (7.0, 7.0, 7.0)
    assert (ci.n_seeds, ci.n_units, ci.resamples) == (2, 3, 200)
    assert ci.contains(7.0) and not ci.contains(7.1)


def test_two_seeds_bound_the_interval_by_seed_resampling():
    # seed A all 0, seed B all 10: a resample draws AA, AB or BB -> means 0, 5, 10 (AA and BB each 1/4)
    df = table({0: [0, 0, 0], 1: [10, 10, 10]})
    seen: list[float] = []
    ci = iv.hierarchical_bootstrap(df, "value", statistic=recording_mean(seen), resamples=1000)
    assert set(seen) == {0.0, 5.0, 10.0}
    assert (ci.estimate, ci.low, ci.high) == (5.0, 0.0, 10.0)
    fast = iv.hierarchical_bootstrap(df, "value", resamples=1000)        # the weighted-mean path
    assert (fast.estimate, fast.low, fast.high) == (5.0, 0.0, 10.0)


def test_single_seed_resamples_examples_only():
    seen: list[float] = []
    ci = iv.hierarchical_bootstrap(table({3: [0, 3, 3]}), "value", resamples=500, statistic=recording_mean(seen))
    assert set(seen) == {0.0, 1.0, 2.0, 3.0}           # 0..3 copies of the value 3 among 3 draws, / 3
    assert ci.n_seeds == 1 and ci.estimate == 2.0 and 0.0 <= ci.low <= ci.high <= 3.0


def test_groups_move_together():
    # group g1 = {a: 0}, group g2 = {b: 3, c: 3}; drawing 2 groups gives means 0, (0+3+3)/3 = 2, or 3
    df = pd.DataFrame({"seed": 0, "uid": ["a", "b", "c"], "group": ["g1", "g2", "g2"], "value": [0.0, 3.0, 3.0]})
    seen: list[float] = []
    rec = recording_mean(seen)
    ci = iv.hierarchical_bootstrap(df, "value", group_col="group", statistic=rec, resamples=500)
    assert set(seen) == {0.0, 2.0, 3.0}                # never 1.0: b and c are never drawn apart
    assert ci.n_units == 2 and ci.estimate == 2.0
    fast = iv.hierarchical_bootstrap(df, "value", group_col="group", resamples=500)
    assert (fast.estimate, fast.low, fast.high) == (2.0, 0.0, 3.0)   # g1 twice and g2 twice: 1/4 each
    seen.clear()
    iv.hierarchical_bootstrap(df, "value", statistic=rec, resamples=500)  # per example: 0..3 threes of 3
    assert set(seen) == {0.0, 1.0, 2.0, 3.0}


def test_weighted_mean_path_matches_the_generic_path_bit_for_bit_in_distribution():
    df = table({0: [1, 2, 3, 4], 1: [5, 6, 7], 2: [8, 9]})
    a = iv.hierarchical_bootstrap(df, "value", resamples=400, rng_seed=5)
    b = iv.hierarchical_bootstrap(df, "value", resamples=400, rng_seed=5, statistic=lambda v: float(np.mean(v)))
    assert a.estimate == pytest.approx(b.estimate)
    assert a.low == pytest.approx(b.low) and a.high == pytest.approx(b.high)   # same draws, same statistic


def test_nan_rows_are_dropped_and_all_nan_is_not_measurable():
    df = table({0: [1, 1, math.nan], 1: [1, math.nan, 1]})
    assert iv.hierarchical_bootstrap(df, "value", resamples=50).estimate == 1.0
    ci = iv.hierarchical_bootstrap(table({0: [math.nan]}), "value", resamples=50)
    assert not ci.measurable and iv.verdict(ci, "positive") == "not measurable"


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="seed >= 0"):
        iv.hierarchical_bootstrap(table({-1: [1, 2], 0: [1, 2]}), "value")
    with pytest.raises(ValueError, match="inf"):
        iv.hierarchical_bootstrap(table({0: [1, math.inf]}), "value")
    with pytest.raises(KeyError, match="genex"):
        iv.hierarchical_bootstrap(table({0: [1]}), "genex")
    with pytest.raises(ValueError, match="resamples"):
        iv.hierarchical_bootstrap(table({0: [1]}), "value", resamples=0)


def test_paired_difference_shares_seeds():
    # per seed, arm a is exactly 10 above arm b, so with shared seeds every resample differs by 10;
    # unpaired seed draws would spread the difference over [0, 20]
    a = table({0: [10, 10, 10], 1: [20, 20, 20]})
    b = table({0: [0, 0], 1: [10, 10]})
    ci = iv.difference_interval(a, b, "value", resamples=500)
    assert (ci.estimate, ci.low, ci.high) == (10.0, 10.0, 10.0)
    assert ci.n_seeds == 2 and ci.n_units == 5
    with pytest.raises(ValueError, match="share original seeds"):
        iv.difference_interval(a, table({0: [0], 2: [1]}), "value")


def test_same_seed_same_interval_bit_for_bit():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"seed": np.repeat([0, 1, 2], 50), "uid": np.tile([f"u{i}" for i in range(50)], 3),
                       "value": rng.normal(size=150)})
    assert iv.hierarchical_bootstrap(df, "value", rng_seed=3) == iv.hierarchical_bootstrap(df, "value", rng_seed=3)
    assert iv.hierarchical_bootstrap(df, "value", rng_seed=3) != iv.hierarchical_bootstrap(df, "value", rng_seed=4)
    b = df.assign(value=df.value + 1)
    assert iv.difference_interval(df, b, "value", rng_seed=2) == iv.difference_interval(df, b, "value", rng_seed=2)


def test_two_thousand_resamples_of_a_few_thousand_rows_are_fast():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"seed": np.repeat([0, 1, 2], 1000), "uid": np.tile(np.arange(1000), 3),
                       "value": rng.normal(size=3000)})
    t = time.perf_counter()
    ci = iv.hierarchical_bootstrap(df, "value", resamples=2000)
    assert time.perf_counter() - t < 3.0         # ~0.1 s on a laptop core; loose for shared CI machines
    assert ci.low < ci.estimate < ci.high


def test_interval_table_per_group():
    df = pd.concat([table({0: [1, 1], 1: [1, 1]}, kind="id"), table({0: [4, 4], 1: [4, 4]}, kind="code")])
    out = iv.interval_table(df, ["kind"], "value", resamples=100)
    assert out.kind.tolist() == ["id", "code"]
    assert out.estimate.tolist() == [1.0, 4.0] and out.low.tolist() == [1.0, 4.0] and out.high.tolist() == [1.0, 4.0]


# ------------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("low, high, direction, expected", [
    (0.5, 2.0, "positive", "agrees"), (0.5, 2.0, "negative", "disagrees"),
    (-2.0, -0.5, "negative", "agrees"), (-2.0, -0.5, "positive", "disagrees"),
    (-0.5, 1.0, "positive", "inconclusive"), (-0.5, 1.0, "negative", "inconclusive"),
    (0.0, 1.0, "positive", "inconclusive"),            # touching 0 is containing 0
    (math.nan, math.nan, "positive", "not measurable"),
])
def test_verdict(low, high, direction, expected):
    est = (low + high) / 2
    assert iv.verdict(iv.Interval(est, low, high, 3, 10, 1000), direction) == expected


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError, match="positive"):
        iv.verdict(iv.Interval(1, 0, 2, 1, 1, 1), "up")


# ------------------------------------------------------------------------------------------ endpoints

STEPS = [0, 10, 20, 30]


def test_first_crossing():
    assert iv.first_crossing(STEPS, [5, 3, 1, 0.5], 2) == (20.0, False)
    assert iv.first_crossing(STEPS, [1, 3, 1, 0.5], 2) == (0.0, False)           # below target at step 0
    assert iv.first_crossing(STEPS, [5, 3, 1, 0.5], 0.1) == (30.0, True)         # never: censored at 30
    assert iv.first_crossing(STEPS, [5, 2, 2, 3], 2) == (30.0, True)             # exactly at target: strict
    assert iv.first_crossing([20, 0, 10], [1, 5, 3], 2) == (20.0, False)         # any step order
    assert iv.first_crossing(STEPS, [5, math.nan, 1, 0], 2) == (20.0, False)     # NaN never crosses


def test_steps_to_fraction_removed():
    v = [8, 6, 3, 1]
    assert iv.steps_to_fraction_removed(STEPS, v, 0.5) == (20.0, False)          # 3 < 4
    assert iv.steps_to_fraction_removed(STEPS, v, 0.9) == (30.0, True)           # 1 is not < 0.8
    assert iv.steps_to_fraction_removed(STEPS, [8, 4, 4, 4], 0.5) == (30.0, True)   # 4 is not < 4
    for initial in (0.0, -3.0):
        step, censored = iv.steps_to_fraction_removed(STEPS, [initial, -5, -6, -7], 0.5)
        assert math.isnan(step) and censored is False


def test_fraction_removed_per_step():
    v = [8, 6, 3, 1]                                     # fraction removed: 0, 1/4, 5/8, 7/8
    assert iv.fraction_removed_per_step(STEPS, v, 20) == pytest.approx(5 / 8 / 20)
    assert iv.fraction_removed_per_step(STEPS, v, 15) == pytest.approx(2 / 8 / 10)   # last step <= 15 is 10
    assert iv.fraction_removed_per_step(STEPS, v, 30, how="slope") == pytest.approx(15 / 500)
    assert math.isnan(iv.fraction_removed_per_step(STEPS, [0, -1, -2, -3], 30))
    assert math.isnan(iv.fraction_removed_per_step(STEPS, v, 5))
    assert iv.fraction_removed_per_step([5, 15], [4, 2], 20) == pytest.approx(0.5 / 10)   # per step since 5


def test_example_endpoints_per_example_and_seed():
    curves = {("id", 0, "a"): [8, 3, 1], ("id", 0, "b"): [1, 0.5, 0.2], ("id", 1, "a"): [8, 7, 6],
              ("code", 0, "c"): [-1, -2, -3]}
    rows = [{"kind": k, "seed": s, "uid": u, "step": st, "value": v}
            for (k, s, u), vals in curves.items() for st, v in zip([20, 0, 10], [vals[2], vals[0], vals[1]])]
    out = iv.example_endpoints(pd.DataFrame(rows), target={"id": 2.0, "code": 0.5}, rate_steps=10)
    out = out.set_index(["kind", "seed", "uid"])
    a0, b0, a1, c0 = (out.loc[k] for k in [("id", 0, "a"), ("id", 0, "b"), ("id", 1, "a"), ("code", 0, "c")])
    assert (a0.initial, a0.final, a0.last_step, a0.steps_to_target, a0.censored) == (8, 1, 20, 20, False)
    assert (a0.steps_to_50pct, a0.censored_50pct, a0.steps_to_90pct, a0.censored_90pct) == (10, False, 20, True)
    assert a0.fraction_removed_per_step == pytest.approx(5 / 8 / 10)
    assert (b0.steps_to_target, b0.censored, b0.steps_to_50pct, b0.censored_50pct) == (0, False, 20, False)
    assert (a1.steps_to_target, a1.censored, a1.steps_to_50pct, a1.censored_50pct) == (20, True, 20, True)
    assert (c0.steps_to_target, c0.censored) == (0, False)
    assert math.isnan(c0.steps_to_50pct) and not c0.censored_50pct and math.isnan(c0.fraction_removed_per_step)


def test_example_endpoints_refuses_ambiguous_tables():
    df = pd.DataFrame({"seed": 0, "uid": "a", "step": [0, 0], "value": [1.0, 2.0]})
    with pytest.raises(ValueError, match="one metric"):
        iv.example_endpoints(df, 1.0, by=["seed", "uid"])
    with pytest.raises(KeyError, match="canary"):
        iv.example_endpoints(df.assign(kind="canary").iloc[:1], {"id": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        iv.example_endpoints(df.iloc[:0], 1.0)


# ------------------------------------------------------------------------------------------- survival

def test_kaplan_meier_by_hand():
    # t=2: 5 at risk, 1 event -> 4/5 = 0.8; t=3: 4 at risk (the one censored at 3 still counts), 1 event
    # -> 0.8 * 3/4 = 0.6; t=5: 2 at risk, 1 event -> 0.3; t=8: 1 at risk, censored -> 0.3
    km = sv.survival_curve([2, 3, 3, 5, 8], [1, 1, 0, 1, 0])
    assert km.step.tolist() == [2, 3, 5, 8]
    assert km.at_risk.tolist() == [5, 4, 2, 1]
    assert km.events.tolist() == [1, 1, 1, 0] and km.censored.tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(km.survival, [0.8, 0.6, 0.3, 0.3])
    assert sv.median_survival(km) == 5
    np.testing.assert_allclose(sv.survival_at(km, [0, 2, 4, 5, 10]), [1, 0.8, 0.6, 0.3, 0.3])


def test_kaplan_meier_censored_before_any_event():
    # t=1: censored, survival stays 1; t=2: 2 at risk, 1 event -> 0.5; t=4: 1 at risk, 1 event -> 0
    km = sv.survival_curve([1, 2, 4], [False, True, True])
    np.testing.assert_allclose(km.survival, [1.0, 0.5, 0.0])
    assert km.at_risk.tolist() == [3, 2, 1]
    assert sv.median_survival(km) == 2                  # survival exactly 0.5 counts


def test_median_survival_never_and_empty():
    assert sv.median_survival(sv.survival_curve([10, 10], [0, 0])) == math.inf
    assert math.isnan(sv.median_survival(sv.survival_curve([], [])))
    assert sv.survival_curve([math.nan, 3], [1, 1]).at_risk.tolist() == [1]


def test_survival_curves_grouped():
    ep = pd.DataFrame({"kind": ["id", "id", "code", "code"], "method": "ga", "steps_to_target": [1, 3, 2, 2],
                       "censored": [False, True, False, False]})
    out = sv.survival_curves(ep)
    assert out[out.kind == "id"].survival.tolist() == [0.5, 0.5]
    assert out[out.kind == "code"].survival.tolist() == [0.0]


def endpoints(seeds: dict) -> pd.DataFrame:
    """{seed: [(steps, censored), ...]} -> an endpoints table."""
    return pd.DataFrame([{"seed": s, "uid": f"x{i}", "steps_to_target": float(t), "censored": c}
                         for s, ex in seeds.items() for i, (t, c) in enumerate(ex)])


def test_survival_band_from_seed_resampling():
    # seed A: all unlearned at step 2; seed B: all censored at 10. AA -> 0 after step 2, AB -> 0.5, BB -> 1
    ep = endpoints({0: [(2, False)] * 3, 1: [(10, True)] * 3})
    band = sv.survival_band(ep, [0, 1, 2, 5, 10], resamples=1000)
    np.testing.assert_allclose(band.survival, [1, 1, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(band.low, [1, 1, 0, 0, 0])
    np.testing.assert_allclose(band.high, [1, 1, 1, 1, 1])
    same = sv.survival_band(endpoints({0: [(5, False)] * 2, 1: [(5, False)] * 2}), [0, 4, 5, 9], resamples=200)
    np.testing.assert_allclose(band.low[:2], 1)
    np.testing.assert_allclose(np.c_[same.survival, same.low, same.high], [[1] * 3, [1] * 3, [0] * 3, [0] * 3])


def test_median_survival_interval_with_never_reached_resamples():
    ep = endpoints({0: [(2, False)] * 3, 1: [(10, True)] * 3})
    ci = sv.median_survival_interval(ep, resamples=1000)
    assert (ci.estimate, ci.low, ci.high) == (2.0, 2.0, math.inf)   # BB (1/4 of resamples) never reaches 0.5
    fast, slow = endpoints({0: [(2, False)] * 2, 1: [(2, False)] * 2}), endpoints({0: [(6, False)], 1: [(6, False)]})
    d = sv.median_survival_interval(fast, slow, resamples=200)
    assert (d.estimate, d.low, d.high) == (-4.0, -4.0, -4.0)
    assert iv.verdict(d, "negative") == "agrees"


# ---------------------------------------------------------------------------------------- noise floor

def test_noise_floor_target_and_within_noise():
    controls = [-1.0, 0.5, 2.0, -4.0, 3.0, math.nan]      # |.| = 0.5, 1, 2, 3, 4
    assert iv.noise_floor_target(controls, quantile=1.0) == 4.0
    assert iv.noise_floor_target(controls, quantile=0.5) == 2.0
    assert iv.noise_floor_target(controls, quantile=0.5, minimum=5.0) == 5.0
    with pytest.raises(ValueError, match="controls"):
        iv.noise_floor_target([math.nan])
    assert iv.within_noise([-1.0, 3.0, math.nan, 2.0], 2.0).tolist() == [True, False, False, True]
