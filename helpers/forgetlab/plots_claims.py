"""Figures of the claims with intervals: forest plot, survival curves with bands, utility lost against
forgetting progress (C2/C3), the placebo, per-token beside per-sequence GenEx.

Every function takes ``labels`` (kind -> display label) like :mod:`forgetlab.plots`; legends sit outside the axes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .plots import METHOD_LABELS, _legend_outside, kind_colors, kind_label, kind_order, plt
from .survival import survival_band, survival_curves

VERDICT_COLORS = {"agrees": "#2ca02c", "disagrees": "#d62728", "inconclusive": "#7f7f7f",
                  "not measurable": "#bbbbbb"}


def forest_rows(claims: pd.DataFrame, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The forest plot's input: one row per claim x OOD kind with its panel (claim and measure), row label,
    estimate, low, high, verdict and the side of 0 that agrees (+1 above, -1 below)."""
    df = claims.copy()
    df["panel"] = df.claim + ": " + df.statement
    df["row"] = [kind_label(k, labels) for k in df.ood_kind]
    df["agree_side"] = np.where(df.direction == "positive", 1, -1)
    return df[["panel", "unit", "row", "ood_kind", "estimate", "low", "high", "verdict", "agree_side"]]


def _wrap(text: str, width: int = 70) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def forest_plot(claims: pd.DataFrame, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """One panel per claim (each has its own unit), one row per OOD kind: ID minus OOD with its 95% interval,
    coloured by verdict; the zero line; the side of 0 where the claim agrees shaded green and labelled."""
    rows = forest_rows(claims, labels)
    order = {k: i for i, k in enumerate(kind_order(rows.ood_kind, labels))}
    rows = rows.assign(_o=rows.ood_kind.map(order)).sort_values("_o", kind="stable")
    panels = list(dict.fromkeys(claims.claim + ": " + claims.statement))
    height = 0.5 + len(panels) * (1.0 + 0.45 * rows.ood_kind.nunique())
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, height), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        g = rows[rows.panel == panel].reset_index(drop=True)
        y = np.arange(len(g))[::-1]
        finite = np.r_[g.estimate, g.low, g.high]
        finite = finite[np.isfinite(finite)]
        span = max(np.abs(finite).max() if finite.size else 1.0, 1e-9) * 1.15
        side = int(g.agree_side.iloc[0])
        ax.axvspan(0, side * span, color="#2ca02c", alpha=0.08, lw=0)
        ax.text(side * span * 0.97, y.max() + 0.45, "claim agrees →" if side > 0 else "← claim agrees",
                ha="right" if side > 0 else "left", va="center", fontsize=8, color="#2ca02c")
        ax.axvline(0, color="k", lw=1)
        for yi, r in zip(y, g.itertuples()):
            color = VERDICT_COLORS.get(r.verdict, "k")
            lo = r.low if np.isfinite(r.low) else -span
            hi = r.high if np.isfinite(r.high) else span
            ax.plot([lo, hi], [yi, yi], color=color, lw=2.5)
            if np.isfinite(r.estimate):
                ax.plot(r.estimate, yi, "o", color=color, ms=6)
            ax.text(1.01, yi, r.verdict, transform=ax.get_yaxis_transform(), va="center", fontsize=8, color=color)
        ax.set_yticks(y, g.row)
        ax.set_ylim(-0.6, y.max() + 0.9)
        ax.set_xlim(-span, span)
        ax.set_title(_wrap(panel), fontsize=9, loc="left")
        ax.set_xlabel(f"ID minus OOD ({g.unit.iloc[0]})", fontsize=9)
    fig.suptitle("The claims: ID minus OOD with 95% intervals (original seeds, then examples)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    return fig


def survival_plot(ends: pd.DataFrame, duration: str = "steps_to_target", censored: str = "censored",
                  resamples: int = 1000, *, labels: Mapping[str, str] | None = None, title: str | None = None
                  ) -> plt.Figure:
    """Fraction of forget examples still exposed against step, one panel per method, one line per kind (Kaplan-
    Meier), a 95% band (seeds, then examples) and a '+' where examples were censored (never reached)."""
    ends = ends[ends[duration].notna()]
    methods = list(dict.fromkeys(ends.method))
    kinds = kind_order(ends.kind, labels)
    colors = kind_colors(kinds, labels)
    grid = np.arange(0, ends.last_step.max() + 1)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.4 * len(methods) + 2.2, 3.6), sharey=True, squeeze=False)
    curves = survival_curves(ends, duration=duration, censored=censored)
    for ax, method in zip(axes[0], methods):
        for kind in kinds:
            g = ends[(ends.method == method) & (ends.kind == kind)]
            if g.empty:
                continue
            band = survival_band(g, grid, duration, censored, resamples=resamples)
            ax.step(band.step, band.survival, where="post", color=colors[kind], label=kind_label(kind, labels))
            ax.fill_between(band.step, band.low, band.high, step="post", color=colors[kind], alpha=0.15, lw=0)
            c = curves[(curves.method == method) & (curves.kind == kind) & (curves.censored > 0)]
            ax.plot(c.step, c.survival, "+", color=colors[kind], ms=9, mew=1.5)
        ax.set(title=METHOD_LABELS.get(method, method), xlabel="unlearning step", ylim=(-0.02, 1.02))
    axes[0, 0].set_ylabel("forget examples still exposed")
    handles, names = axes[0, -1].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="k", marker="+", ls="", ms=9))
    names.append("censored (never reached)")
    axes[0, -1].legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle(title or "Survival: share of forget examples whose GenEx is still above the controls' noise floor "
                 "(band: 95%)", fontsize=10)
    fig.tight_layout()
    return fig


