"""Interactive exploration of an unlearning run in JupyterLab (notebooks 03 and 04).

:class:`Explorer` shows one (forget set, method) trajectory of the per-step results table:

- a **step slider** over the recorded steps: it moves a marker along the metric and utility plots and
  refreshes a per-example table. Nothing is recomputed: each selection's curves and per-example values
  are tabulated once (:meth:`Explorer._prepare`), a step change only moves markers and re-renders;
- a **selector** (dropdowns) of forget-set kind and method;
- a **"run more steps"** box and button: it extends the selected trajectory through a runner (see
  :class:`StepRunner`) with a progress bar, and refuses a bad request (negative, zero, non-integer,
  above ``max_widget_steps``) with a visible message.

The plots are :class:`matplotlib.figure.Figure` objects (not pyplot figures, so the inline backend never
shows them by itself) rendered to PNG into :class:`ipywidgets.Image` widgets, which update in place.
The controls only call plain methods (:meth:`Explorer.set_step`, :meth:`Explorer.set_selection`,
:meth:`Explorer.request_more_steps`), so the logic is testable without a browser. Creating an Explorer
renders two small images and returns: a notebook cell that shows one never waits for events, which
keeps papermill and nbval runs safe.

:class:`StepRunner` continues an (kind, method) trajectory beyond the recorded steps. The first time,
it rebuilds the recorded trajectory once with :func:`forgetlab.study.unlearn_forget_set` (same seeds and
settings, hence the same weights); after each extension it caches every seed's unlearner state
(safetensors) and the new rows in one :class:`~forgetlab.cache.ArtifactCache` entry, so a rerun of the
notebook resumes from the last extended step instead of starting again from step 0.
"""
from __future__ import annotations

import copy
import html
import io
import math
import numbers
import time
from collections import Counter
from typing import Callable, Protocol

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import study
from .cache import ArtifactCache, cache_key
from .plots import KIND_COLORS, KIND_LABELS, METHOD_LABELS, kind_label
from .unlearning import UnlearnSettings, Unlearner

TRAJECTORY_VERSION = 1
REQUIRED_COLUMNS = ("step", "seed", "uid", "role", "metric", "value", "kind", "method")
UTILITY_LOSS_PREFIX = "loss_"
ProgressFn = Callable[[int, int, str], None]


class MoreStepsRunner(Protocol):
    """What the "run more steps" button calls: new rows (same columns as the results table) for `n` more steps.

    ``progress(done, total, what)`` may be called while it runs. A runner may also offer
    ``cached_rows() -> DataFrame`` (rows of earlier extensions), which the Explorer adds at start.
    """
    def __call__(self, kind: str, method: str, n: int, progress: ProgressFn | None = None) -> pd.DataFrame: ...


def parse_step_count(value, maximum: int) -> int:
    """A request for more steps as a positive integer <= maximum; ValueError with a readable reason otherwise.

    Accepts ints, integral floats (``3.0``) and text (``" 12 "``), since the widget's box is free text.
    """
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, bool) or text is None or text == "":
        raise ValueError(f"enter a number of steps: a whole number from 1 to {maximum}")
    if isinstance(text, str):
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a number: enter a whole number of steps from 1 to {maximum}") from None
    elif isinstance(text, numbers.Real):
        number = float(text)
    else:
        raise ValueError(f"{value!r} is not a number: enter a whole number of steps from 1 to {maximum}")
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number: enter a whole number of steps from 1 to {maximum}")
    if number < 0:
        raise ValueError(f"{value!r} is negative: unlearning cannot go back; enter a whole number from 1 to {maximum}")
    if number != int(number):
        raise ValueError(f"{value!r} is not a whole number of steps: enter an integer from 1 to {maximum}")
    n = int(number)
    if n == 0:
        raise ValueError(f"0 steps would do nothing: enter a whole number from 1 to {maximum}")
    if n > maximum:
        raise ValueError(f"{n} steps is more than the maximum of {maximum} at once (parameter max_widget_steps): "
                         f"enter at most {maximum}, or raise max_widget_steps")
    return n


