"""The "forget my sentence" form (notebook 09): type a sentence or a canary secret, fine-tune, unlearn, explore.

:class:`LabForm` shows a text area, a sentence/canary toggle, the number of insertions, an "insert it" box, a
"Fine-tune and unlearn" button, a progress bar with its label and a message area. A click calls
:meth:`LabForm.submit`, which checks the input (a bad one gets a visible message naming the fix, never a
traceback), builds the lab (:func:`forgetlab.lab.build_lab`), runs its first unlearning steps through the study
engine and shows the step explorer (:class:`forgetlab.widgets.Explorer`, with "run more steps") under the form,
with a sentence saying whether the example starts inside the never-trained controls' noise band. The handlers
only call plain methods, so the logic is testable without a browser; creating the form waits for no event.
"""
from __future__ import annotations

import html
import time

import pandas as pd

from . import engine, lab, trajectories
from .cache import ArtifactCache
from .widgets import Explorer, message_html
STAGES = 6                    # read data, base model, reference, original, (fine-tuned), unlearning
FIRST_STEPS = 40              # unlearning steps a click runs at most (the explorer's "run more steps" goes on)


class LabForm:
    """The lab's form and, once a lab has run, its explorer.

    Parameters
    ----------
    p: the run's validated parameters (``forgetlab.load_params``).
    cache: where models and trajectories are cached (default: the suite's cache).
    methods, steps: the unlearning methods and first steps of each lab (default: gradient ascent, ``unlearn_steps``
        but at most ``FIRST_STEPS``, so a click answers within about a minute on two cores).
    text, kind, insertions: the form's initial values.
    """

    def __init__(self, p: dict, cache: ArtifactCache | None = None, *, methods: tuple[str, ...] = ("ga",),
                 steps: int | None = None, text: str = "", kind: str = "sentence", insertions: int = 20):
        self.p, self.cache = p, cache or ArtifactCache()
        self.methods, self.steps = tuple(methods), steps or min(p["unlearn_steps"], FIRST_STEPS)
        self.backend: lab.LabBackend | None = None
        self.results: pd.DataFrame | None = None
        self.explorer: Explorer | None = None
        self.flags: pd.DataFrame | None = None
        self.last_message = ""
        self._data = None
        self._busy = False
        self._build_widgets(text, kind, insertions)

    # ---- what the controls call ----------------------------------------------------------------------

    def submit(self, text: str | None = None, kind: str | None = None, insertions=None,
               insert: bool | None = None) -> str:
        """Check the input (the form's values where an argument is None), build the lab, run its first steps and
        show the explorer; returns (and shows) the message. Never raises on bad input."""
        text = self.text.value if text is None else text
        kind = self.kind.value if kind is None else kind
        insertions = self.insertions.value if insertions is None else insertions
        insert = self.insert.value if insert is None else insert
        if self._busy:
            return self._say("Not run: a lab is already being built; wait for it to finish.", error=True)
        try:
            request = lab.LabRequest(text, kind, insertions, insert=bool(insert))
            if self._data is None:
                from .experiment import get_study_data
                self._progress(0, STAGES, "reading the study data")
                self._data = get_study_data(self.p, self.cache)
            example = lab.lab_example(self.p, self._data, request)    # refuses a bad input before long work
        except lab.LabInputError as exc:
            return self._say(f"Not run: {exc}.", error=True)
        self._busy = True
        self.button.disabled = True
        self.progress.layout.visibility = "visible"
        self.progress.bar_style = "info"
        t0 = time.perf_counter()
        try:
            self._say(f"Building the lab for {example.text!r}...")
            backend = lab.build_lab(self.p, request, self.cache, data=self._data, methods=self.methods,
                                    steps=self.steps, progress=self._progress)
            self._progress(5, STAGES, f"unlearning: {backend.steps} step(s) of {', '.join(backend.methods)}")
            results = engine.run_study(backend, self.cache)
            self._show(backend, results)
        except lab.LabInputError as exc:
            self.progress.bar_style = "danger"
            return self._say(f"Not run: {exc}.", error=True)
        except Exception as exc:  # noqa: BLE001 - shown to the reader; the form stays usable
            self.progress.bar_style = "danger"
            return self._say(f"Failed: {type(exc).__name__}: {exc}", error=True)
        finally:
            self._busy = False
            self.button.disabled = False
        self._progress(STAGES, STAGES, "done")
        self.progress.bar_style = "success"
        g = lab.genex_before_after(results)
        mine = g[g.example == "your example"].iloc[0]
        return self._say(f"Done in {time.perf_counter() - t0:.1f} s: GenEx of your {example.kind} went from "
                         f"{mine.genex_before_bits:.2f} to {mine.genex_after_bits:.2f} bits in {mine.after_step} "
                         f"steps. Move the step slider, or run more steps, below.")

    def _show(self, backend: lab.LabBackend, results: pd.DataFrame) -> None:
        """Show a built lab: its explorer under the form and the never-trained sentence."""
        self.backend, self.results = backend, results
        self.flags = lab.flags(results)
        self.flag.value = f"<p>{html.escape(lab.flag_sentence(self.flags, backend))}</p>"
        self.explorer = Explorer(results, trajectories.StepRunner(backend, self.cache),
                                 max_widget_steps=self.p["max_widget_steps"], target_bits=backend.target_bits,
                                 labels=backend.labels)
        self.explorer_box.children = [self.explorer.widget]

    # ---- widgets ---------------------------------------------------------------------------------------

    def _build_widgets(self, text: str, kind: str, insertions: int) -> None:
        import ipywidgets as W

        wide = {"description_width": "initial"}
        self.text = W.Textarea(value=text, description="your text", layout=W.Layout(width="95%", height="60px"),
                               style=wide)
        self.kind = W.ToggleButtons(options=[("a sentence", "sentence"), ("a canary secret", "canary")],
                                    value=kind, description="type", style=wide)
        self.hint = W.HTML()
        self.insertions = W.IntText(value=insertions, description="insertions", layout=W.Layout(width="200px"),
                                    style=wide)
        self.insert = W.Checkbox(value=True, description="insert it (untick: unlearn text the model never saw)",
                                 indent=False, layout=W.Layout(width="auto"))
        self.button = W.Button(description="Fine-tune and unlearn", button_style="primary", icon="play",
                               layout=W.Layout(width="220px"))
        self.progress = W.IntProgress(value=0, min=0, max=STAGES, description="progress",
                                      layout=W.Layout(visibility="hidden"))
        self.progress_label = W.HTML()
        self.message = W.HTML()
        self.flag = W.HTML()
        self.explorer_box = W.VBox()
        for widget, cls in ((self.text, "forgetlab-lab-text"), (self.kind, "forgetlab-lab-kind"),
                            (self.insertions, "forgetlab-lab-insertions"), (self.insert, "forgetlab-lab-insert"),
                            (self.button, "forgetlab-lab-run"), (self.progress, "forgetlab-lab-progress"),
                            (self.progress_label, "forgetlab-lab-progress-label"),
                            (self.message, "forgetlab-lab-message"), (self.flag, "forgetlab-lab-flag"),
                            (self.explorer_box, "forgetlab-lab-explorer"), (self.hint, "forgetlab-lab-hint")):
            widget.add_class(cls)
        self.kind.observe(lambda _: self._update_hint(), names="value")
        self.button.on_click(lambda _: self.submit())
        self._update_hint()
        self.widget = W.VBox([self.kind, self.hint, self.text, W.HBox([self.insertions, self.insert]),
                              W.HBox([self.button, self.progress, self.progress_label]), self.message, self.flag,
                              self.explorer_box])
        self.widget.add_class("forgetlab-lab")

    def _update_hint(self) -> None:
        p = self.p
        if self.kind.value == "canary":
            digits = p["canary_digits"]
            canary = html.escape(p["canary_template"]).replace("{secret}", "<b>" + "_" * digits + "</b>")
            self.hint.value = f"Your canary: <i>{canary}</i>. Type its secret: exactly {digits} digits."
            self.text.placeholder = "0123456789"[:digits]
        else:
            self.hint.value = (f"Type a sentence of at most {p['block_size'] - 1} tokens (the model's context; a "
                               f"token is a short word or a piece of a longer one).")
            self.text.placeholder = "e.g. My grandmother's cat is called Pumpernickel."

    def _progress(self, done: int, total: int, what: str = "") -> None:
        self.progress.max = STAGES
        self.progress.value = min(int(done), STAGES)
        self.progress_label.value = html.escape(what)

    def _say(self, text: str, error: bool = False) -> str:
        self.message.value = message_html(text, error)
        self.last_message = text
        return text

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = ("forgetlab 'forget my sentence' lab: a form and an explorer; they need a live "
                                    "kernel in JupyterLab")
        return bundle
