"""The step explorer's drawing: its two figures with movable step markers, its title and its per-example table.

The figures are :class:`matplotlib.figure.Figure` objects (not pyplot figures, so the inline backend never shows
them by itself), drawn once per selection by :class:`StepFigures`; moving to another step only moves markers and
renders PNG bytes. Kind labels come from the caller (``labels``: kind -> label, e.g. a backend's ``labels``);
kinds without one take :data:`forgetlab.plots.KIND_LABELS`' label or their own name, and kinds without a colour
of their own take one from a stable palette (:func:`forgetlab.plots.kind_colors`).
"""
from __future__ import annotations

import html
import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .explorer_state import UTILITY_LOSS_PREFIX, Selection
from .plots import KIND_LABELS, METHOD_LABELS, kind_colors, kind_label

OTHER_COLOR = "#555555"      # retained training data, and anything without a kind
TABLE_NAMES = {"genex_bits": "GenEx (bits)", "genex_change": "change since step 0 (bits)",
               "relex_bits": "RelEx (bits)", "exposure_bits": "exposure (bits)",
               "ll": "log-likelihood (nats)", "unlearned": "below target"}
TABLE_STYLE = ("<style>.forgetlab-tab{border-collapse:collapse;font-size:12px}"
               ".forgetlab-tab th,.forgetlab-tab td{border:1px solid #ccc;padding:1px 6px;text-align:right;"
               "line-height:1.3;white-space:nowrap}"
               ".forgetlab-tab td:nth-child(-n+2),.forgetlab-tab th:nth-child(-n+2){text-align:left}</style>")


def display_order(labels: Mapping[str, str] | None = None) -> list[str]:
    """The order kinds are offered in: the suite's kinds, then those of `labels`, then (elsewhere) the rest."""
    return list(dict.fromkeys([*KIND_LABELS, *(labels or {})]))


