"""The memorization study, step 5: what a run found, written from its tables (never typed in by hand).

Text only: the correlation table as text, the headline numbers for summary.json, and the findings in
Markdown. The figures of the study are in ``plots``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .mem_scores import kind_summary

SHORT = {"memorization": "memorization", "difficulty": "difficulty", "steps_to_unlearn": "steps to unlearn",
         "ppl_increase_at_target": "utility lost (perplexity increase)"}


def correlation_display(corr: pd.DataFrame) -> pd.DataFrame:
    """The correlation table as text, one row per pair and one column per scope: "ρ [low, high] (n)"."""
    def cell(r) -> str:
        return f"{r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] (n={r.n})" if np.isfinite(r.spearman) else f"n/a (n={r.n})"
    df = corr.assign(pair=[f"{SHORT[x]} vs {SHORT[y]}" for x, y in zip(corr.x, corr.y)],
                     value=[cell(r) for r in corr.itertuples()])
    scopes = list(dict.fromkeys(corr.kind))
    return df.pivot(index="pair", columns="kind", values="value").reindex(columns=scopes).reindex(
        list(dict.fromkeys(df.pair))).rename_axis(index="Spearman ρ [95% CI] (n)", columns="examples")


_MORE = {"memorization": "memorized", "difficulty": "difficult"}
_THEN = {"difficulty": ("more difficult it was", "less difficult it was"),
         "steps_to_unlearn": ("more steps it took to unlearn", "fewer steps it took to unlearn"),
         "ppl_increase_at_target": ("more utility it cost", "less utility it cost")}


def _direction(c: pd.Series) -> str:
    if not np.isfinite(c.spearman):
        return "not measurable (too few examples or no variation)"
    positive = np.isfinite(c.ci_low) and c.ci_low > 0
    negative = np.isfinite(c.ci_high) and c.ci_high < 0
    if not (positive or negative):
        return "no clear relation: the 95% interval includes 0"
    then = _THEN[c.y][0 if positive else 1]
    return (f"{'positive' if positive else 'negative'} (the 95% interval excludes 0): the more {_MORE[c.x]} an "
            f"example, the {then}")


def findings(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, target_bits: float) -> dict:
    """Headline numbers of the run, for summary.json."""
    ks = kind_summary(table).set_index("kind")
    return {
        "pool_size": int(len(table)), "models_per_example": {"seen": int(table.n_in.min()), "unseen": int(table.n_out.min())},
        "target_bits": target_bits, "max_steps": max_steps, "reached_fraction": float(table.reached.mean()),
        "per_kind": {k: {c: ks.loc[k, c] for c in ("memorization", "difficulty", "reached", "median_steps",
                                                      "ppl_increase_at_target")} for k in ks.index},
        "correlations": {f"{r.x}~{r.y}": {"spearman": r.spearman, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n}
                         for r in corr[corr.kind == "all"].itertuples()},
    }


def findings_markdown(table: pd.DataFrame, corr: pd.DataFrame, max_steps: int, target_bits: float) -> str:
    """What this run found, written from the tables (never typed in by hand)."""
    ks = kind_summary(table).set_index("kind")
    lines = [f"**What this run measured** ({len(table)} pool examples; each seen by {int(table.n_in.min())} and "
             f"unseen by {int(table.n_out.min())} subset models; gradient ascent for up to {max_steps} steps, "
             f"target GenEx < {target_bits:g} bit):", ""]
    ood = [k for k in ks.index if k != "id"]
    for k in ks.index:
        r = ks.loc[k]
        steps = f"median {r.median_steps:.0f} steps" if np.isfinite(r.median_steps) else "no median (too few reached)"
        lines.append(f"- {k}: memorization {r.memorization:.3f} nats/token (mean SE {r.memorization_se:.3f}), "
                     f"difficulty {r.difficulty:.2f} nats/token, initial GenEx {r.initial_genex_bits:.1f} bits; "
                     f"{r.reached:.0%} unlearned within the budget ({steps}).")
    if "id" in ks.index and ood:
        m_id = ks.loc["id", "memorization"]
        parts = [f"{k} {ks.loc[k, 'memorization']:.3f} ({'more' if ks.loc[k, 'memorization'] > m_id else 'less'} "
                 f"memorized)" for k in ood]
        lines.append(f"- Against ID examples (mean memorization {m_id:.3f} nats/token): {', '.join(parts)}.")
    lines.append("")
    lines.append("Rank correlations over all pool examples (Spearman ρ, 95% bootstrap interval):")
    lines.append("")
    for r in corr[corr.kind == "all"].itertuples():
        c = pd.Series(r._asdict())
        rho = f"ρ = {r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}], n = {r.n}" if np.isfinite(r.spearman) else f"n = {r.n}"
        lines.append(f"- {SHORT[r.x]} vs {SHORT[r.y]}: {rho} → {_direction(c)}.")
    within = corr[(corr.kind != "all") & np.isfinite(corr.spearman)]
    if len(within):
        lines.append("")
        lines.append("Across kinds, a correlation can come from the kinds differing (ID vs OOD) rather than from "
                     "examples within a kind. Within each kind:")
        lines.append("")
        for x, y in (("memorization", "steps_to_unlearn"), ("difficulty", "steps_to_unlearn")):
            w = within[(within.x == x) & (within.y == y)]
            if len(w):
                parts = [f"{r.kind} {r.spearman:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in w.itertuples()]
                lines.append(f"- {SHORT[x]} vs {SHORT[y]}: {'; '.join(parts)}.")
    if table.reached.mean() < 0.5:
        lines.append("")
        lines.append(f"Only {table.reached.mean():.0%} of the examples reached the target within {max_steps} steps: "
                     f"the steps correlations rank the rest as tied beyond the budget, and the utility correlations "
                     f"use only the examples that reached it.")
    return "\n".join(lines)
