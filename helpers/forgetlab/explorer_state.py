"""The step explorer's state, without widgets or figures: what is selected and every value it shows.

:class:`ExplorerState` holds a per-step results table (the tidy table of :func:`forgetlab.engine.run_study`)
and the shown (forget set, method, step). Each (kind, method) trajectory is tabulated once into a
:class:`Selection` (mean curves, utility, per-example values), so moving along the steps computes nothing.
:func:`parse_step_count` checks a request for more steps; :class:`MoreStepsRunner` is what runs them (for
example :class:`forgetlab.trajectories.StepRunner`). The widget wiring (:mod:`forgetlab.widgets`) and the
drawing (:mod:`forgetlab.explorer_draw`) read this state; this module imports neither, nor any model code.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from .config import METHODS

# The columns of forgetlab.engine.COLUMNS (a test checks they agree; not imported, so this module stays free of
# torch and loads in a blink).
REQUIRED_COLUMNS = ("step", "seed", "uid", "role", "metric", "value", "kind", "method")
ROW_KEY = ["step", "seed", "uid", "role", "metric", "kind", "method"]      # one value per key
PER_EXAMPLE_METRICS = ("genex_bits", "relex_bits", "exposure_bits", "ll")
UTILITY_LOSS_PREFIX = "loss_"
ProgressFn = Callable[[int, int, str], None]


class MoreStepsRunner(Protocol):
    """What the "run more steps" button calls: new rows (same columns as the results table) for `n` more steps.

    ``progress(done, total, what)`` may be called while it runs. A runner may also offer
    ``cached_rows() -> DataFrame`` (rows of earlier extensions), which the explorer adds at start.
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