def resolve_labels(kinds: Iterable[str], labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """kind -> display label for every kind: from `labels`, else the suite's label, else the kind itself."""
    return {k: kind_label(k, labels) for k in dict.fromkeys(kinds)}


def palette(kinds: Iterable[str], labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """kind -> colour, the same as in the suite's figures (unknown kinds in a stable order)."""
    return kind_colors(kinds, labels)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class StepFigures:
    """The quality figure and the utility figure of one selection, with markers at the shown step.

    view ``"steps"``: GenEx and RelEx against the step; ``"tradeoff"``: GenEx against held-out perplexity, with
    the same method's other kinds (`others`: (kind, selection) pairs) drawn faintly behind.
    """

    def __init__(self, sel: Selection, *, view: str, target_bits: float | None, labels: Mapping[str, str],
                 colors: Mapping[str, str], others: Sequence[tuple[str, Selection]] = ()):
        self.sel, self.view, self.labels, self.colors = sel, view, labels, colors
        self.metric_figure = self._quality(target_bits, others)
        self.utility_figure = self._utility()

    def _label(self, kind: str) -> str:
        return self.labels.get(kind, kind)

    def _quality(self, target_bits: float | None, others: Sequence[tuple[str, Selection]]) -> Figure:
        sel = self.sel
        color = self.colors.get(sel.kind, OTHER_COLOR)
        steps = np.asarray(sel.steps)
        fig = Figure(figsize=(5.0, 3.4), dpi=85)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        q = sel.quality
        if self.view == "tradeoff":
            for kind, other in others:
                if "heldout_ppl" in other.utility:
                    ax.plot(other.utility.heldout_ppl, other.quality.genex_forget,
                            color=self.colors.get(kind, OTHER_COLOR), alpha=0.45, lw=1, label=self._label(kind))
            x = sel.utility["heldout_ppl"] if "heldout_ppl" in sel.utility else pd.Series(steps, index=steps)
            ax.plot(x, q.genex_forget, color=color, marker=".", lw=2, label=f"{self._label(sel.kind)} (selected)")
            self._x_of_step = dict(zip(steps.tolist(), np.asarray(x, dtype=float).tolist()))
            ax.set(xlabel="held-out perplexity (lower is better)", ylabel="GenEx of forget set (bits)",
                   title=f"Quality vs performance · {method_label(sel.method)}")
            self._metric_vline = None
        else:
            ax.plot(steps, q.genex_forget, color=color, lw=2, label="GenEx, forget set")
            ax.plot(steps, q.relex_forget, color=color, ls="--", lw=1.5, label="RelEx, forget set")
            ax.plot(steps, q.genex_control, color="grey", ls=":", lw=1.5, label="GenEx, non-member controls")
            self._x_of_step = {int(s): float(s) for s in steps}
            ax.set(xlabel="unlearning step", ylabel="bits",
                   title=f"{self._label(sel.kind)} · {method_label(sel.method)}")
            self._metric_vline = ax.axvline(steps[0], color="k", lw=1, alpha=0.6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if target_bits is not None:
            ax.axhline(target_bits, color="k", ls="--", lw=0.8, label=f"target {target_bits:g} bit")
        ax.axhline(0, color="grey", lw=0.6)
        (self._metric_dot,) = ax.plot([], [], "o", color=color, ms=8, mec="k", zorder=5)
        self._metric_text = ax.text(0.98, 0.97, "", transform=ax.transAxes, ha="right", va="top", fontsize=8,
                                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85})
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        fig.tight_layout()
        return fig

    def _utility(self) -> Figure:
        sel = self.sel
        color = self.colors.get(sel.kind, OTHER_COLOR)
        steps = np.asarray(sel.steps)
        fig = Figure(figsize=(6.8, 3.4), dpi=85)
        FigureCanvasAgg(fig)
        ax_ppl, ax_loss = fig.subplots(1, 2)
        u = sel.utility
        self._utility_vlines, self._utility_dots = [], []
        if "heldout_ppl" in u:
            ax_ppl.plot(steps, u.heldout_ppl, color=color, lw=2)
            (dot,) = ax_ppl.plot([], [], "o", color=color, ms=7, mec="k", zorder=5)
            self._utility_dots.append((dot, u.heldout_ppl))
        ax_ppl.set(xlabel="unlearning step", ylabel="held-out perplexity", title="Held-out perplexity")
        loss_cols = sel.loss_columns()
        for col in loss_cols:
            kind = col[len(UTILITY_LOSS_PREFIX):]
            label = "retained training data" if col == "retain_loss" else self._label(kind)
            c = OTHER_COLOR if col == "retain_loss" else self.colors.get(kind, OTHER_COLOR)
            ax_loss.plot(steps, u[col], color=c, lw=1.5, label=label)
            (dot,) = ax_loss.plot([], [], "o", color=c, ms=5, mec="k", zorder=5)
            self._utility_dots.append((dot, u[col]))
        ax_loss.set(xlabel="unlearning step", ylabel="loss (nats / token)", title="Loss on other data")
        if loss_cols:
            ax_loss.legend(fontsize=7)
        for a in (ax_ppl, ax_loss):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            self._utility_vlines.append(a.axvline(steps[0], color="k", lw=1, alpha=0.6))
        fig.suptitle(f"Utility while unlearning {self._label(sel.kind)} with {method_label(sel.method)}", fontsize=10)
        fig.tight_layout()
        return fig

    def show_step(self, step: int) -> tuple[bytes, bytes]:
        """Move every marker to a recorded step; the two figures as PNG bytes."""
        q = self.sel.quality.loc[step]
        self._metric_dot.set_data([self._x_of_step.get(step, float(step))], [q.genex_forget])
        if self._metric_vline is not None:
            self._metric_vline.set_xdata([step, step])
        self._metric_text.set_text(f"step {step}\nGenEx {q.genex_forget:.2f} bits\nRelEx {q.relex_forget:.2f} bits")
        for dot, series in self._utility_dots:
            dot.set_data([step], [series.loc[step]])
        for line in self._utility_vlines:
            line.set_xdata([step, step])
        return png(self.metric_figure), png(self.utility_figure)


def title_html(sel: Selection, step: int, labels: Mapping[str, str]) -> str:
    """One line: the step and its range, the selection, mean GenEx, perplexity and membership AUC."""
    q = sel.quality.loc[step]
    u = sel.utility.loc[step] if step in sel.utility.index else pd.Series(dtype=float)
    ppl = f"held-out perplexity {u['heldout_ppl']:.2f}" if "heldout_ppl" in u else ""
    auc = f" · membership AUC {u['membership_auc']:.2f}" if "membership_auc" in u else ""
    return (f"<b>Step {step}</b> of {sel.steps[0]}&ndash;{sel.steps[-1]} · "
            f"{html.escape(labels.get(sel.kind, sel.kind))} · {html.escape(method_label(sel.method))}"
            f" · mean GenEx {q.genex_forget:.2f} bits · {ppl}{auc}")


def table_html(df: pd.DataFrame, step: int, kind: str, method: str, labels: Mapping[str, str]) -> str:
    """The per-example table (see :meth:`ExplorerState.table_at`) as HTML, with a caption."""
    if df.empty:
        return "<i>no per-example values recorded for this selection</i>"
    caption = (f"<div><b>Per-example values at step {step}</b> ({html.escape(labels.get(kind, kind))}, "
               f"{html.escape(method_label(method))}; forget examples, then non-member "
               f"controls; per-seed values averaged)</div>")
    body = df.rename(columns=TABLE_NAMES).to_html(index=False, classes="forgetlab-tab", border=0,
                                                  float_format=lambda v: f"{v:.2f}", na_rep="")
    return TABLE_STYLE + caption + f'<div style="overflow-x:auto">{body}</div>'
