"""Interactive exploration of an unlearning run in JupyterLab (notebooks 03, 04 and 06): the widget wiring.

:class:`Explorer` shows one (forget set, method) trajectory of the per-step results table:

- a **step slider** over the recorded steps: it moves a marker along the metric and utility plots and
  refreshes a per-example table. Nothing is recomputed: each selection is tabulated once
  (:class:`forgetlab.explorer_state.Selection`), a step change only moves markers and re-renders;
- a **selector** (dropdowns) of forget-set kind and method;
- a **"run more steps"** box and button: it extends the selected trajectory through a runner (any
  :class:`~forgetlab.explorer_state.MoreStepsRunner`, e.g. ``forgetlab.trajectories.StepRunner(backend)``)
  with a progress bar, and refuses a bad request (negative, zero, non-integer, above ``max_widget_steps``)
  with a visible message.

What is shown lives in :mod:`forgetlab.explorer_state`, how it is drawn in :mod:`forgetlab.explorer_draw`; this
module builds the controls and connects them. The controls only call plain methods (:meth:`Explorer.set_step`,
:meth:`Explorer.set_selection`, :meth:`Explorer.request_more_steps`), so the logic is testable without a browser.
Creating an Explorer renders two small images and returns: a notebook cell that shows one never waits for
events, which keeps papermill and nbval runs safe.
"""
from __future__ import annotations

import html
import numbers
import time
from collections.abc import Mapping

import pandas as pd

from . import explorer_draw as draw
from .explorer_state import ExplorerState, MoreStepsRunner, Selection, loss_kinds, parse_step_count

VIEWS = ("steps", "tradeoff")
ERROR_COLOR, OK_COLOR = "#b00020", "#1b5e20"


def message_html(text: str, error: bool = False) -> str:
    """A widget's one-line message: green when all is well, red with a warning sign when a request is refused."""
    color = ERROR_COLOR if error else OK_COLOR
    icon = "&#9888; " if error else ""
    return f'<span style="color:{color}; font-weight:600">{icon}{html.escape(text)}</span>'


