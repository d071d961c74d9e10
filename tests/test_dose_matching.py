"""Notebook 07 on the calibrated scale: offsets per (count, kind, original seed), calibrated noise floors and
endpoints on a hand-built dose table (two counts, two seeds, controls with known step-0 GenEx), and
``calibrated=False`` giving the raw numbers of earlier runs exactly."""
from __future__ import annotations

import pandas as pd
import pytest
from forgetlab import dose_matching as dm
from forgetlab import intervals

# (count, seed) -> the id controls' step-0 GenEx (offset = their mean) and the forget example's calibrated path
ID_CONTROLS = {(1, 0): (2.0, 4.0), (1, 10): (-6.0, -4.0), (4, 0): (10.0, 14.0), (4, 10): (0.5, 1.5)}
ID_OFFSETS = {(1, 0): 3.0, (1, 10): -5.0, (4, 0): 12.0, (4, 10): 1.0}
CAL_PATHS = {(1, 0): (8.0, 6.0, 3.0, 1.0), (1, 10): (8.0, 4.0, 1.5, 0.0), (4, 0): (20.0, 12.0, 4.0, 3.0),
             (4, 10): (20.0, 9.0, 1.0, -2.0)}
CODE_OFFSETS = {(1, 0): -20.0, (1, 10): 7.0, (4, 0): 0.0, (4, 10): 30.0}     # code controls: offset -/+ 0.25


def _row(count, kind, seed, uid, role, step, value):
    return {"count": count, "kind": kind, "seed": seed, "uid": uid, "role": role, "step": step,
            "metric": "genex_seed_bits", "value": value, "method": "ga"}


def dose_table() -> pd.DataFrame:
    rows = []
    for (c, s), controls in ID_CONTROLS.items():
        for step, v in enumerate(CAL_PATHS[c, s]):
            rows.append(_row(c, "id", s, "id-f", "forget", step, v + ID_OFFSETS[c, s]))
            for i, ctl in enumerate(controls):      # controls are scored at every step; only step 0 counts
                rows.append(_row(c, "id", s, f"id-c{i}", "control", step, ctl - 3.0 * step))
        for i, d in enumerate((-0.25, 0.25)):
            rows.append(_row(c, "code", s, f"code-c{i}", "control", 0, CODE_OFFSETS[c, s] + d))
        for step, v in enumerate((5.0, 0.5)):
            rows.append(_row(c, "code", s, "code-f", "forget", step, v + CODE_OFFSETS[c, s]))
    rows.append({**_row(1, "id", -1, "id-f", "forget", 0, 99.0), "metric": "genex_bits"})   # another metric
    return pd.DataFrame(rows)


def test_offsets_are_the_controls_step0_mean_per_count_kind_and_seed():
    off = dm.count_offsets(dose_table()).set_index(["count", "kind", "seed"])
    assert list(off.columns) == ["offset", "controls"] and len(off) == 8
    for (c, s), o in ID_OFFSETS.items():
        assert off.loc[(c, "id", s), "offset"] == pytest.approx(o)
        assert off.loc[(c, "code", s), "offset"] == pytest.approx(CODE_OFFSETS[c, s])
    assert (off.controls == 2).all()


def test_calibrated_floors_pool_every_count_and_seed_and_raw_ones_are_unchanged():
    t = dose_table()
    # calibrated id controls: (-1, 1), (-1, 1), (-2, 2), (-0.5, 0.5): max |.| = 2; code: 0.25, below the minimum
    assert dm.kind_targets(t, minimum=1.0, quantile=1.0) == {"id": 2.0, "code": 1.0}
    assert dm.kind_targets(t, minimum=0.0, quantile=1.0) == pytest.approx({"id": 2.0, "code": 0.25})
    # raw: the largest |step-0 GenEx| of the controls, 14 (id) and 30.25 (code)
    raw = dm.kind_targets(t, minimum=1.0, quantile=1.0, calibrated=False)
    assert raw == {"id": 14.0, "code": 30.25}
    controls = dm.genex_rows(t, "control")                  # the earlier code, line for line
    controls = controls[controls.step == controls.step.min()]
    earlier = {k: intervals.noise_floor_target(g.value, 0.95, 1.0) for k, g in controls.groupby("kind", sort=False)}
    assert dm.kind_targets(t, minimum=1.0, calibrated=False) == earlier


def test_calibrated_endpoints_by_hand():
    t = dose_table()
    ends = dm.dose_endpoints(t, {"id": 2.0, "code": 1.0})
    e = ends[ends.kind == "id"].set_index(["count", "seed"]).sort_index()
    assert e.offset.to_dict() == ID_OFFSETS
    assert e.initial.tolist() == [8.0, 8.0, 20.0, 20.0]
    assert e.final.tolist() == [1.0, 0.0, 3.0, -2.0]
    # first step at or below the floor of 2 bits; (4, 0) never gets there: censored at the last step
    assert e.steps_to_target.tolist() == [3.0, 2.0, 3.0, 2.0]
    assert e.censored.tolist() == [False, False, True, False]
    # first step below half the initial calibrated GenEx (4, 4, 10, 10)
    assert e.steps_to_50pct.tolist() == [2.0, 2.0, 2.0, 1.0]
    c = ends[ends.kind == "code"]
    assert c.initial.tolist() == [5.0] * 4 and c.steps_to_target.tolist() == [1.0] * 4