def _ordered(values, order) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


class _Selection:
    """One (kind, method) trajectory, tabulated once so that moving the step slider computes nothing."""

    def __init__(self, table: pd.DataFrame, kind: str, method: str):
        sub = table[(table.kind == kind) & (table.method == method)]
        self.kind, self.method = kind, method
        self.steps = sorted(int(s) for s in sub.step.unique())
        per_example = sub[sub.role.isin(["forget", "control"])]
        mean = per_example.groupby(["role", "metric", "step"]).value.mean()

        def curve(role: str, metric: str) -> pd.Series:
            try:
                return mean.loc[(role, metric)].reindex(self.steps)
            except KeyError:
                return pd.Series(np.nan, index=self.steps)

        self.quality = pd.DataFrame({"genex_forget": curve("forget", "genex_bits"),
                                     "relex_forget": curve("forget", "relex_bits"),
                                     "genex_control": curve("control", "genex_bits")}, index=self.steps)
        model = sub[sub.role == "model"]
        self.utility = (model.groupby(["step", "metric"]).value.mean().unstack("metric").reindex(self.steps)
                        if len(model) else pd.DataFrame(index=self.steps))
        metrics = ["genex_bits", "relex_bits", "exposure_bits", "ll"]
        wide = (per_example[per_example.metric.isin(metrics)]
                .pivot_table(index=["step", "role", "uid"], columns="metric", values="value", aggfunc="mean"))
        self.columns = [m for m in metrics if m in wide.columns]
        self.examples = wide[self.columns] if len(wide) else wide
        self.start = (self.examples.xs(self.steps[0], level="step")
                      if len(self.examples) and self.steps else None)

    def nearest(self, step) -> int:
        steps = np.asarray(self.steps)
        return int(steps[np.argmin(np.abs(steps - float(step)))])

    def at(self, step: int) -> pd.DataFrame:
        """Per-example values at a recorded step (forget first, then controls)."""
        if not len(self.examples):
            return pd.DataFrame()
        df = self.examples.xs(step, level="step").copy()
        if "genex_bits" in df and self.start is not None and "genex_bits" in self.start:
            df.insert(1, "genex_change", df.genex_bits - self.start.genex_bits.reindex(df.index))
        order = {"forget": 0, "control": 1}
        df = df.reset_index()
        return df.sort_values(["role", "uid"], key=lambda c: c.map(order) if c.name == "role" else c)


