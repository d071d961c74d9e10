"""The memorization study, step 6: what a run found, written from its tables (never typed in by hand).

Text only: the correlation table as text, the headline numbers for summary.json, and the findings in
Markdown. The figures of the study are in ``plots``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .mem_scores import kind_summary
from .mem_stats import BOOTSTRAPS, ENDPOINTS, PRIMARY_ENDPOINT

SHORT = {"memorization": "memorization (set A)", "difficulty": "difficulty (set B)",
         "steps_to_50pct": "steps to remove 50% of initial GenEx (primary)",
         "fraction_removed_per_step": "share of initial GenEx removed per step",
         "steps_to_target": "raw steps to GenEx < target (mechanical)"}

INTERVAL_WORDS = (
    "Each interval holds the middle 95% of the correlations we get when we redo the analysis on resampled data: "
    "whole unlearning groups drawn with replacement within each kind (examples unlearned together from one model "
    "are not independent), and the complementary pairs of subset models of set A (memorization) and of set B "
    "(difficulty and the GenEx reference) drawn with replacement, the scores recomputed from the drawn models. "
    "The unlearned trajectories are not redrawn (one unlearning run per example). It shows how much ρ depends on "
    "which groups and models we happened to use; with one pair per set, model variation is not captured.")
ENDPOINT_WORDS = (
    "The primary endpoint is the number of steps to remove 50% of the example's own initial GenEx (its "
    "half-life). Raw steps to a fixed GenEx target grow with memorization by construction: a more memorized "
    "example starts further from the target, so a positive correlation there says little. The half-life and "
    "the share of initial GenEx removed per step are measured in each example's own units; if ascent removed a "
    "fixed number of bits per step, the half-life would still grow with initial GenEx and the share per step "
    "would fall with it, so the two normalised endpoints disagreeing is a sign of that.")


def _cell(r) -> str:
    if not np.isfinite(r.spearman):
        return f"n/a (n={r.n})"
    ci = f"[{r.ci_low:.2f}, {r.ci_high:.2f}]" if np.isfinite(r.ci_low) else "[n/a]"
    return f"{r.spearman:.2f} {ci} (n={r.n}, {r.n_groups} groups)"


def correlation_display(corr: pd.DataFrame, bootstrap: str = BOOTSTRAPS[0]) -> pd.DataFrame:
    """One row per pair and one column per scope (all, then each kind): "ρ [low, high] (n, groups)"."""
    if bootstrap not in BOOTSTRAPS:
        raise ValueError(f"bootstrap = {bootstrap!r}: use one of {BOOTSTRAPS}")
    c = corr[corr.bootstrap == bootstrap]
    df = c.assign(pair=[f"{SHORT[y]} vs {SHORT[x]}" if y in ENDPOINTS else f"{SHORT[x]} vs {SHORT[y]}"
                        for x, y in zip(c.x, c.y)],
                  value=[_cell(r) for r in c.itertuples()])
    scopes = list(dict.fromkeys(c.kind))
    return (df.pivot(index="pair", columns="kind", values="value").reindex(columns=scopes)
              .reindex(list(dict.fromkeys(df.pair)))
              .rename_axis(index=f"Spearman ρ [95% CI, {bootstrap}] (n)", columns="examples"))


def interval_widths(corr: pd.DataFrame) -> pd.DataFrame:
    """Per scope: median width of the groups-and-models interval, of the examples-only one, and their ratio."""
    w = corr.assign(width=corr.ci_high - corr.ci_low).pivot_table(index=["kind", "x", "y"], columns="bootstrap",
                                                                   values="width")
    out = w.groupby(level="kind", sort=False).median().reindex(columns=list(BOOTSTRAPS))
    return out.assign(ratio=out[BOOTSTRAPS[0]] / out[BOOTSTRAPS[1]]).reindex(list(dict.fromkeys(corr.kind)))


def _direction(r) -> str:
    if not np.isfinite(r.spearman) or not np.isfinite(r.ci_low):
        return "not measurable (too few examples or groups, or no variation)"
    if r.ci_low > 0:
        return "positive: the 95% interval excludes 0"
    if r.ci_high < 0:
        return "negative: the 95% interval excludes 0"
    return "no clear relation: the 95% interval includes 0"


def findings(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, target_bits: float) -> dict:
    """Headline numbers of the run, for summary.json: the groups-and-models intervals, pooled and per kind."""
    ks = kind_summary(table).set_index("kind")
    main = corr[corr.bootstrap == BOOTSTRAPS[0]]
    return {
        "pool_size": int(len(table)),
        "models_per_example": {"memorization_seen": int(table.n_in.min()),
                               "memorization_unseen": int(table.n_out.min()),
                               "difficulty_unseen": int(table.n_diff.min())},
        "model_pairs": {"A": int(corr.pairs_a.iloc[0]), "B": int(corr.pairs_b.iloc[0])},
        "target_bits": target_bits, "max_steps": max_steps, "primary_endpoint": PRIMARY_ENDPOINT,
        "interval": "95% percentile bootstrap over unlearning groups (within kind) and set A / set B model pairs",
        "reached_fraction": float(table.reached.mean()), "reached_50pct_fraction": float(table.reached_50pct.mean()),
        "per_kind": {k: {c: ks.loc[k, c] for c in ("memorization", "difficulty", "initial_genex_bits", "reached",
                                                      "reached_50pct", "median_steps_to_50pct",
                                                      "median_fraction_removed_per_step")} for k in ks.index},
        "correlations": {scope: {f"{r.x}~{r.y}": {"spearman": r.spearman, "ci_low": r.ci_low, "ci_high": r.ci_high,
                                                  "n": r.n, "n_groups": r.n_groups} for r in g.itertuples()}
                         for scope, g in main.groupby("kind", sort=False)},
    }


def findings_markdown(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, target_bits: float) -> str:
    """What this run found, written from the tables (never typed in by hand)."""
    ks = kind_summary(table).set_index("kind")
    main = corr[corr.bootstrap == BOOTSTRAPS[0]]
    pa, pb = int(corr.pairs_a.iloc[0]), int(corr.pairs_b.iloc[0])
    lines = [f"**What this run measured** ({len(table)} pool examples; memorization from set A ({pa} pair(s): each "
             f"example seen by {int(table.n_in.min())} and unseen by {int(table.n_out.min())} models), difficulty "
             f"and the GenEx reference from set B ({pb} pair(s): {int(table.n_diff.min())} model(s) that never saw "
             f"the example); gradient ascent for up to {max_steps} steps):", ""]
    for k in ks.index:
        r = ks.loc[k]
        half = (f"median {r.median_steps_to_50pct:.0f} steps to remove half of it"
                if np.isfinite(r.median_steps_to_50pct) and r.median_steps_to_50pct <= max_steps
                else "median beyond the budget for removing half of it")
        lines.append(f"- {k}: memorization {r.memorization:.3f} nats/token, difficulty {r.difficulty:.2f} "
                     f"nats/token, initial GenEx {r.initial_genex_bits:.1f} bits, {half}; {r.reached_50pct:.0%} "
                     f"lost half their GenEx and {r.reached:.0%} fell below {target_bits:g} bit within the budget.")
    lines += ["", "Rank correlations with the primary endpoint, the steps to remove 50% of the example's initial "
              "GenEx, pooled and within each kind (Spearman ρ [95% interval over groups and models]):", ""]
    for x in ("memorization", "difficulty"):
        undefined = []
        for r in main[(main.x == x) & (main.y == PRIMARY_ENDPOINT)].itertuples():
            scope = "all kinds pooled" if r.kind == "all" else f"within {r.kind}"
            if not np.isfinite(r.spearman):
                undefined.append(f"{r.kind} (n = {r.n})")
                continue
            rho = f"ρ = {r.spearman:.2f}" + (f" [{r.ci_low:.2f}, {r.ci_high:.2f}]" if np.isfinite(r.ci_low) else "")
            lines.append(f"- {x}, {scope}: {rho}, n = {r.n} in {r.n_groups} groups → {_direction(r)}.")
        if undefined:
            lines.append(f"- {x}, not measurable (fewer than 3 examples, or no variation) within: "
                         f"{', '.join(undefined)}.")
    raw = main[(main.kind == "all") & (main.y == "steps_to_target") & (main.x == "memorization")]
    if len(raw) and np.isfinite(raw.spearman.iloc[0]):
        r = raw.iloc[0]
        lines += ["", f"For comparison, raw steps to GenEx < {target_bits:g} bit against memorization, pooled: "
                  f"ρ = {r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] (raw steps grow with memorization by "
                  f"construction)."]
    widths = interval_widths(corr)
    if "all" in widths.index and np.isfinite(widths.loc["all", "ratio"]):
        lines += ["", f"Pooled, the intervals over groups and models are a median {widths.loc['all', 'ratio']:.1f}× "
                  f"as wide as intervals that resample single examples with the models fixed."]
    if pa < 2 or pb < 2:
        lines += ["", "With a single pair of models in a set, the bootstrap cannot redraw that set's models: the "
                  "intervals then reflect the groups (and the other set) only. Use mem_models >= 8 for two pairs "
                  "per set."]
    return "\n".join(lines)
