"""Study summaries and claim verdicts on small hand-built tables with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from forgetlab import study

STEPS = [0, 2, 4, 6]


def table(genex: dict[str, list[float]], ppl: dict[str, list[float]], relex: dict[str, list[float]] | None = None,
          method: str = "ga") -> pd.DataFrame:
    """A tidy study table: one forget example per kind (its GenEx and RelEx per step) and the held-out
    perplexity of the model unlearning that kind."""
    rows = []
    for kind, values in genex.items():
        for step, g, r, p in zip(STEPS, values, (relex or {}).get(kind, [0.0] * 4), ppl[kind]):
            rows += [{"step": step, "seed": -1, "uid": f"{kind}-0", "role": "forget", "metric": "genex_bits",
                      "value": g, "kind": kind, "method": method},
                     {"step": step, "seed": 0, "uid": f"{kind}-0", "role": "forget", "metric": "relex_bits",
                      "value": r, "kind": kind, "method": method},
                     {"step": step, "seed": 0, "uid": "", "role": "model", "metric": "heldout_ppl", "value": p,
                      "kind": kind, "method": method}]
    return pd.DataFrame(rows)


def test_steps_to_unlearn_reached_and_never_reached():
    t = table({"id": [10.0, 6.0, 2.0, 0.5], "canary": [4.0, 3.0, 2.0, 1.5]},
              {"id": [20.0, 22.0, 25.0, 30.0], "canary": [20.0, 20.5, 21.0, 21.5]},
              relex={"id": [5.0, 4.0, 2.0, 1.0], "canary": [3.0, 3.0, 2.0, 2.0]})
    s = study.steps_to_unlearn(t, target_bits=1.0).set_index("kind")
    # ID: first step with GenEx < 1 is step 6; 50% of 10 bits removed (< 5) at step 4; 90% (< 1) at step 6
    assert s.loc["id", "steps_to_target"] == 6
    assert s.loc["id", "steps_to_remove_50pct"] == 4 and s.loc["id", "steps_to_remove_90pct"] == 6
    assert s.loc["id", "heldout_ppl_at_target"] == 30.0 and s.loc["id", "ppl_increase_at_target"] == 10.0
    assert s.loc["id", "ppl_increase_per_bit"] == pytest.approx(10.0 / 9.0)      # 10 ppl for 10 - 1 bits
    assert (s.loc["id", "initial_relex_bits"], s.loc["id", "final_relex_bits"]) == (5.0, 1.0)
    # canary: never below 1 bit in 6 steps: not reached (NaN); 50% of its 4 bits (< 2) is removed at step 6
    assert math.isnan(s.loc["canary", "steps_to_target"]) and s.loc["canary", "steps_to_remove_50pct"] == 6
    assert math.isnan(s.loc["canary", "steps_to_remove_90pct"])
    assert s.loc["canary", "max_steps"] == 6 and s.loc["canary", "final_genex_bits"] == 1.5


def test_perplexity_at_target_is_interpolated_between_measured_steps():
    # utility measured at steps 0 and 6 only (utility_every 6): GenEx < 1 first at step 4, where the held-out
    # perplexity is read on the line from 20 (step 0) to 30 (step 6): 20 + 10 * 4 / 6
    t = table({"id": [10.0, 6.0, 0.5, 0.2]}, {"id": [20.0, 22.0, 25.0, 30.0]})
    t = t[~((t.metric == "heldout_ppl") & t.step.isin([2, 4]))]
    s = study.steps_to_unlearn(t, target_bits=1.0).set_index("kind")
    assert s.loc["id", "steps_to_target"] == 4
    assert s.loc["id", "heldout_ppl_at_target"] == pytest.approx(20.0 + 10.0 * 4 / 6)


def test_claims_treat_a_target_never_reached_as_censored():
    t = table({"id": [10.0, 6.0, 2.0, 0.5], "canary": [4.0, 3.0, 2.0, 1.5]},
              {"id": [20.0, 22.0, 25.0, 30.0], "canary": [20.0, 20.5, 21.0, 21.5]})
    v = study.claims(study.steps_to_unlearn(t, 1.0), study.utility_curves(t)).set_index("measure")
    # C1: ID in 6 steps, canaries not within the 6-step budget: OOD needs more steps
    assert v.loc["steps_to_target", "verdict"] == "agrees" and np.isinf(v.loc["steps_to_target", "ood_value"])
    # C2: canaries never reach the target, so their cost per bit is not measurable
    assert v.loc["ppl_increase_per_bit", "verdict"] == "not measurable"
    # C3: perplexity rise over the first half (steps 0..3 -> up to step 2): ID 2.0 vs canary 0.5: agrees
    assert v.loc["ppl_rise_first_half", "id_value"] == 2.0 and v.loc["ppl_rise_first_half", "ood_value"] == 0.5
    assert v.loc["ppl_rise_first_half", "verdict"] == "agrees"


def test_claims_censored_on_both_sides_and_disagreeing():
    never = [4.0, 3.5, 3.0, 2.5]
    t = table({"id": never, "code": never}, {"id": [10.0] * 4, "code": [10.0, 12.0, 14.0, 16.0]})
    v = study.claims(study.steps_to_unlearn(t, 1.0), study.utility_curves(t)).set_index("measure")
    assert v.loc["steps_to_target", "verdict"] == "not measurable"      # both censored: no order is known
    assert v.loc["ppl_rise_first_half", "verdict"] == "disagrees"       # ID 0 vs code 2: OOD decays faster here
    # OOD reached, ID not: OOD needed fewer steps, the claim disagrees
    t = table({"id": never, "code": [4.0, 0.5, 0.2, 0.1]}, {"id": [10.0] * 4, "code": [10.0] * 4})
    v = study.claims(study.steps_to_unlearn(t, 1.0), study.utility_curves(t)).set_index("measure")
    assert v.loc["steps_to_target", "verdict"] == "disagrees"
    assert "canary" not in set(v.ood_kind)


def test_no_id_forget_set_means_no_claims():
    t = table({"code": [4.0, 0.5, 0.2, 0.1]}, {"code": [10.0] * 4})
    assert study.claims(study.steps_to_unlearn(t, 1.0), study.utility_curves(t)).empty
    assert "cannot be checked" in study.claims_markdown(pd.DataFrame())


def test_claims_markdown_uses_the_labels():
    t = table({"id": [10.0, 6.0, 2.0, 0.5], "language": [4.0, 3.0, 2.0, 1.5]},
              {"id": [20.0, 22.0, 25.0, 30.0], "language": [20.0] * 4})
    v = study.claims(study.steps_to_unlearn(t, 1.0), study.utility_curves(t))
    text = study.claims_markdown(v, labels={"id": "ID (English)", "language": "OOD: Persian"})
    assert "ID (English) 6 vs OOD: Persian not reached in 6 steps → agrees" in text


def test_summary_record_is_json_ready():
    t = table({"id": [10.0, 6.0, 2.0, 0.5], "canary": [4.0, 3.0, 2.0, 1.5]},
              {"id": [20.0, 22.0, 25.0, 30.0], "canary": [20.0] * 4})
    s = study.steps_to_unlearn(t, 1.0)
    record = study.summary_record(s, verdicts=study.claims(s, study.utility_curves(t)))
    assert record["per_forget_set"]["id/ga"]["steps_to_target"] == 6.0
    assert record["per_forget_set"]["canary/ga"]["steps_to_target"] is None      # never reached -> null
    assert {c["verdict"] for c in record["claims"]} <= {"agrees", "disagrees", "not measurable"}


def test_a_forget_example_inside_the_noise_band_is_flagged():
    rows = []
    for uid, role, g in (("f-trained", "forget", 12.0), ("f-never", "forget", 0.4), ("c0", "control", -0.5),
                         ("c1", "control", 0.2), ("c2", "control", 0.1)):
        rows.append({"step": 0, "seed": -1, "uid": uid, "role": role, "metric": "genex_bits", "value": g,
                     "kind": "custom", "method": "ga"})
    flags = study.never_trained_flags(pd.DataFrame(rows), quantile=1.0).set_index("uid")
    assert flags.loc["f-trained", "noise_floor_bits"] == 0.5               # the largest |control GenEx|
    assert not flags.loc["f-trained", "flagged"] and flags.loc["f-never", "flagged"]
    text = study.never_trained_markdown(flags.reset_index(), {"custom": "custom: my sentences"})
    assert "custom: my sentences" in text and "1 of 2" in text and "f-never" in text


def test_calibrated_flags_measure_each_seed_against_its_own_controls():
    from test_claims import OFFSET_CONTROLS, study_table
    t = study_table({"id": {0: [[-17.0] * 4, [-8.0] * 4], 1: [[3.0] * 4, [12.0] * 4]}},
                    controls={"id": OFFSET_CONTROLS})
    flags = study.never_trained_flags(t, calibrated=True).set_index("uid")
    # offsets -18 and +2: id-0 is 1 bit above its controls under both seeds (inside the 3-bit floor), id-1 is 10
    assert flags.genex_bits.tolist() == [1.0, 10.0] and flags.noise_floor_bits.tolist() == [3.0, 3.0]
    assert flags.flagged.tolist() == [True, False]