class Explorer:
    """Step slider, kind/method selector and "run more steps" over a per-step unlearning results table.

    Parameters
    ----------
    results: the tidy per-step table of :func:`forgetlab.study.run_study` (or of ``unlearn_forget_set``).
    run_more: optional callable ``(kind, method, n, progress=None) -> new rows`` (e.g. a :class:`StepRunner`);
        without it the button explains that running more steps is not available.
    max_widget_steps: the most steps one click may add (the parameter of the same name).
    target_bits: GenEx target drawn as a dashed line and used to mark examples as unlearned.
    view: ``"steps"`` (GenEx and RelEx against the step) or ``"tradeoff"`` (GenEx against held-out perplexity).
    kind, method, step: the initial selection (default: the first kind and method, step 0).
    """

    def __init__(self, results: pd.DataFrame, run_more: MoreStepsRunner | None = None, *, max_widget_steps: int = 50,
                 target_bits: float | None = None, view: str = "steps", kind: str | None = None,
                 method: str | None = None, step: int | None = None):
        missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
        if missing:
            raise ValueError(f"the results table lacks columns {missing}: pass the table of study.run_study")
        if results.empty:
            raise ValueError("the results table is empty: run the study first (study.run_study)")
        if view not in ("steps", "tradeoff"):
            raise ValueError(f"view = {view!r} is unknown: use 'steps' or 'tradeoff'")
        if isinstance(max_widget_steps, bool) or not isinstance(max_widget_steps, numbers.Integral) \
                or max_widget_steps < 1:
            raise ValueError(f"max_widget_steps = {max_widget_steps!r} must be an integer >= 1")
        self.run_more = run_more
        self.max_widget_steps = int(max_widget_steps)
        self.target_bits = target_bits
        self.view = view
        cached = getattr(run_more, "cached_rows", None)
        extra = cached() if callable(cached) else None
        self.results = results if extra is None or extra.empty else self._merge(results, extra)
        self.kinds = _ordered(self.results.kind, list(KIND_LABELS))
        self.methods = _ordered(self.results.method, list(METHOD_LABELS))
        self.stats: Counter = Counter()   # how often each kind of update ran (the unit tests read it)
        self._prepared: dict[tuple[str, str], _Selection] = {}
        self._busy = False
        self._syncing = False
        self.kind = self._check_choice("kind", kind or self.kinds[0], self.kinds)
        self.method = self._check_choice("method", method or self.methods[0], self.methods)
        self.selection = self._prepare(self.kind, self.method)
        self.step = self.selection.nearest(0 if step is None else step)
        self._build_widgets()
        self._draw()
        self._update_step_views()

    # ---- plain logic (what the controls call) ----------------------------------------------------------

    @staticmethod
    def _merge(results: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
        extra = extra[list(results.columns)] if set(results.columns) <= set(extra.columns) else extra
        both = pd.concat([results, extra], ignore_index=True)
        return both.drop_duplicates(subset=["step", "seed", "uid", "role", "metric", "kind", "method"], keep="last")

    @staticmethod
    def _check_choice(name: str, value: str, options: list[str]) -> str:
        if value not in options:
            raise ValueError(f"{name} = {value!r} is not in these results: use one of {', '.join(options)}")
        return value

    def _prepare(self, kind: str, method: str) -> _Selection:
        key = (kind, method)
        if key not in self._prepared:
            self.stats["prepare"] += 1
            self._prepared[key] = _Selection(self.results, kind, method)
        return self._prepared[key]

    @property
    def steps(self) -> list[int]:
        """Recorded steps of the current selection."""
        return list(self.selection.steps)

    def set_step(self, step) -> int:
        """Show a recorded step (the nearest one to `step`); returns the step shown."""
        if isinstance(step, bool) or not isinstance(step, numbers.Real) or not math.isfinite(step):
            raise ValueError(f"step = {step!r} must be a number, one of the recorded steps {self.steps}")
        new = self.selection.nearest(step)
        if new != self.step or self.slider.value != new:
            self.step = new
            self._sync(self.slider, "value", new)
            self._update_step_views()
        return self.step

    def set_selection(self, kind: str | None = None, method: str | None = None) -> tuple[str, str]:
        """Show another forget set and/or method, at the same step when it was recorded (else the nearest)."""
        kind = self._check_choice("kind", kind or self.kind, self.kinds)
        method = self._check_choice("method", method or self.method, self.methods)
        if (kind, method) != (self.kind, self.method):
            self.kind, self.method = kind, method
            self.selection = self._prepare(kind, method)
            self.step = self.selection.nearest(self.step)
            self._sync_controls()
            self._draw()
            self._update_step_views()
        return self.kind, self.method

    def request_more_steps(self, value) -> str:
        """Validate a request for more steps and, if good, run them; returns (and shows) the message."""
        try:
            n = parse_step_count(value, self.max_widget_steps)
        except ValueError as exc:
            return self._say(f"Not run: {exc}.", error=True)
        if self.run_more is None:
            return self._say("Not run: running more steps is not available here (no runner was given to the "
                             "Explorer).", error=True)
        if self._busy:
            return self._say("Not run: a run is already in progress; wait for it to finish.", error=True)
        kind, method = self.kind, self.method
        self._busy = True
        self.button.disabled = True
        self.progress.max, self.progress.value = n, 0
        self.progress.bar_style = "info"
        self.progress.layout.visibility = "visible"
        self._say(f"Running {n} more step(s) of {METHOD_LABELS.get(method, method)} on "
                  f"{kind_label(kind)}...")
        t0 = time.perf_counter()
        try:
            rows = self.run_more(kind, method, n, progress=self._progress)
            if rows is None or len(rows) == 0:
                raise RuntimeError("the runner returned no rows")
            self.add_rows(rows)
        except Exception as exc:  # noqa: BLE001 - shown to the reader; the widget stays usable
            self.progress.bar_style = "danger"
            return self._say(f"Failed: {type(exc).__name__}: {exc}", error=True)
        finally:
            self._busy = False
            self.button.disabled = False
        self.progress.value = self.progress.max
        self.progress.bar_style = "success"
        if (kind, method) == (self.kind, self.method):
            self.set_step(self.steps[-1])
        end = int(pd.to_numeric(rows.step).max())
        return self._say(f"Ran {n} more step(s) of {METHOD_LABELS.get(method, method)} on {kind_label(kind)} in "
                         f"{time.perf_counter() - t0:.1f} s: the trajectory now ends at step {end}.")

    def add_rows(self, rows: pd.DataFrame) -> None:
        """Add rows (e.g. of more steps) to the table; affected selections are tabulated again, once."""
        missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
        if missing:
            raise ValueError(f"new rows lack columns {missing}")
        self.results = self._merge(self.results, rows)
        for key in set(zip(rows.kind, rows.method)):
            self._prepared.pop(key, None)
        if (self.kind, self.method) in set(zip(rows.kind, rows.method)):
            self.selection = self._prepare(self.kind, self.method)
            self._sync_controls()
            self._draw()
            self._update_step_views()

    def table_at(self, step: int | None = None) -> pd.DataFrame:
        """Per-example values of the current selection at a recorded step (default: the current one)."""
        df = self.selection.at(self.step if step is None else self.selection.nearest(step))
        if self.target_bits is not None and "genex_bits" in df:
            # only forget examples are being unlearned; a control's GenEx is the metric's noise floor
            df["unlearned"] = np.where(df.role != "forget", "", np.where(df.genex_bits < self.target_bits, "yes", "no"))
        df.columns.name = None
        return df

    # ---- widgets ---------------------------------------------------------------------------------------

    def _build_widgets(self) -> None:
        import ipywidgets as W

        self.title = W.HTML()
        self.kind_select = W.Dropdown(options=[(kind_label(k), k) for k in self.kinds], value=self.kind,
                                      description="forget set", style={"description_width": "initial"})
        self.method_select = W.Dropdown(options=[(METHOD_LABELS.get(m, m), m) for m in self.methods],
                                        value=self.method, description="method",
                                        style={"description_width": "initial"})
        self.slider = W.SelectionSlider(options=self._step_options(), value=self.step, description="step",
                                        continuous_update=False, layout=W.Layout(width="95%"))
        self.metric_image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.utility_image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.table = W.HTML()
        self.more_steps = W.Text(value=str(min(10, self.max_widget_steps)), description="more steps",
                                 placeholder=f"1 to {self.max_widget_steps}", layout=W.Layout(width="220px"),
                                 style={"description_width": "initial"})
        self.button = W.Button(description="Run more steps", button_style="primary", icon="play",
                               tooltip=f"extend the selected trajectory by up to {self.max_widget_steps} steps")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="progress",
                                      layout=W.Layout(visibility="hidden"))
        self.progress_label = W.HTML()
        self.message = W.HTML()
        for widget, cls in ((self.slider, "forgetlab-step-slider"), (self.kind_select, "forgetlab-kind"),
                            (self.method_select, "forgetlab-method"), (self.metric_image, "forgetlab-metric-plot"),
                            (self.utility_image, "forgetlab-utility-plot"), (self.table, "forgetlab-table"),
                            (self.more_steps, "forgetlab-more-steps"), (self.button, "forgetlab-run-more"),
                            (self.progress, "forgetlab-progress"), (self.progress_label, "forgetlab-progress-label"),
                            (self.message, "forgetlab-message"),
                            (self.title, "forgetlab-title")):
            widget.add_class(cls)
        self.slider.observe(self._on_slider, names="value")
        self.kind_select.observe(self._on_kind, names="value")
        self.method_select.observe(self._on_method, names="value")
        self.button.on_click(lambda _: self.request_more_steps(self.more_steps.value))
        self.widget = W.VBox([
            self.title,
            W.HBox([self.kind_select, self.method_select]),
            self.slider,
            W.HBox([self.metric_image, self.utility_image], layout=W.Layout(flex_flow="row wrap")),
            self.table,
            W.HBox([self.more_steps, self.button, self.progress, self.progress_label]),
            self.message,
        ])
        self.widget.add_class("forgetlab-explorer")

    def _step_options(self) -> list[tuple[str, int]]:
        return [(str(s), s) for s in self.selection.steps]

    def _sync(self, widget, name: str, value) -> None:
        """Set a control's value without its observer calling back into the Explorer."""
        if getattr(widget, name) == value:
            return
        self._syncing = True
        try:
            setattr(widget, name, value)
        finally:
            self._syncing = False

    def _sync_controls(self) -> None:
        self._sync(self.kind_select, "value", self.kind)
        self._sync(self.method_select, "value", self.method)
        options = self._step_options()
        if list(self.slider.options) != options:
            self._syncing = True
            try:
                self.slider.options = options
                self.slider.value = self.step
            finally:
                self._syncing = False
        else:
            self._sync(self.slider, "value", self.step)

    def _on_slider(self, change) -> None:
        if not self._syncing:
            self.set_step(change["new"])

    def _on_kind(self, change) -> None:
        if not self._syncing:
            self.set_selection(kind=change["new"])

    def _on_method(self, change) -> None:
        if not self._syncing:
            self.set_selection(method=change["new"])

    def _progress(self, done: int, total: int, what: str = "") -> None:
        self.progress.max = max(1, int(total))
        self.progress.value = min(int(done), self.progress.max)
        self.progress_label.value = html.escape(what) if what else f"{int(done)}/{int(total)} steps"

    def _say(self, text: str, error: bool = False) -> str:
        color = "#b00020" if error else "#1b5e20"
        icon = "&#9888; " if error else ""
        self.message.value = f'<span style="color:{color}; font-weight:600">{icon}{html.escape(text)}</span>'
        self.last_message = text
        return text

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = (f"forgetlab Explorer ({len(self.kinds)} forget sets x {len(self.methods)} "
                                    f"methods): a step slider and controls; they need a live kernel in JupyterLab")
        return bundle

    def display(self):
        """The widget to show in a notebook (the Explorer itself displays as this widget too)."""
        return self.widget

    # ---- plots -----------------------------------------------------------------------------------------

    def _draw(self) -> None:
        """Draw the current selection's curves (on selection change); the step markers come later."""
        self.stats["draw"] += 1
        sel = self.selection
        color = KIND_COLORS.get(sel.kind, "#333333")
        mlabel = METHOD_LABELS.get(sel.method, sel.method)
        steps = np.asarray(sel.steps)

        fig = Figure(figsize=(5.0, 3.4), dpi=85)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        q = sel.quality
        if self.view == "tradeoff":
            for kind in self.kinds:
                if kind == sel.kind:
                    continue
                other = self._prepare(kind, sel.method)
                if "heldout_ppl" in other.utility:
                    ax.plot(other.utility.heldout_ppl, other.quality.genex_forget, color=KIND_COLORS.get(kind, "grey"),
                            alpha=0.45, lw=1, label=kind_label(kind))
            x = sel.utility["heldout_ppl"] if "heldout_ppl" in sel.utility else pd.Series(steps, index=steps)
            ax.plot(x, q.genex_forget, color=color, marker=".", lw=2, label=f"{kind_label(sel.kind)} (selected)")
            self._x_of_step = dict(zip(steps.tolist(), np.asarray(x, dtype=float).tolist()))
            ax.set(xlabel="held-out perplexity (lower is better)", ylabel="GenEx of forget set (bits)",
                   title=f"Quality vs performance · {mlabel}")
            self._metric_vline = None
        else:
            ax.plot(steps, q.genex_forget, color=color, lw=2, label="GenEx, forget set")
            ax.plot(steps, q.relex_forget, color=color, ls="--", lw=1.5, label="RelEx, forget set")
            ax.plot(steps, q.genex_control, color="grey", ls=":", lw=1.5, label="GenEx, non-member controls")
            self._x_of_step = {int(s): float(s) for s in steps}
            ax.set(xlabel="unlearning step", ylabel="bits", title=f"{kind_label(sel.kind)} · {mlabel}")
            self._metric_vline = ax.axvline(steps[0], color="k", lw=1, alpha=0.6)
        if self.target_bits is not None:
            ax.axhline(self.target_bits, color="k", ls="--", lw=0.8, label=f"target {self.target_bits:g} bit")
        ax.axhline(0, color="grey", lw=0.6)
        (self._metric_dot,) = ax.plot([], [], "o", color=color, ms=8, mec="k", zorder=5)
        self._metric_text = ax.text(0.98, 0.97, "", transform=ax.transAxes, ha="right", va="top", fontsize=8,
                                    bbox=dict(boxstyle="round", fc="white", alpha=0.85))
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        if self.view == "steps":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        self.metric_figure = fig

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
        loss_cols = [c for c in u.columns if c == "retain_loss" or c.startswith(UTILITY_LOSS_PREFIX)]
        for col in loss_cols:
            k = col[len(UTILITY_LOSS_PREFIX):]
            lbl = "retained training data" if col == "retain_loss" else kind_label(k)
            c = "#555555" if col == "retain_loss" else KIND_COLORS.get(k, None)
            ax_loss.plot(steps, u[col], color=c, lw=1.5, label=lbl)
            (dot,) = ax_loss.plot([], [], "o", color=c, ms=5, mec="k", zorder=5)
            self._utility_dots.append((dot, u[col]))
        ax_loss.set(xlabel="unlearning step", ylabel="loss (nats / token)", title="Loss on other data")
        if loss_cols:
            ax_loss.legend(fontsize=7)
        for a in (ax_ppl, ax_loss):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            self._utility_vlines.append(a.axvline(steps[0], color="k", lw=1, alpha=0.6))
        fig.suptitle(f"Utility while unlearning {kind_label(sel.kind)} with {mlabel}", fontsize=10)
        fig.tight_layout()
        self.utility_figure = fig

    @staticmethod
    def _png(fig: Figure) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def _update_step_views(self) -> None:
        """Move the step markers, re-render both images and refresh the table and title (no recomputation)."""
        self.stats["step_views"] += 1
        sel, s = self.selection, self.step
        q = sel.quality.loc[s]
        x = self._x_of_step.get(s, float(s))
        self._metric_dot.set_data([x], [q.genex_forget])
        if self._metric_vline is not None:
            self._metric_vline.set_xdata([s, s])
        self._metric_text.set_text(f"step {s}\nGenEx {q.genex_forget:.2f} bits\nRelEx {q.relex_forget:.2f} bits")
        for dot, series in self._utility_dots:
            dot.set_data([s], [series.loc[s]])
        for line in self._utility_vlines:
            line.set_xdata([s, s])
        self.metric_image.value = self._png(self.metric_figure)
        self.utility_image.value = self._png(self.utility_figure)
        self.table.value = self._table_html()
        u = sel.utility.loc[s] if s in sel.utility.index else pd.Series(dtype=float)
        ppl = f"held-out perplexity {u['heldout_ppl']:.2f}" if "heldout_ppl" in u else ""
        auc = f" · membership AUC {u['membership_auc']:.2f}" if "membership_auc" in u else ""
        method = html.escape(METHOD_LABELS.get(sel.method, sel.method))
        self.title.value = (f"<b>Step {s}</b> of {sel.steps[0]}&ndash;{sel.steps[-1]} · "
                            f"{html.escape(kind_label(sel.kind))} · {method}"
                            f" · mean GenEx {q.genex_forget:.2f} bits · {ppl}{auc}")

    def _table_html(self) -> str:
        df = self.table_at()
        if df.empty:
            return "<i>no per-example values recorded for this selection</i>"
        names = {"genex_bits": "GenEx (bits)", "genex_change": "change since step 0 (bits)",
                 "relex_bits": "RelEx (bits)", "exposure_bits": "exposure (bits)",
                 "ll": "log-likelihood (nats)", "unlearned": "below target"}
        df = df.rename(columns=names)
        styles = ("<style>.forgetlab-tab{border-collapse:collapse;font-size:12px}"
                  ".forgetlab-tab th,.forgetlab-tab td{border:1px solid #ccc;padding:1px 6px;text-align:right;"
                  "line-height:1.3;white-space:nowrap}"
                  ".forgetlab-tab td:nth-child(-n+2),.forgetlab-tab th:nth-child(-n+2){text-align:left}</style>")
        caption = (f"<div><b>Per-example values at step {self.step}</b> ({html.escape(kind_label(self.kind))}, "
                   f"{html.escape(METHOD_LABELS.get(self.method, self.method))}; forget examples, then non-member "
                   f"controls; per-seed values averaged)</div>")
        body = df.to_html(index=False, classes="forgetlab-tab", border=0, float_format=lambda v: f"{v:.2f}",
                          na_rep="")
        return styles + caption + f'<div style="overflow-x:auto">{body}</div>'


