"""Figures of notebook 07 (matched memorization): the dose-response, steps against initial GenEx, and the
ID-minus-OOD differences with their intervals. Same style, colours and ``labels`` argument as :mod:`forgetlab.plots`.
"""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .dose_matching import ENDPOINTS
from .plots import _legend_outside, kind_colors, kind_label, kind_order

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")


def _sentence(text: str) -> str:
    """First letter upper case, the rest as written (GenEx stays GenEx)."""
    return text[:1].upper() + text[1:]


def _genex(calibrated: bool) -> str:
    """How the axes name GenEx: calibrated (minus the controls' offset, dose_matching) or raw."""
    return "calibrated GenEx" if calibrated else "raw GenEx"


def count_markers(counts) -> dict[int, str]:
    """Marker of each insertion count, in increasing order of count."""
    return {int(c): MARKERS[i % len(MARKERS)] for i, c in enumerate(sorted({int(c) for c in counts}))}


def dose_response(dose: pd.DataFrame, endpoints: pd.DataFrame, resamples: int, *,
                  labels: Mapping[str, str] | None = None, calibrated: bool = True) -> plt.Figure:
    """Initial GenEx against insertion count per kind: mean with its 95% interval, and every example (faint).
    `calibrated` names the scale of the endpoints' GenEx on the axis (0: the never-trained controls' level)."""
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    kinds = kind_order(dose.kind, labels)
    colors = kind_colors(kinds, labels)
    counts = sorted(dose["count"].unique())
    offsets = dict(zip(kinds, np.linspace(-0.06, 0.06, len(kinds))))        # side by side on the log axis
    for kind in kinds:
        g = dose[dose.kind == kind].sort_values("count")
        x = g["count"].to_numpy(dtype=float) * 10 ** offsets[kind]
        ax.errorbar(x, g.initial_genex_bits, yerr=[g.initial_genex_bits - g.low, g.high - g.initial_genex_bits],
                    color=colors[kind], marker="o", capsize=3, label=kind_label(kind, labels))
        e = endpoints[endpoints.kind == kind]
        ax.scatter(e["count"].to_numpy(dtype=float) * 10 ** offsets[kind], e.initial, color=colors[kind], s=10,
                   alpha=0.3, linewidths=0)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set(title=f"Dose-response: initial {_genex(calibrated)} against insertion count", xlabel="times each forget "
           "example was inserted (log scale)", ylabel=f"initial {_genex(calibrated)} (bits per example)")
    _legend_outside(ax, title=f"kind (mean, 95% interval,\n{resamples} resamples)")
    fig.tight_layout()
    return fig


def steps_vs_initial(endpoints: pd.DataFrame, targets: Mapping[str, float], budget: int, *,
                     labels: Mapping[str, str] | None = None, calibrated: bool = True) -> plt.Figure:
    """Steps to unlearn and steps to remove 50% against initial GenEx (`calibrated` names its scale): colour per
    kind, marker per count; examples never there within the budget (censored) are hollow, drawn at the budget."""
    panels = [e for e in ENDPOINTS if e in endpoints.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels) + 2.0, 4.4), squeeze=False)
    kinds = kind_order(endpoints.kind, labels)
    colors = kind_colors(kinds, labels)
    markers = count_markers(endpoints["count"])
    for ax, value in zip(axes[0], panels):
        cens_col = "censored" if value == "steps_to_target" else f"censored_{value.split('_')[-1]}"
        for kind in kinds:
            for c, m in markers.items():
                g = endpoints[(endpoints.kind == kind) & (endpoints["count"] == c) & endpoints[value].notna()]
                cens = g[cens_col].astype(bool).to_numpy()
                ax.scatter(g.initial[~cens], g[value][~cens], marker=m, color=colors[kind], s=30, alpha=0.8)
                ax.scatter(g.initial[cens], g[value][cens], marker=m, facecolors="none", edgecolors=colors[kind],
                           s=30, alpha=0.9)
        ax.axhline(budget, color="grey", ls="--", lw=0.8)
        ax.text(0.01, budget, " budget: hollow = not reached (censored)", va="bottom", fontsize=8, color="grey",
                transform=ax.get_yaxis_transform())
        ax.set(title=_sentence(ENDPOINTS[value]), xlabel=f"initial {_genex(calibrated)} (bits per example)",
               ylabel="gradient-ascent steps", ylim=(-0.5, budget * 1.12 + 1))
    handles = [Line2D([], [], color=colors[k], marker="o", ls="", label=kind_label(k, labels)) for k in kinds]
    handles += [Line2D([], [], color="black", marker=m, ls="", label=f"inserted {c}x") for c, m in markers.items()]
    handles += [Line2D([], [], color="black", marker="o", mfc="none", ls="", label="censored (not reached)")]
    axes[0, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    floors = ", ".join(f"{kind_label(k, labels)} {targets[k]:.2g}" for k in kinds if k in targets)
    fig.text(0.01, -0.02, f"target (noise floor of the never-trained controls' |{_genex(calibrated)}| at step 0, "
             f"bits): {floors}", fontsize=8)
    fig.tight_layout()
    return fig


def matched_forest(verdicts: pd.DataFrame, *, labels: Mapping[str, str] | None = None) -> plt.Figure:
    """ID minus OOD steps per OOD kind and endpoint, matched (filled) and unmatched (hollow), with 95% intervals.
    Below 0: OOD needs more steps."""
    endpoints = [e for e in ENDPOINTS if e in set(verdicts.endpoint)]
    fig, axes = plt.subplots(1, len(endpoints), figsize=(5.2 * len(endpoints) + 2.0, 0.9 + 0.7 * verdicts.kind.nunique()),
                             squeeze=False, sharey=True)
    kinds = kind_order(verdicts.kind, labels)
    colors = kind_colors(kinds, labels)
    for ax, value in zip(axes[0], endpoints):
        for i, kind in enumerate(kinds):
            for comp, dy, face in (("matched", -0.12, None), ("unmatched", 0.12, "none")):
                r = verdicts[(verdicts.kind == kind) & (verdicts.endpoint == value) & (verdicts.comparison == comp)]
                if r.empty or not np.isfinite(r.estimate.iloc[0]):
                    continue
                r = r.iloc[0]
                ax.plot([r.low, r.high], [i + dy, i + dy], color=colors[kind], lw=2 if comp == "matched" else 1)
                ax.scatter([r.estimate], [i + dy], color=colors[kind], facecolors=face, zorder=3, s=40)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(kinds)), [f"ID - {kind_label(k, labels)}" for k in kinds])
        ax.invert_yaxis()
        ax.set(title=_sentence(ENDPOINTS[value]), xlabel="ID minus OOD (steps); < 0: OOD needs more")
    handles = [Line2D([], [], color="black", marker="o", label="matched initial GenEx"),
               Line2D([], [], color="black", marker="o", mfc="none", lw=1, label="unmatched (all examples)")]
    axes[0, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    return fig