def ordered(values: Iterable, order: Sequence) -> list:
    """The distinct `values`: those named in `order` first, in that order, then the others as they come."""
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def merge_rows(results: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """`results` with the rows of `extra` added; where both have a value for the same key, `extra`'s wins."""
    missing = [c for c in REQUIRED_COLUMNS if c not in extra.columns]
    if missing:
        raise ValueError(f"new rows lack columns {missing}: a runner must return the columns of the results table")
    extra = extra[list(results.columns)] if set(results.columns) <= set(extra.columns) else extra
    both = pd.concat([results, extra], ignore_index=True)
    return both.drop_duplicates(subset=ROW_KEY, keep="last")


def loss_kinds(results: pd.DataFrame) -> list[str]:
    """Kinds whose loss is a utility metric (``loss_<kind>`` rows), in order of appearance."""
    names = pd.unique(results.metric[results.metric.str.startswith(UTILITY_LOSS_PREFIX, na=False)])
    return [n[len(UTILITY_LOSS_PREFIX):] for n in names]


class Selection:
    """One (kind, method) trajectory, tabulated once so that moving to another step computes nothing.

    ``quality``: mean GenEx and RelEx of the forget set and mean GenEx of the controls per step; ``utility``:
    the model-level metrics (mean over seeds) per step; ``examples``: per-example values indexed by
    (step, role, uid), per-seed values averaged.
    """

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
        # utility is measured every utility_every steps: linear in between (as the claims read it)
        self.utility = (model.groupby(["step", "metric"]).value.mean().unstack("metric").reindex(self.steps)
                        .interpolate(method="index", limit_area="inside")
                        if len(model) else pd.DataFrame(index=self.steps))
        wide = (per_example[per_example.metric.isin(PER_EXAMPLE_METRICS)]
                .pivot_table(index=["step", "role", "uid"], columns="metric", values="value", aggfunc="mean"))
        self.columns = [m for m in PER_EXAMPLE_METRICS if m in wide.columns]
        self.examples = wide[self.columns] if len(wide) else wide
        self.start = (self.examples.xs(self.steps[0], level="step")
                      if len(self.examples) and self.steps else None)

    def nearest(self, step: float) -> int:
        """The recorded step closest to `step` (the earlier one on a tie)."""
        steps = np.asarray(self.steps)
        return int(steps[np.argmin(np.abs(steps - float(step)))])

    def loss_columns(self) -> list[str]:
        """Utility columns that are losses: the retained training data's, then each ``loss_<kind>``."""
        cols = list(self.utility.columns)
        return [c for c in cols if c == "retain_loss"] + [c for c in cols if c.startswith(UTILITY_LOSS_PREFIX)]

    def at(self, step: int) -> pd.DataFrame:
        """Per-example values at a recorded step (forget first, then controls), with GenEx change since start."""
        if not len(self.examples):
            return pd.DataFrame()
        df = self.examples.xs(step, level="step").copy()
        if "genex_bits" in df and self.start is not None and "genex_bits" in self.start:
            df.insert(1, "genex_change", df.genex_bits - self.start.genex_bits.reindex(df.index))
        order = {"forget": 0, "control": 1}
        df = df.reset_index()
        return df.sort_values(["role", "uid"], key=lambda c: c.map(order) if c.name == "role" else c)


class ExplorerState:
    """The shown (kind, method, step) of a results table, and the tabulated selections.

    `kind_order` puts known kinds first (e.g. the suite's order); methods follow :data:`forgetlab.config.METHODS`.
    `extra` rows (e.g. of earlier "run more steps") are added to `results`, replacing rows with the same key.
    ``stats`` counts how often each selection was tabulated (``"prepare"``); the widget adds its own counts.
    """

    def __init__(self, results: pd.DataFrame, *, kind_order: Sequence[str] = (), target_bits: float | None = None,
                 kind: str | None = None, method: str | None = None, step: float | None = None,
                 extra: pd.DataFrame | None = None):
        missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
        if missing:
            raise ValueError(f"the results table lacks columns {missing}: pass the table of engine.run_study")
        if results.empty:
            raise ValueError("the results table is empty: run the study first (engine.run_study)")
        self.results = results if extra is None or extra.empty else merge_rows(results, extra)
        self.target_bits = target_bits
        self.kinds = ordered(self.results.kind, kind_order)
        self.methods = ordered(self.results.method, METHODS)
        self.stats: Counter = Counter()
        self._prepared: dict[tuple[str, str], Selection] = {}
        self.kind = self._check_choice("kind", kind or self.kinds[0], self.kinds)
        self.method = self._check_choice("method", method or self.methods[0], self.methods)
        self.selection = self.prepare(self.kind, self.method)
        self.step = self.selection.nearest(0 if step is None else step)

    @staticmethod
    def _check_choice(name: str, value: str, options: list[str]) -> str:
        if value not in options:
            raise ValueError(f"{name} = {value!r} is not in these results: use one of {', '.join(options)}")
        return value

    def prepare(self, kind: str, method: str) -> Selection:
        """The tabulated (kind, method) trajectory (tabulated on first use only)."""
        key = (kind, method)
        if key not in self._prepared:
            self.stats["prepare"] += 1
            self._prepared[key] = Selection(self.results, kind, method)
        return self._prepared[key]

    @property
    def steps(self) -> list[int]:
        """Recorded steps of the current selection."""
        return list(self.selection.steps)

    def set_step(self, step) -> bool:
        """Move to the recorded step nearest to `step`; True if the shown step changed."""
        if isinstance(step, bool) or not isinstance(step, numbers.Real) or not math.isfinite(step):
            raise ValueError(f"step = {step!r} must be a number, one of the recorded steps {self.steps}")
        new = self.selection.nearest(step)
        changed, self.step = new != self.step, new
        return changed

    def set_selection(self, kind: str | None = None, method: str | None = None) -> bool:
        """Show another kind and/or method, at the same step if recorded (else the nearest); True if changed."""
        kind = self._check_choice("kind", kind or self.kind, self.kinds)
        method = self._check_choice("method", method or self.method, self.methods)
        if (kind, method) == (self.kind, self.method):
            return False
        self.kind, self.method = kind, method
        self.selection = self.prepare(kind, method)
        self.step = self.selection.nearest(self.step)
        return True

    def add_rows(self, rows: pd.DataFrame) -> bool:
        """Add rows (e.g. of more steps); their selections are tabulated again. True if the shown one changed."""
        self.results = merge_rows(self.results, rows)
        touched = set(zip(rows.kind, rows.method))
        for key in touched:
            self._prepared.pop(key, None)
        if (self.kind, self.method) not in touched:
            return False
        self.selection = self.prepare(self.kind, self.method)
        self.step = self.selection.nearest(self.step)
        return True

    def table_at(self, step: float | None = None) -> pd.DataFrame:
        """Per-example values of the current selection at a recorded step (default: the shown one).

        With a target, column ``unlearned`` says whether a forget example's GenEx is below it ("yes"/"no");
        controls are not being unlearned (their GenEx is the metric's noise floor), so theirs is empty.
        """
        df = self.selection.at(self.step if step is None else self.selection.nearest(step))
        if self.target_bits is not None and "genex_bits" in df:
            df["unlearned"] = np.where(df.role != "forget", "", np.where(df.genex_bits < self.target_bits, "yes", "no"))
        df.columns.name = None
        return df