def progress_plot(curves: pd.DataFrame, method: str, utilities: Sequence[str] | None = None,
                  utility_labels: Mapping[str, str] | None = None, *, labels: Mapping[str, str] | None = None
                  ) -> plt.Figure:
    """C2/C3: utility lost against the fraction of initial GenEx removed, one panel per utility measure, one
    line per kind with its 95% band."""
    c = curves[curves.method == method]
    utilities = list(utilities or dict.fromkeys(c.utility))
    kinds = kind_order(c.kind, labels)
    colors = kind_colors(kinds, labels)
    fig, axes = plt.subplots(1, len(utilities), figsize=(3.9 * len(utilities) + 2.2, 3.7), squeeze=False)
    for ax, u in zip(axes[0], utilities):
        for kind in kinds:
            g = c[(c.utility == u) & (c.kind == kind)]
            ax.plot(g.fraction * 100, g.utility_lost, color=colors[kind], label=kind_label(kind, labels))
            ax.fill_between(g.fraction * 100, g.low, g.high, color=colors[kind], alpha=0.15, lw=0)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=_wrap((utility_labels or {}).get(u, u), 34), xlabel="initial GenEx removed (%)")
    axes[0, 0].set_ylabel("utility lost (nats/token)")
    _legend_outside(axes[0, -1])
    fig.suptitle(f"Utility lost against forgetting progress ({METHOD_LABELS.get(method, method)}; band: 95%)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def placebo_plot(bands: pd.DataFrame, method: str, kinds: Sequence[str] = ("id", "placebo"),
                 utility_labels: Mapping[str, str] | None = None, *, labels: Mapping[str, str] | None = None
                 ) -> plt.Figure:
    """Utility lost against step for the ID forget set and the placebo (ascent on never-trained ID text), one
    panel per utility measure, bands across original seeds. ``bands``: kind, method, utility, step, estimate,
    low, high."""
    b = bands[(bands.method == method) & bands.kind.isin(list(kinds))]
    utilities = list(dict.fromkeys(b.utility))
    colors = {**kind_colors(kinds, labels), "placebo": "#ff7f0e"}
    fig, axes = plt.subplots(1, len(utilities), figsize=(3.9 * len(utilities) + 2.2, 3.6), squeeze=False)
    for ax, u in zip(axes[0], utilities):
        for kind in kinds:
            g = b[(b.utility == u) & (b.kind == kind)].sort_values("step")
            ax.plot(g.step, g.estimate, color=colors[kind], ls="--" if kind == "placebo" else "-",
                    label=kind_label(kind, labels))
            ax.fill_between(g.step, g.low, g.high, color=colors[kind], alpha=0.15, lw=0)
        ax.set(title=_wrap((utility_labels or {}).get(u, u), 34), xlabel="unlearning step")
    axes[0, 0].set_ylabel("utility lost (nats/token)")
    _legend_outside(axes[0, -1])
    fig.suptitle(f"Ascent on the ID forget set vs on never-trained ID text ({METHOD_LABELS.get(method, method)}; "
                 "band: 95% over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def per_token_plot(curves: pd.DataFrame, method: str, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """Mean forget GenEx per sequence (left, bits) and per scored token (right, bits/token) against step.
    ``curves``: kind, method, step, value, value_per_token."""
    c = curves[curves.method == method]
    kinds = kind_order(c.kind, labels)
    colors = kind_colors(kinds, labels)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for kind in kinds:
        g = c[c.kind == kind].sort_values("step")
        axes[0].plot(g.step, g.value, color=colors[kind], label=kind_label(kind, labels))
        axes[1].plot(g.step, g.value_per_token, color=colors[kind], label=kind_label(kind, labels))
    for ax, unit in zip(axes, ("bits per sequence", "bits per scored token")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="unlearning step", ylabel=f"GenEx ({unit})")
    axes[0].set_title("per sequence")
    axes[1].set_title("per scored token (one scale for every length)", fontsize=10)
    _legend_outside(axes[1])
    fig.suptitle(f"Forget-set GenEx, mean over examples and seeds ({METHOD_LABELS.get(method, method)})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def sanity_plot(control_values: pd.DataFrame, controls: pd.DataFrame, membership: pd.DataFrame, *,
                labels: Mapping[str, str] | None = None) -> plt.Figure:
    """The two sanity checks per kind. Left: every control's GenEx before unlearning (dots, one per control and
    original seed) and the 95% interval of their mean, against 0 and the null value (black bar, when
    ``controls`` has ``null_bits``: see :func:`forgetlab.sanity.control_null`) (widened by the reference seeds' and the set
    draw's noise; dashed below it the seeds-and-controls bootstrap interval alone). Right: the reference models'
    membership AUC (forget set against its population) with its 95% interval, against 0.5, and the originals' AUC
    beside it."""
    kinds = kind_order(controls.kind, labels)
    colors = kind_colors(kinds, labels)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 1.4 + 0.75 * len(kinds)), sharey=True)
    c, m = controls.set_index("kind"), membership.set_index("kind")
    y = np.arange(len(kinds))[::-1]
    widened = "noise_sd_bits" in c and bool((c.noise_sd_bits > 0).any())
    for yi, kind in zip(y, kinds):
        v = control_values[control_values.kind == kind].value
        axes[0].plot(v, np.full(len(v), yi + 0.18), ".", color=colors[kind], alpha=0.6)
        axes[0].plot([c.loc[kind, "low"], c.loc[kind, "high"]], [yi, yi], color=colors[kind], lw=2.5)
        if widened:   # the seeds-and-controls interval alone, below the widened one
            axes[0].plot([c.loc[kind, "seeds_low"], c.loc[kind, "seeds_high"]], [yi - 0.18, yi - 0.18],
                         color=colors[kind], lw=1.2, ls=(0, (2, 1)))
        axes[0].plot(c.loc[kind, "mean_bits"], yi, "o", color=colors[kind])
        if "null_bits" in c:
            axes[0].plot(c.loc[kind, "null_bits"], yi, "|", color="k", ms=14, mew=2)
        axes[1].plot([m.loc[kind, "reference_low"], m.loc[kind, "reference_high"]], [yi, yi], color=colors[kind],
                     lw=2.5)
        axes[1].plot(m.loc[kind, "reference_auc"], yi, "o", color=colors[kind])
        axes[1].plot(m.loc[kind, "original_auc"], yi, "x", color="k", ms=7)
    axes[0].axvline(0, color="k", lw=1)
    axes[0].set_title("Controls' GenEx before unlearning\n(should be ≈ its null value, ≈ 0 bits)", fontsize=9)
    axes[0].set_xlabel("GenEx (bits)")
    axes[0].set_yticks(y, [kind_label(k, labels) for k in kinds])
    axes[1].axvline(0.5, color="k", lw=1)
    axes[1].set_title("Membership AUC under the reference models\n(should be ≈ 0.5)", fontsize=9)
    axes[1].set(xlabel="AUC (forget set vs its population)", xlim=(-0.02, 1.02))
    handles = [plt.Line2D([], [], color="grey", marker="o", lw=2.5), plt.Line2D([], [], color="grey", marker=".",
               ls=""), plt.Line2D([], [], color="k", marker="x", ls="")]
    names = ["mean and 95% interval", "one control x original seed", "originals' AUC"]
    if "null_bits" in c:
        handles.append(plt.Line2D([], [], color="k", marker="|", ms=10, mew=2, ls=""))
        names.append("controls: null value (an original\nlike one more reference)")
    if widened:
        handles.append(plt.Line2D([], [], color="grey", lw=1.2, ls=(0, (2, 1))))
        names[0] = "mean and 95% interval\n(controls: with reference-seed\nand set-draw noise)"
        names.append("controls: seeds and controls only")
    axes[1].legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle("Sanity checks before unlearning", fontsize=10)
    fig.tight_layout()
    return fig
