"""Summaries of a study table (:func:`forgetlab.engine.run_study`): curves, steps to unlearn, the claims.

Every function takes the tidy per-step table (``step, seed, uid, role, metric, value, kind, method``) of any
backend, so notebooks 03, 04 and 06 summarise the tiny GPT-2 and SmolLM2 alike.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import claims as claim_tables, metrics
from .intervals import noise_floor_target


# ---- summaries -----------------------------------------------------------------------------------

def curves(table: pd.DataFrame, metric: str, role: str = "forget") -> pd.DataFrame:
    """Mean of a per-example metric over examples (and seeds) per method, kind and step."""
    df = table[(table.metric == metric) & (table.role == role)]
    return df.groupby(["method", "kind", "step"], as_index=False).value.mean()


def utility_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per-model metrics (utility, membership AUC) averaged over seeds: method, kind, step, metric, value."""
    df = table[table.role == "model"]
    return df.groupby(["method", "kind", "step", "metric"], as_index=False).value.mean()


def steps_to_unlearn(table: pd.DataFrame, target_bits: float, fractions: tuple[float, ...] = (0.5, 0.9)) -> pd.DataFrame:
    """Per method and kind: steps until mean forget GenEx < target, and to remove given fractions of it.

    Also: utility at that step, initial/final GenEx and RelEx, the control (noise-floor) GenEx, and
    utility lost per bit removed.
    """
    genex = curves(table, "genex_bits")
    relex = curves(table, "relex_bits")
    control = curves(table, "genex_bits", role="control")
    util = utility_curves(table)
    rows = []
    for (method, kind), g in genex.groupby(["method", "kind"], sort=False):
        g = g.sort_values("step")
        steps, values = g.step.to_numpy(), g.value.to_numpy()
        initial, final = values[0], values[-1]
        hit = metrics.steps_to_target(steps, values, target_bits)
        ppl = util[(util.method == method) & (util.kind == kind) & (util.metric == "heldout_ppl")].set_index("step").value
        ppl = ppl.sort_index()
        ppl0 = float(ppl.iloc[0])
        # utility is measured every utility_every steps: linear between the two measured steps around the hit
        at = float(np.interp(hit, ppl.index, ppl.to_numpy())) if np.isfinite(hit) and hit <= ppl.index[-1] else np.nan
        r = relex[(relex.method == method) & (relex.kind == kind)].sort_values("step").value.to_numpy()
        c = control[(control.method == method) & (control.kind == kind)].sort_values("step").value.to_numpy()
        row = {"method": method, "kind": kind, "initial_genex_bits": initial, "final_genex_bits": final,
               "initial_relex_bits": r[0], "final_relex_bits": r[-1], "control_genex_bits": c[0] if len(c) else np.nan,
               "steps_to_target": hit, "heldout_ppl_initial": ppl0, "heldout_ppl_at_target": at,
               "ppl_increase_at_target": at - ppl0 if np.isfinite(at) else np.nan,
               "final_heldout_ppl": float(ppl.iloc[-1]), "max_steps": int(steps[-1])}
        for f in fractions:
            row[f"steps_to_remove_{int(f * 100)}pct"] = (metrics.steps_to_target(steps, values, initial * (1 - f))
                                                        if initial > 0 else np.nan)
        removed = initial - target_bits
        row["ppl_increase_per_bit"] = row["ppl_increase_at_target"] / removed if removed > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def relex_genex_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of RelEx with GenEx across examples and steps, per method and kind, and overall."""
    relex = (table[table.metric == "relex_bits"].groupby(["method", "kind", "step", "uid"]).value.mean()
             .rename("relex"))
    genex = table[table.metric == "genex_bits"].set_index(["method", "kind", "step", "uid"]).value.rename("genex")
    both = pd.concat([relex, genex], axis=1, join="inner").reset_index()
    rows = [{"method": m, "kind": k, "spearman": metrics.rank_correlation(g.relex, g.genex), "pairs": len(g)}
            for (m, k), g in both.groupby(["method", "kind"], sort=False)]
    rows.append({"method": "all", "kind": "all", "spearman": metrics.rank_correlation(both.relex, both.genex),
                 "pairs": len(both)})
    return pd.DataFrame(rows)


def finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def claims(summary: pd.DataFrame, util: pd.DataFrame, method: str = "ga") -> pd.DataFrame:
    """The study's three claims about ID vs OOD, each checked against this run's numbers.

    Returns one row per claim and OOD kind: the measured ID and OOD values and whether the run agrees.
    A claim is "not measurable" when a value is missing (e.g. a target never reached).
    """
    s = summary[summary.method == method].set_index("kind")
    ppl = util[(util.method == method) & (util.metric == "heldout_ppl")]
    # utility decay: perplexity increase over the first half of the step budget
    half = {}
    for kind, g in ppl.groupby("kind"):
        g = g.sort_values("step")
        mid = g.step.iloc[-1] / 2
        half[kind] = float(g[g.step <= mid].value.iloc[-1] - g.value.iloc[0])
    rows = []
    if "id" not in s.index:
        return pd.DataFrame(rows)
    budget = float(s.max_steps.max())
    # a target never reached counts as "more than the step budget" (a censored value), not as missing
    steps = s.steps_to_target.fillna(np.inf)
    for kind in [k for k in s.index if k != "id"]:
        checks = [
            ("OOD needs more steps to unlearn", "steps_to_target", steps["id"], steps[kind], lambda i, o: o > i),
            ("OOD has a better quality/utility trade-off (less perplexity lost per bit removed)",
             "ppl_increase_per_bit", s.loc["id", "ppl_increase_per_bit"], s.loc[kind, "ppl_increase_per_bit"],
             lambda i, o: o < i),
            ("ID unlearning makes utility decay faster (perplexity rise over the first half of the steps)",
             "ppl_rise_first_half", half.get("id", np.nan), half.get(kind, np.nan), lambda i, o: i > o),
        ]
        for claim, measure, id_value, ood_value, agrees in checks:
            ok = not (np.isnan(id_value) or np.isnan(ood_value) or (np.isinf(id_value) and np.isinf(ood_value)))
            rows.append({"claim": claim, "ood_kind": kind, "measure": measure, "id_value": float(id_value),
                         "ood_value": float(ood_value), "step_budget": budget,
                         "verdict": ("agrees" if agrees(id_value, ood_value) else "disagrees") if ok else "not measurable"})
    return pd.DataFrame(rows)


def claims_markdown(table: pd.DataFrame, method: str = "ga", labels: dict[str, str] | None = None) -> str:
    """A short written summary of `claims(...)`, one bullet per claim; ``labels`` names the kinds."""
    name = (labels or {}).get
    if table.empty:
        return "No ID forget set in this run, so the ID-vs-OOD claims cannot be checked."
    lines = [f"**What this run measured ({method}):**", ""]
    for claim, g in table.groupby("claim", sort=False):
        def fmt(v: float, budget: float) -> str:
            return f"not reached in {budget:.0f} steps" if np.isinf(v) else ("n/a" if np.isnan(v) else f"{v:.3g}")
        parts = [f"{name(r.ood_kind, r.ood_kind)}: {name('id', 'ID')} {fmt(r.id_value, r.step_budget)} vs "
                 f"{name(r.ood_kind, 'OOD')} {fmt(r.ood_value, r.step_budget)} → {r.verdict}" for r in g.itertuples()]
        n_agree = (g.verdict == "agrees").sum()
        lines.append(f"- *{claim}* — the run agrees for {n_agree} of {len(g)} OOD kinds ({'; '.join(parts)}).")
    return "\n".join(lines)


def never_trained_flags(table: pd.DataFrame, quantile: float = 0.95, minimum: float = 0.0,
                        calibrated: bool = False) -> pd.DataFrame:
    """Forget examples whose GenEx before unlearning lies inside the never-trained controls' noise band.

    Such an example looks as if the model never trained on it (a user's sentence that was not in the data, or one
    seen too rarely to be memorized): unlearning it is not meaningful and the notebooks say so instead of
    reporting it as unlearned. One row per kind and forget example: ``genex_bits`` at step 0, the kind's
    ``noise_floor_bits`` (the `quantile` of the controls' |GenEx| at step 0, at least `minimum`) and ``flagged``.
    With `calibrated`, both read per-original-seed GenEx minus its (kind, seed) controls' mean, the same noise
    floor as the study's endpoints (:func:`forgetlab.claims.noise_floors`); ``genex_bits`` is then the example's
    mean calibrated GenEx over seeds.
    """
    if calibrated:
        return _calibrated_flags(table, quantile, minimum)
    start = table[(table.step == 0) & (table.metric == "genex_bits")].drop_duplicates(["kind", "uid"])
    rows = []
    for kind, g in start.groupby("kind", sort=False):
        controls = g[g.role == "control"].value
        floor = noise_floor_target(controls, quantile, minimum) if len(controls) else np.nan
        for r in g[g.role == "forget"].itertuples():
            rows.append({"kind": kind, "uid": r.uid, "genex_bits": r.value, "noise_floor_bits": floor,
                         "flagged": bool(np.isfinite(floor) and abs(r.value) <= floor)})
    return pd.DataFrame(rows, columns=["kind", "uid", "genex_bits", "noise_floor_bits", "flagged"])


def _calibrated_flags(table: pd.DataFrame, quantile: float, minimum: float) -> pd.DataFrame:
    floors = claim_tables.noise_floors(table, quantile=quantile, minimum=minimum)
    start = claim_tables.per_seed(table)
    start = start[start.step == start.step.min()].drop_duplicates(["kind", "seed", "uid"])
    start = claim_tables.calibrate(start, claim_tables.control_offsets(table))
    mean = start.groupby(["kind", "uid"], sort=False).value.mean().reset_index()
    out = mean.assign(noise_floor_bits=mean.kind.map(floors)).rename(columns={"value": "genex_bits"})
    out["flagged"] = out.genex_bits.abs() <= out.noise_floor_bits
    return out[["kind", "uid", "genex_bits", "noise_floor_bits", "flagged"]]


def never_trained_markdown(flags: pd.DataFrame, labels: dict[str, str] | None = None) -> str:
    """One sentence per kind with flagged examples, or a sentence saying none is flagged."""
    flagged = flags[flags.flagged]
    if flagged.empty:
        return "Every forget example starts above its kind's noise floor: the model did learn each of them."
    name = (labels or {}).get
    lines = [f"- **{name(k, k)}**: {len(g)} of {int((flags.kind == k).sum())} forget examples start inside the "
             f"controls' noise band (|GenEx| ≤ {g.noise_floor_bits.iloc[0]:.2f} bits before unlearning): the model "
             f"behaves as if it never trained on them ({', '.join(g.uid)}), so their \"unlearning\" means nothing."
             for k, g in flagged.groupby("kind", sort=False)]
    return "\n".join(lines)


def exact_exposure_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean exact canary exposure (bits) per method and role (forget, control), at the first and last step."""
    exact = table[table.metric == "exposure_exact_bits"]
    return (exact.groupby(["method", "role", "step"]).value.mean().unstack("step")
            .rename(columns=lambda s: f"exact exposure at step {s} (bits)"))


def start_table(table: pd.DataFrame) -> pd.DataFrame:
    """Before unlearning (step 0): mean GenEx and RelEx of forget and control examples, exact canary exposure."""
    t = table[(table.step == 0) & table.role.isin(["forget", "control"])]
    t = t[t.metric.isin(["genex_bits", "relex_bits", "exposure_exact_bits"])]
    t = t.drop_duplicates(["kind", "uid", "metric", "seed"])   # step 0 is the same model for every method
    return t.groupby(["kind", "role", "metric"]).value.mean().unstack("metric").reset_index()


def agreement_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """RelEx and GenEx side by side per method, kind, step and example (for ``plots.relex_vs_genex``)."""
    return (table[table.metric.isin(["relex_bits", "genex_bits"])]
            .groupby(["method", "kind", "step", "uid", "metric"]).value.mean().unstack("metric")
            .rename(columns={"relex_bits": "relex", "genex_bits": "genex"}).dropna().reset_index())


def tiny_agreement(summary_path) -> dict[str, float | None]:
    """RelEx/GenEx Spearman correlations of the tiny-model study (notebook 04's section of ``summary.json``),
    keyed ``kind/method``; empty when that notebook has not run into the same output folder."""
    path = Path(summary_path)
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return dict(summary.get("tradeoffs", {}).get("relex_genex_spearman", {}))


FORGET_SET_FIELDS = ("steps_to_target", "steps_to_remove_50pct", "steps_to_remove_90pct", "heldout_ppl_initial",
                     "heldout_ppl_at_target", "final_heldout_ppl", "ppl_increase_per_bit", "initial_genex_bits",
                     "final_genex_bits", "initial_relex_bits", "final_relex_bits")


def summary_record(summary: pd.DataFrame, agreement: pd.DataFrame | None = None,
                   verdicts: pd.DataFrame | None = None) -> dict:
    """The ``summary.json`` section of a study: per forget set and method, and (if given) the RelEx/GenEx
    agreement and the claims; infinities and NaN become null."""
    record: dict = {"per_forget_set": {f"{r['kind']}/{r['method']}": {f: finite_or_none(r[f]) for f in FORGET_SET_FIELDS
                                                                  if f in r}
                                       for r in summary.to_dict(orient="records")}}
    if agreement is not None:
        record["relex_genex_spearman"] = {f"{r.kind}/{r.method}": finite_or_none(r.spearman)
                                          for r in agreement.itertuples()}
    if verdicts is not None:
        record["claims"] = [{"claim": r.claim, "ood_kind": r.ood_kind, "id": finite_or_none(r.id_value),
                             "ood": finite_or_none(r.ood_value), "verdict": r.verdict} for r in verdicts.itertuples()]
    return record