def test_a_value_at_the_floor_counts_as_reached_as_in_the_claims():
    # calibrated paths (1, 0): 8 6 3 1 and (4, 0): 20 12 4 3 reach exactly 3 bits at steps 2 and 3
    e = dm.dose_endpoints(dose_table(), {"id": 3.0, "code": 1.0})
    e = e[e.kind == "id"].set_index(["count", "seed"]).sort_index()
    assert e.steps_to_target.tolist() == [2.0, 2.0, 3.0, 2.0] and not e.censored.any()


def test_raw_endpoints_are_the_earlier_numbers_exactly():
    t = dose_table()
    targets = dm.kind_targets(t, minimum=1.0, quantile=1.0, calibrated=False)
    ends = dm.dose_endpoints(t, targets, calibrated=False)
    assert (ends.offset == 0.0).all()
    earlier = intervals.example_endpoints(dm.genex_rows(t), targets, fractions=(0.5,), by=dm.KEYS)
    pd.testing.assert_frame_equal(ends.drop(columns="offset"), earlier, check_exact=True)
    e = ends[ends.kind == "id"].set_index(["count", "seed"]).sort_index()
    # raw paths 11 9 6 4 | 3 -1 -3.5 -5 | 32 24 16 15 | 21 10 2 -1 against the raw floor of 14
    assert e.initial.tolist() == [11.0, 3.0, 32.0, 21.0]
    assert e.steps_to_target.tolist() == [0.0, 0.0, 3.0, 1.0]
    assert e.steps_to_50pct.tolist() == [3.0, 1.0, 3.0, 1.0]


def test_a_group_without_controls_names_the_count_and_the_way_out():
    t = dose_table()
    t = t[~((t["count"] == 4) & (t.kind == "code") & (t.role == "control"))]
    with pytest.raises(KeyError, match=r"count 4: no controls at step 0 for \(kind, seed\) \[\('code', 0\)"):
        dm.dose_endpoints(t, {"id": 2.0, "code": 1.0})
    with pytest.raises(KeyError, match="calibrated=False"):
        dm.calibrate_by_count(dm.genex_rows(t), dm.count_offsets(t))
    assert set(dm.dose_endpoints(t, {"id": 2.0, "code": 1.0}, calibrated=False)["count"]) == {1, 4}


def _verdicts() -> tuple[pd.DataFrame, pd.DataFrame]:
    base = {"kind": "code", "label": "Python code", "endpoint": "steps_to_target", "bins_used": 2,
            "overlap_low": 4.0, "overlap_high": 9.0}
    v = pd.DataFrame([{**base, "comparison": "matched", "estimate": -1.5, "low": -3.0, "high": -0.5,
                       "verdict": "agrees"},
                      {**base, "comparison": "unmatched", "estimate": -4.0, "low": -6.0, "high": -2.0,
                       "verdict": "agrees", "bins_used": float("nan")}])
    dose = pd.DataFrame({"kind": ["id", "id", "code", "code"], "count": [1, 4, 1, 4],
                         "initial_genex_bits": [8.0, 20.0, 5.0, 5.0], "low": [7.0, 19.0, 4.0, 4.0],
                         "high": [9.0, 21.0, 6.0, 6.0]})
    return v, dose


def test_findings_and_summary_say_which_scale():
    v, dose = _verdicts()
    text = dm.findings_markdown(v, dose, budget=3)
    assert text.startswith("- Scale: calibrated GenEx (each example's GenEx minus its offset")
    assert "at matched initial calibrated GenEx (4.0 to 9.0 bits, 2 bin(s)), ID - OOD = -1.5 steps" in text
    assert "Initial calibrated GenEx at the highest count: id 20.0 bits, code 5.0 bits" in text
    raw = dm.findings_markdown(v, dose, budget=3, calibrated=False)
    assert raw.startswith("- Scale: raw GenEx (not calibrated") and "calibrated GenEx (" not in raw
    p = {"dose_insertions": [4, 1], "dose_forget_size": 1, "dose_unlearn_steps": 3}
    rec = dm.summary_record(dose, v, {"id": 2.0}, p, offsets=dm.count_offsets(dose_table()))
    assert rec["genex_scale"] == "calibrated" and rec["counts"] == [1, 4]
    # per kind and count, the mean offset over the two seeds: id (3 - 5) / 2 and (12 + 1) / 2
    assert rec["control_offsets_bits"]["id"] == {1: -1.0, 4: 6.5}
    assert rec["control_offsets_bits"]["code"] == {1: -6.5, 4: 15.0}
    rec_raw = dm.summary_record(dose, v, {"id": 14.0}, p, calibrated=False)
    assert rec_raw["genex_scale"] == "raw" and "control_offsets_bits" not in rec_raw


def test_the_figures_name_the_scale():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from forgetlab import plots_dose
    t = dose_table()
    ends = dm.dose_endpoints(t, {"id": 2.0, "code": 1.0})
    fig = plots_dose.dose_response(dm.dose_table(ends, resamples=20), ends, 20)
    assert fig.axes[0].get_ylabel() == "initial calibrated GenEx (bits per example)"
    fig = plots_dose.steps_vs_initial(ends, {"id": 2.0, "code": 1.0}, 3, calibrated=False)
    assert fig.axes[0].get_xlabel() == "initial raw GenEx (bits per example)"
    plt.close("all")