# ---- running more steps -----------------------------------------------------------------------------------

class StepRunner:
    """Extends a (kind, method) unlearning trajectory of a run beyond its recorded steps, from cached state.

    ``runner(kind, method, n, progress=None)`` returns the rows of ``n`` more steps (same columns and
    recording schedule as ``study.run_study``, GenEx included), for every original seed.
    """

    def __init__(self, p: dict, data, models: dict, cache: ArtifactCache | None = None):
        self.p, self.data, self.models = p, data, models
        self.cache = cache or ArtifactCache()
        self.study_key = study.study_key(p, data, models)
        self._live: dict[tuple[str, str], list[Unlearner]] = {}
        self._rows: dict[tuple[str, str], pd.DataFrame] = {}
        self._ref_ll: dict[str, np.ndarray] = {}

    def key(self, kind: str, method: str) -> str:
        seeds = [m.seed for m in self.models["original"]]
        return cache_key("trajectory", TRAJECTORY_VERSION, self.study_key, kind, method, seeds)

    def _check(self, kind: str, method: str) -> None:
        study.check_inputs(self.p, self.data, self.models, kind)
        if method not in self.p["methods"]:
            raise ValueError(f"method {method!r} is not in this run (methods = {self.p['methods']})")

    def cached_rows(self) -> pd.DataFrame:
        """Rows of every earlier extension of this run found in the cache (empty if none)."""
        frames = []
        for kind in self.p["forget_kinds"]:
            for method in self.p["methods"]:
                rows = self._load_rows(kind, method)
                if rows is not None:
                    frames.append(rows)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(REQUIRED_COLUMNS))

    def _load_rows(self, kind: str, method: str) -> pd.DataFrame | None:
        if (kind, method) in self._rows:
            return self._rows[(kind, method)]
        key = self.key(kind, method)
        if not self.cache.has("trajectory", key):
            return None
        _, _, files = self.cache.load("trajectory", key)
        rows = pd.read_csv(io.StringIO(files["rows.csv"]), keep_default_na=False, na_values=[""],
                           dtype={"uid": str}).fillna({"uid": ""})
        self._rows[(kind, method)] = rows
        return rows

    def end_step(self, kind: str, method: str) -> int:
        """The last step of the (kind, method) trajectory as far as it has been run (cached or recorded)."""
        if (kind, method) in self._live:
            return self._live[(kind, method)][0].step
        rows = self._load_rows(kind, method)
        return int(rows.step.max()) if rows is not None and len(rows) else int(self.p["unlearn_steps"])

    def _view_and_ref(self, kind: str):
        view = study.ForgetSetView.build(self.data, kind)
        if kind not in self._ref_ll:
            self._ref_ll[kind] = study.reference_logprobs(self.models, view.targets)
        return view, self._ref_ll[kind]

    def _new_unlearners(self, kind: str, method: str) -> list[Unlearner]:
        """Unlearners at step 0, built exactly as study.unlearn_forget_set builds them."""
        settings = UnlearnSettings.from_params(self.p, method)
        view = study.ForgetSetView.build(self.data, kind)
        forget = view.targets[view.targets.role == "forget"]
        retain = study.retain_rows(self.data, self.p["seed"])
        return [Unlearner(copy.deepcopy(tm.model), [list(i) for i in forget.ids], forget.score_start.tolist(),
                          settings, self.data.bos, retain_rows=retain) for tm in self.models["original"]]

    def _resume(self, kind: str, method: str, progress: ProgressFn) -> list[Unlearner]:
        if (kind, method) in self._live:
            return self._live[(kind, method)]
        key = self.key(kind, method)
        if self.cache.has("trajectory", key):
            progress(0, 1, "loading the cached trajectory")
            meta, tensors, _ = self.cache.load("trajectory", key)
            unlearners = self._new_unlearners(kind, method)
            for u, tm in zip(unlearners, self.models["original"]):
                prefix = f"seed{tm.seed}."
                u.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            if any(u.step != meta["step"] for u in unlearners):
                raise ValueError(f"cached trajectory {self.cache.path('trajectory', key)} is inconsistent: "
                                 f"delete it and rerun")
            self._load_rows(kind, method)
        else:
            # Once per (kind, method): the recorded trajectory is rebuilt (deterministically: same seeds and
            # settings give the same weights) to get the unlearners' state at its last step.
            progress(0, 1, f"rebuilding the recorded {self.p['unlearn_steps']} steps once")
            view, ref_ll = self._view_and_ref(kind)
            _, unlearners = study.unlearn_forget_set(self.p, self.data, self.models, kind, method, ref_ll=ref_ll,
                                                     keep_unlearners=True)
        self._live[(kind, method)] = unlearners
        return unlearners

    def __call__(self, kind: str, method: str, n: int, progress: ProgressFn | None = None) -> pd.DataFrame:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n = {n!r} must be a whole number of steps >= 1")
        self._check(kind, method)
        progress = progress or (lambda done, total, what="": None)
        unlearners = self._resume(kind, method, progress)
        view, ref_ll = self._view_and_ref(kind)
        start = unlearners[0].step
        final = start + int(n)
        every = int(self.p["record_every"])
        evaluate = study.make_evaluator(self.data, view, final)
        total = int(n) * len(unlearners)
        done = 0
        progress(done, total, f"steps {start + 1}-{final}")
        frames = []
        for u, tm in zip(unlearners, self.models["original"]):
            records = []
            # stop at the same steps as one long run would record (multiples of record_every, and the last)
            while u.step < final:
                stop = min(final, (u.step // every + 1) * every)
                taken = stop - u.step
                records += u.run(taken, evaluate)
                done += taken
                progress(done, total, f"seed {tm.seed}: step {u.step} of {final}")
            frames.append(pd.DataFrame(records).assign(seed=tm.seed))
        table = pd.concat(frames, ignore_index=True).assign(kind=kind, method=method)
        table = study.add_genex(table, view.targets, ref_ll)[list(REQUIRED_COLUMNS)]
        old = self._rows.get((kind, method))
        rows = table if old is None or old.empty else pd.concat([old, table], ignore_index=True)
        tensors = {}
        for u, tm in zip(unlearners, self.models["original"]):
            tensors.update({f"seed{tm.seed}.{k}": v for k, v in u.state_tensors().items()})
        self.cache.save("trajectory", self.key(kind, method),
                        {"kind": kind, "method": method, "step": final, "study_key": self.study_key,
                         "seeds": [m.seed for m in self.models["original"]]},
                        tensors=tensors, files={"rows.csv": rows.to_csv(index=False)})
        self._rows[(kind, method)] = rows
        return table