class Explorer:
    """Step slider, kind/method selector and "run more steps" over a per-step unlearning results table.

    Parameters
    ----------
    results: the tidy per-step table of :func:`forgetlab.engine.run_study` (or of ``unlearn_forget_set``).
    run_more: optional runner ``(kind, method, n, progress=None) -> new rows``, e.g.
        ``forgetlab.trajectories.StepRunner(backend)``; without it the button explains that running more steps
        is not available. Rows of its ``cached_rows()`` (earlier extensions), if it has one, are shown at start.
    max_widget_steps: the most steps one click may add (the parameter of the same name).
    target_bits: GenEx target drawn as a dashed line and used to mark examples as unlearned.
    view: ``"steps"`` (GenEx and RelEx against the step) or ``"tradeoff"`` (GenEx against held-out perplexity).
    labels: kind -> display label (e.g. ``backend.labels``); kinds it does not name keep the suite's labels.
    kind, method, step: the initial selection (default: the first kind and method, step 0).
    """

    def __init__(self, results: pd.DataFrame, run_more: MoreStepsRunner | None = None, *, max_widget_steps: int = 50,
                 target_bits: float | None = None, view: str = "steps", labels: Mapping[str, str] | None = None,
                 kind: str | None = None, method: str | None = None, step: int | None = None):
        if view not in VIEWS:
            raise ValueError(f"view = {view!r} is unknown: use 'steps' or 'tradeoff'")
        if isinstance(max_widget_steps, bool) or not isinstance(max_widget_steps, numbers.Integral) \
                or max_widget_steps < 1:
            raise ValueError(f"max_widget_steps = {max_widget_steps!r} must be an integer >= 1")
        self.run_more = run_more
        self.max_widget_steps = int(max_widget_steps)
        self.target_bits = target_bits
        self.view = view
        cached = getattr(run_more, "cached_rows", None)
        self.state = ExplorerState(results, kind_order=draw.display_order(labels), target_bits=target_bits,
                                   kind=kind, method=method, step=step, extra=cached() if callable(cached) else None)
        all_kinds = [*self.state.kinds, *loss_kinds(self.state.results)]
        self.labels = draw.resolve_labels(all_kinds, labels)
        self.colors = draw.palette(all_kinds, labels)
        self.stats = self.state.stats   # how often each kind of update ran (the unit tests read it)
        self.last_message = ""
        self._busy = False
        self._syncing = False
        self._build_widgets()
        self._draw()
        self._update_step_views()

    # ---- the state, as seen from outside -------------------------------------------------------------

    kind = property(lambda self: self.state.kind, doc="The shown forget-set kind.")
    method = property(lambda self: self.state.method, doc="The shown unlearning method.")
    step = property(lambda self: self.state.step, doc="The shown recorded step.")
    steps = property(lambda self: self.state.steps, doc="Recorded steps of the shown selection.")
    selection = property(lambda self: self.state.selection, doc="The shown selection, tabulated.")
    results = property(lambda self: self.state.results, doc="The results table, with rows run since.")
    kinds = property(lambda self: self.state.kinds)
    methods = property(lambda self: self.state.methods)

    def table_at(self, step: int | None = None) -> pd.DataFrame:
        """Per-example values of the current selection at a recorded step (default: the current one)."""
        return self.state.table_at(step)

    # ---- what the controls call ------------------------------------------------------------------------

    def set_step(self, step) -> int:
        """Show a recorded step (the nearest one to `step`); returns the step shown."""
        changed = self.state.set_step(step)
        if changed or self.slider.value != self.step:
            self._sync(self.slider, "value", self.step)
            self._update_step_views()
        return self.step

    def set_selection(self, kind: str | None = None, method: str | None = None) -> tuple[str, str]:
        """Show another forget set and/or method, at the same step when it was recorded (else the nearest)."""
        if self.state.set_selection(kind, method):
            self._sync_controls()
            self._draw()
            self._update_step_views()
        return self.kind, self.method

    def add_rows(self, rows: pd.DataFrame) -> None:
        """Add rows (e.g. of more steps) to the table; affected selections are tabulated again, once."""
        if self.state.add_rows(rows):
            self._sync_controls()
            self._draw()
            self._update_step_views()

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
        what = f"{draw.method_label(method)} on {self.labels.get(kind, kind)}"
        self._busy = True
        self.button.disabled = True
        self.progress.max, self.progress.value = n, 0
        self.progress.bar_style = "info"
        self.progress.layout.visibility = "visible"
        self._say(f"Running {n} more step(s) of {what}...")
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
        return self._say(f"Ran {n} more step(s) of {what} in {time.perf_counter() - t0:.1f} s: "
                         f"the trajectory now ends at step {end}.")

    # ---- drawing -------------------------------------------------------------------------------------

    def _draw(self) -> None:
        """Draw the current selection's curves (on selection change); the step markers come later."""
        self.stats["draw"] += 1
        others: list[tuple[str, Selection]] = []
        if self.view == "tradeoff":
            others = [(k, self.state.prepare(k, self.method)) for k in self.kinds if k != self.kind]
        self.figures = draw.StepFigures(self.selection, view=self.view, target_bits=self.target_bits,
                                        labels=self.labels, colors=self.colors, others=others)

    metric_figure = property(lambda self: self.figures.metric_figure)
    utility_figure = property(lambda self: self.figures.utility_figure)

    def _update_step_views(self) -> None:
        """Move the step markers, re-render both images and refresh the table and title (no recomputation)."""
        self.stats["step_views"] += 1
        self.metric_image.value, self.utility_image.value = self.figures.show_step(self.step)
        self.table.value = draw.table_html(self.table_at(), self.step, self.kind, self.method, self.labels)
        self.title.value = draw.title_html(self.selection, self.step, self.labels)

    # ---- widgets ---------------------------------------------------------------------------------------

    def _build_widgets(self) -> None:
        import ipywidgets as W

        wide = {"description_width": "initial"}
        self.title = W.HTML()
        self.kind_select = W.Dropdown(options=[(self.labels.get(k, k), k) for k in self.kinds], value=self.kind,
                                      description="forget set", style=wide)
        self.method_select = W.Dropdown(options=[(draw.method_label(m), m) for m in self.methods],
                                        value=self.method, description="method", style=wide)
        self.slider = W.SelectionSlider(options=self._step_options(), value=self.step, description="step",
                                        continuous_update=False, layout=W.Layout(width="95%"))
        self.metric_image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.utility_image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.table = W.HTML()
        self.more_steps = W.Text(value=str(min(10, self.max_widget_steps)), description="more steps",
                                 placeholder=f"1 to {self.max_widget_steps}", layout=W.Layout(width="220px"),
                                 style=wide)
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
                            (self.message, "forgetlab-message"), (self.title, "forgetlab-title")):
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
        self.message.value = message_html(text, error)
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
