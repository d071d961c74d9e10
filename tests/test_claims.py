"""Claims with intervals on hand-built study tables with hand-computed answers: endpoints and censoring, the
noise-floor target, utility at equal progress, each verdict case, the forest-plot input, the written summary."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from forgetlab import claims, plots_claims
from forgetlab.intervals import INTERVAL_WORDS

STEPS = [0, 2, 4, 6]
# per kind: held-out loss (nats/token) and code-population loss per step of that kind's run
FLAT = ([1.0] * 4, [2.0] * 4)


def study_table(forget: dict, controls: dict | None = None, util: dict | None = None, seeds=(0, 1),
                method: str = "ga") -> pd.DataFrame:
    """forget: kind -> list of per-example GenEx trajectories (the same for every seed unless a dict seed ->
    list); controls: kind -> step-0 control GenEx values (the same for every seed unless a dict seed -> list;
    control i has value - step at later steps); util: kind -> (heldout loss, code loss)."""
    rows = []
    for kind, traj in forget.items():
        for seed in seeds:
            per = traj[seed] if isinstance(traj, dict) else traj
            for i, values in enumerate(per):
                rows += [{"step": s, "seed": seed, "uid": f"{kind}-{i}", "role": "forget", "metric": "genex_seed_bits",
                          "value": v, "kind": kind, "method": method} for s, v in zip(STEPS, values)]
            ctl = (controls or {}).get(kind, [0.5, -0.5])
            for i, v in enumerate(ctl[seed] if isinstance(ctl, dict) else ctl):
                rows += [{"step": s, "seed": seed, "uid": f"{kind}-c{i}", "role": "control",
                          "metric": "genex_seed_bits", "value": v if s == 0 else v - s, "kind": kind,
                          "method": method} for s in STEPS]
            held, code = (util or {}).get(kind, FLAT)
            for s, h, c in zip(STEPS, held, code):
                rows += [{"step": s, "seed": seed, "uid": "", "role": "model", "metric": "heldout_ppl",
                          "value": math.exp(h), "kind": kind, "method": method},
                         {"step": s, "seed": seed, "uid": "", "role": "model", "metric": "loss_code", "value": c,
                          "kind": kind, "method": method}]
    return pd.DataFrame(rows)


FAST = [10.0, 4.0, 0.2, -1.0]        # below 0.5 bits at step 4, half of 10 removed (< 5) at step 2
SLOW = [10.0, 8.0, 6.0, 4.0]         # never below 0.5 bits (censored at 6), half removed (< 5) at step 6
NEVER_HALF = [10.0, 9.0, 8.0, 7.0]   # never half removed: censored at 6


def test_noise_floor_is_the_controls_95th_percentile_of_abs_genex_at_step_0_per_kind():
    t = study_table({"id": [FAST], "code": [FAST]}, controls={"id": [0.5, -0.5], "code": [2.0, -2.0]})
    assert claims.noise_floors(t) == {"id": pytest.approx(0.5), "code": pytest.approx(2.0)}


# Calibration: original seed 0 models ID text 18 bits worse than the references, seed 1 2 bits better. The
# controls' mean at step 0 is that offset; each example is measured against its own (kind, seed)'s controls.
OFFSET_CONTROLS = {0: [-21.0, -15.0, -18.0, -18.0], 1: [1.0, 3.0, 2.0, 2.0]}     # means -18 and +2
OFFSET_FORGET = {0: [[-8.0, -12.0, -15.0, -20.0]],     # calibrated 10, 6, 3, -2: at the floor (3) at step 4
                 1: [[12.0, 9.0, 6.0, 4.0]]}           # calibrated 10, 7, 4, 2: below it at step 6


def test_control_offsets_are_each_kind_and_seeds_mean_control_genex_at_step_0():
    t = study_table({"id": OFFSET_FORGET}, controls={"id": OFFSET_CONTROLS})
    o = claims.control_offsets(t).set_index("seed")
    assert o.offset.tolist() == [-18.0, 2.0] and o.controls.tolist() == [4, 4]
    cal = claims.calibrate(claims.start_controls(t), claims.control_offsets(t)).sort_values(["seed", "uid"])
    assert cal.value.tolist() == [-3.0, 3.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0]


def test_noise_floor_pools_calibrated_controls_over_seeds_at_least_the_minimum():
    t = study_table({"id": OFFSET_FORGET}, controls={"id": OFFSET_CONTROLS})
    # |calibrated| sorted: 0 0 0 0 1 1 3 3; 95th percentile (linear, position 6.65) = 3
    assert claims.noise_floors(t) == {"id": pytest.approx(3.0)}
    assert claims.noise_floors(t, minimum=5.0) == {"id": 5.0}
    # the old, raw floor: |raw| sorted 1 2 2 3 15 18 18 21 -> 18 + 0.65 * 3 = 19.95: the -18 offset inflates it
    assert claims.noise_floors(t, calibrated=False) == {"id": pytest.approx(19.95)}


def test_each_example_is_unlearned_when_its_calibrated_genex_reaches_the_floor():
    t = study_table({"id": OFFSET_FORGET}, controls={"id": OFFSET_CONTROLS})
    e = claims.endpoints(t).set_index("seed")
    assert e.target.tolist() == [3.0, 3.0] and e.offset.tolist() == [-18.0, 2.0]
    assert e.initial.tolist() == [10.0, 10.0] and e.final.tolist() == [-2.0, 2.0]
    # seed 0 reaches exactly 3 (= the floor: "to or below") at step 4; seed 1 goes below it at step 6
    assert e.steps_to_target.tolist() == [4, 6] and not e.censored.any()
    # half of the calibrated initial 10 (< 5): step 4 (3) and step 4 (4); 90% (< 1): seed 0 at 6, seed 1 never
    assert e.steps_to_50pct.tolist() == [4, 4]
    assert e.steps_to_90pct.tolist() == [6, 6] and e.censored_90pct.tolist() == [False, True]
    # the raw definition counted seed 0's example as unlearned before any step, and had nothing to remove
    raw = claims.endpoints(t, calibrated=False).set_index("seed")
    assert raw.steps_to_target.tolist() == [0, 0] and math.isnan(raw.loc[0, "steps_to_50pct"])


def test_progress_and_calibration_need_controls_for_every_kind_and_seed():
    t = study_table({"id": OFFSET_FORGET}, controls={"id": OFFSET_CONTROLS},
                    util={"id": ([1.0, 1.5, 2.0, 2.5], [2.0] * 4)})
    p = claims.at_progress(t, 0.5).set_index("seed")
    # both half removed at step 4: calibrated 10 -> 3 (7 bits) and 10 -> 4 (6 bits); held-out + code loss lost 0.5
    assert p.removed_bits.tolist() == [7.0, 6.0] and p.genex_then.tolist() == [3.0, 4.0]
    assert p.utility_lost.tolist() == pytest.approx([0.5, 0.5])
    missing = study_table({"id": OFFSET_FORGET}, controls={"id": {0: OFFSET_CONTROLS[0], 1: []}})
    with pytest.raises(KeyError, match="calibrated=False"):
        claims.endpoints(missing)


def test_endpoints_per_example_and_seed_with_censoring():
    t = study_table({"id": [FAST, SLOW]})
    e = claims.endpoints(t).set_index(["seed", "uid"])
    assert len(e) == 4 and (e.target == 0.5).all()
    fast, slow = e.loc[(0, "id-0")], e.loc[(0, "id-1")]
    assert (fast.steps_to_target, fast.censored, fast.steps_to_50pct, fast.steps_to_90pct) == (4, False, 2, 4)
    assert (slow.steps_to_target, slow.censored) == (6, True)          # censored at the last step
    assert (slow.steps_to_50pct, slow.censored_50pct) == (6, False)    # 4 < 5 at step 6
    assert (slow.steps_to_90pct, slow.censored_90pct) == (6, True)


def test_utility_table_general_loss_is_the_mean_of_heldout_and_population_losses():
    t = study_table({"id": [FAST]}, util={"id": ([1.0, 1.5, 2.0, 2.5], [2.0, 2.0, 3.0, 2.0])})
    u = claims.utility_table(t).query("seed == 0").set_index("step")
    assert u.heldout_loss.tolist() == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert u.general_loss.tolist() == pytest.approx([1.5, 1.75, 2.5, 2.25])
    lost = claims.utility_lost(t).query("seed == 0").utility_lost.tolist()
    assert lost == pytest.approx([0.0, 0.25, 1.0, 0.75])


def test_utility_measured_every_kth_step_is_interpolated_linearly_in_the_step():
    # utility measured at steps 0 and 6 only (utility_every 6), membership AUC at every recorded step:
    # held-out loss 1.0 -> 2.5 gives 1.5 at step 2 and 2.0 at step 4; code loss 2.0 throughout
    dense = study_table({"id": [FAST]}, util={"id": ([1.0, 1.5, 2.0, 2.5], [2.0, 2.0, 2.0, 2.0])})
    auc = dense[dense.metric == "loss_code"].assign(metric="membership_auc", value=0.7)
    sparse = pd.concat([dense[~((dense.role == "model") & dense.step.isin([2, 4]))], auc], ignore_index=True)
    u = claims.utility_table(sparse).query("seed == 0").set_index("step")
    assert u.heldout_loss.tolist() == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert u.general_loss.tolist() == pytest.approx([1.5, 1.75, 2.0, 2.25])
    assert u.membership_auc.tolist() == pytest.approx([0.7] * 4)              # not touched
    # C3 reads the interpolated utility at FAST's half step (2): the dense table's 0.25
    p = claims.at_progress(sparse, 0.5).query("seed == 0").set_index("uid")
    assert p.loc["id-0", "utility_lost"] == pytest.approx(0.25)
    # nothing is extrapolated past the last measured step
    late = sparse[~((sparse.role == "model") & (sparse.step == 6) & (sparse.metric != "membership_auc"))]
    assert math.isnan(claims.utility_table(late).query("seed == 0 and step == 6").general_loss.iloc[0])


def test_at_progress_reads_utility_lost_at_each_examples_half_step():
    t = study_table({"id": [FAST, SLOW, NEVER_HALF]}, util={"id": ([1.0, 1.5, 2.0, 2.5], [2.0] * 4)})
    p = claims.at_progress(t, 0.5).query("seed == 0").set_index("uid")
    # FAST: half at step 2, removed 10 - 4 = 6 bits, general loss lost 0.25 -> 0.25 / 6 per bit
    assert (p.loc["id-0", "progress_step"], p.loc["id-0", "removed_bits"]) == (2, 6.0)
    assert p.loc["id-0", "utility_lost"] == pytest.approx(0.25)
    assert p.loc["id-0", "utility_lost_per_bit"] == pytest.approx(0.25 / 6)
    # SLOW: half at step 6 (4 < 5), removed 6 bits, lost 0.75
    assert p.loc["id-1", "utility_lost_per_bit"] == pytest.approx(0.75 / 6)
    # NEVER_HALF: censored at 6, removed 3 bits by then
    assert p.loc["id-2", "progress_censored"] and p.loc["id-2", "removed_bits"] == 3.0


def test_claims_agree_when_every_interval_lies_on_the_claimed_side_and_count_censoring():
    # ID fast, code slow (never reaches the floor: censored). ID loses more utility by its half step.
    t = study_table({"id": [FAST, FAST], "code": [SLOW, SLOW]},
                    util={"id": ([1.0, 2.0, 3.0, 4.0], [2.0] * 4), "code": FLAT})
    c = claims.claims_table(t, utilities=["general_loss"], resamples=200).set_index("measure")
    steps = c.loc["steps_to_target"]
    # restricted mean: ID 4 steps, code 6 (censored at the budget) -> -2 with no spread at all
    assert (steps.id_estimate, steps.ood_estimate, steps.estimate) == (4.0, 6.0, -2.0)
    assert (steps.low, steps.high, steps.verdict) == (-2.0, -2.0, "agrees")
    assert (steps.id_censored, steps.ood_censored) == (0.0, 1.0)
    assert steps.median_estimate == -math.inf            # code's median is never reached
    half = c.loc["steps_to_50pct"]
    assert (half.estimate, half.verdict) == (2.0 - 6.0, "agrees")
    # C3: ID lost (general loss: mean of held-out and code loss) 0.5 by step 2; code's run lost nothing
    c3 = c.loc["utility_lost@general_loss"]
    assert (c3.id_estimate, c3.ood_estimate, c3.estimate, c3.verdict) == (0.5, 0.0, 0.5, "agrees")
    c2 = c.loc["utility_lost_per_bit@general_loss"]
    assert c2.estimate == pytest.approx(0.5 / 6) and c2.verdict == "agrees"
    assert set(c.n_seeds) == {2} and (c.direction.loc["steps_to_target"], c3.direction) == ("negative", "positive")


def test_claims_disagree_when_the_interval_lies_on_the_other_side():
    t = study_table({"id": [SLOW, SLOW], "code": [FAST, FAST]},
                    util={"id": FLAT, "code": ([1.0, 2.0, 3.0, 4.0], [2.0] * 4)})
    c = claims.claims_table(t, resamples=200).set_index("measure")
    assert (c.loc["steps_to_target", "estimate"], c.loc["steps_to_target", "verdict"]) == (2.0, "disagrees")
    # held-out loss: code's run lost 1 by its half step (2), ID's run nothing; the general loss half of that
    lost = c.loc[["utility_lost@heldout_loss", "utility_lost@general_loss"], "estimate"]
    assert lost.tolist() == [-1.0, -0.5]
    assert c.loc["utility_lost@general_loss", "verdict"] == "disagrees"


def test_claims_are_inconclusive_when_the_interval_contains_zero():
    # each arm: one fast and one slow example per seed: equal means, resampling spreads around 0
    t = study_table({"id": [FAST, SLOW], "code": [SLOW, FAST]})
    c = claims.claims_table(t, resamples=500).set_index("measure").loc["steps_to_target"]
    assert c.estimate == 0.0 and c.low < 0 < c.high and c.verdict == "inconclusive"


def test_a_claim_is_not_measurable_when_an_arm_has_nothing_to_remove():
    never_learned = [-1.0, -2.0, -3.0, -4.0]       # initial GenEx <= 0: no share of it can be removed
    t = study_table({"id": [FAST], "code": [never_learned]})
    c = claims.claims_table(t, resamples=100).set_index("measure")
    assert c.loc["steps_to_50pct", "verdict"] == "not measurable" and math.isnan(c.loc["steps_to_50pct", "estimate"])
    assert c.loc["steps_to_target", "verdict"] != "not measurable"      # below the floor at step 0: step 0
    assert claims.claims_table(study_table({"code": [FAST]}), resamples=10).empty          # no ID forget set


def test_forest_rows_place_each_claim_and_kind_with_the_agreeing_side():
    t = study_table({"id": [FAST, FAST], "code": [SLOW, SLOW], "canary": [SLOW, SLOW]},
                    util={"id": ([1.0, 2.0, 3.0, 4.0], [2.0] * 4)})
    c = claims.claims_table(t, utilities=["general_loss"], resamples=100)
    rows = plots_claims.forest_rows(c, labels={"code": "Python", "canary": "canaries"})
    assert len(rows) == 4 * 2 and set(rows.row) == {"Python", "canaries"}
    side = rows.drop_duplicates("panel").set_index(rows.drop_duplicates("panel").panel.str[:2]).agree_side
    assert side.tolist() == [-1, -1, 1, 1]          # C1 (two endpoints): below 0; C2, C3: above 0
    fig = plots_claims.forest_plot(c, labels={"code": "Python"})
    assert len(fig.axes) == 4 and all(ax.get_xlabel().startswith("ID minus OOD") for ax in fig.axes)


def test_markdown_and_summary_record_carry_the_bounds_and_the_interval_words():
    t = study_table({"id": [FAST, FAST], "code": [SLOW, SLOW]})
    c = claims.claims_table(t, resamples=100)
    text = claims.claims_markdown(c, labels={"code": "Python"})
    assert "Python" in text and INTERVAL_WORDS in text and "[-2, -2] → **agrees**" in text
    rec = claims.summary_record(c)
    first = next(r for r in rec if r["measure"] == "steps_to_target")
    assert (first["low"], first["high"], first["verdict"]) == (-2.0, -2.0, "agrees")
    assert first["median_estimate"] is None                          # -inf becomes null in JSON
    assert "cannot be checked" in claims.claims_markdown(pd.DataFrame())


def test_progress_curves_interpolate_utility_lost_at_the_mean_fraction_removed():
    # one seed, two examples: fraction removed (capped at 1) per step: [0, .3, .6, 1] and [0, .1, .2, 1.0]
    t = study_table({"id": [[10.0, 7.0, 4.0, -5.0], [10.0, 9.0, 8.0, 0.0]]}, seeds=(0,),
                    util={"id": ([1.0, 1.2, 1.4, 2.0], [1.0] * 4)})
    c = claims.progress_curves(t, ["heldout_loss"], grid=[0.0, 0.2, 0.4, 0.7, 1.0], resamples=50)
    # mean fraction [0, .2, .4, 1.0]; held-out loss lost [0, .2, .4, 1.0]; 0.7 interpolates to 0.7
    assert c.utility_lost.tolist() == pytest.approx([0.0, 0.2, 0.4, 0.7, 1.0])
    assert (c.low <= c.utility_lost + 1e-12).all() and (c.high >= c.utility_lost - 1e-12).all()


def test_per_token_values_divide_by_each_examples_scored_tokens():
    df = pd.DataFrame({"uid": ["a", "b"], "value": [8.0, 3.0]})
    assert claims.with_per_token(df, {"a": 4, "b": 3}).value_per_token.tolist() == [2.0, 1.0]
    with pytest.raises(KeyError, match="n_scored"):
        claims.with_per_token(df, {"a": 4})


def test_endpoint_summary_gives_restricted_mean_and_median_with_intervals():
    t = study_table({"id": [FAST, SLOW]})
    s = claims.endpoint_summary(claims.endpoints(t), resamples=100).iloc[0]
    assert s.steps_to_target_mean_estimate == 5.0 and s.steps_to_target_censored == 0.5
    assert s.steps_to_target_median_estimate == 4.0           # KM: half the examples unlearned at step 4
    assert s.initial_genex_estimate == 10.0 and s.examples == 2 and s.seeds == 2
