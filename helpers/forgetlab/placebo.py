"""The placebo: gradient ascent on never-trained ID text of the forget set's size.

Ascent on Shakespeare may hurt Shakespeare perplexity whether or not the text was ever trained on. A placebo run
separates the two: :class:`PlaceboBackend` wraps any backend and adds a pseudo-kind ``placebo`` whose forget set
is ID text no model trained on (windows of the ID population, drawn like the ID forget set), its controls the ID
controls, its population the rest of the ID population. :func:`forgetlab.engine.run_study` on the wrapper then
runs "ascent on ID text the model never saw" beside the real forget sets, with the same settings, seeds and
utility. :func:`placebo_difference` compares the utility the ID forget set's unlearning lost with the placebo's
at the same steps.
"""
from __future__ import annotations

import pandas as pd

from .cache import cache_key, code_version
from .claims import KEYS, UTILITY_LABELS, at_progress, utility_lost
from .engine import ForgetSetView, StudyInputError
from .intervals import hierarchical_bootstrap, interval_table, verdict

PLACEBO = "placebo"
MIN_POPULATION = 4      # population rows the placebo keeps for RelEx and membership


def placebo_view(view: ForgetSetView, size: int, kind: str = PLACEBO) -> ForgetSetView:
    """A view of `kind` from an ID view: the last `size` population rows (by uid) become its forget set, the
    rest its population; the ID controls its controls. uids get a ``placebo:`` prefix."""
    pop = view.population.sort_values("uid", kind="stable").reset_index(drop=True)
    if size < 1 or len(pop) - size < MIN_POPULATION:
        raise StudyInputError(f"the placebo needs {size} never-trained ID rows plus at least {MIN_POPULATION} left "
                              f"for its population, but the ID population has {len(pop)}: raise population_size "
                              f"to at least {size + MIN_POPULATION} (or use a smaller forget_size)")
    def relabel(df: pd.DataFrame, role: str) -> pd.DataFrame:
        return df.assign(kind=kind, role=role, uid=[f"{kind}:{u}" for u in df.uid])
    forget = relabel(pop.iloc[len(pop) - size:], "forget")
    controls = relabel(view.targets[view.targets.role == "control"], "control")
    population = relabel(pop.iloc[:len(pop) - size], "population").reset_index(drop=True)
    return ForgetSetView(kind, pd.concat([forget, controls], ignore_index=True), population)


def rebuild(recipe: tuple, id_kind: str, size: int | None) -> "PlaceboBackend":
    """A placebo backend from the wrapped backend's worker recipe (for process pools)."""
    cls, args = recipe
    return PlaceboBackend(cls(*args), id_kind, size)


class PlaceboBackend:
    """Any backend plus the pseudo-kind ``placebo`` (see the module docstring); everything else is delegated."""

    def __init__(self, inner, id_kind: str = "id", size: int | None = None):
        if id_kind not in inner.kinds:
            raise StudyInputError(f"the placebo is drawn from the {id_kind!r} forget set's population, but this run "
                                  f"has {', '.join(inner.kinds)}: add {id_kind!r} to forget_kinds")
        self.inner, self.id_kind = inner, id_kind
        id_view = inner.view(id_kind)
        self.size = int(size or (id_view.targets.role == "forget").sum())
        self._view = placebo_view(id_view, self.size)
        self.kinds = tuple(inner.kinds) + (PLACEBO,)
        self.labels = {**inner.labels, PLACEBO: "placebo: never-trained ID text"}
        self.name = f"{inner.name}+placebo"

    def __getattr__(self, name: str):
        if name == "inner":                       # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def view(self, kind: str) -> ForgetSetView:
        return self._view if kind == PLACEBO else self.inner.view(kind)

    def key(self, seed: int) -> str:
        return cache_key("placebo", code_version("placebo"), self.inner.key(seed), self.id_kind, self.size)

    def worker_recipe(self) -> tuple:
        return rebuild, (self.inner.worker_recipe(), self.id_kind, self.size)


def placebo_difference(results: pd.DataFrame, method: str = "ga", utility: str = "general_loss",
                       fraction: float = 0.5, id_kind: str = "id", resamples: int = 1000,
                       rng_seed: int = 0) -> dict:
    """Utility lost by unlearning the ID forget set minus utility lost by the placebo at the same step.

    Per ID forget example and original seed, the step at which it had lost `fraction` of its initial GenEx
    (C3's step); the placebo run of the same seed is read at that step. Mean of ID minus placebo with a 95%
    interval (seeds, then examples). Above 0: unlearning trained ID text costs more than ascent on ID text
    as such; an interval containing 0: C3's decay is what ascent on any ID text does.
    """
    res = results[results.method == method]
    if not {id_kind, PLACEBO} <= set(res.kind):
        raise ValueError(f"need both {id_kind!r} and {PLACEBO!r} runs of method {method!r}: run the study on a "
                         "PlaceboBackend")
    prog = at_progress(res[res.kind == id_kind], fraction, utility)
    lost = utility_lost(res[res.kind == PLACEBO], utility).rename(
        columns={"step": "progress_step", "utility_lost": "placebo_lost"})
    both = prog.merge(lost[["seed", "progress_step", "placebo_lost"]], on=["seed", "progress_step"], how="inner")
    both = both.assign(difference=both.utility_lost - both.placebo_lost)[[*KEYS, "progress_step", "utility_lost",
                                                                          "placebo_lost", "difference"]]
    iv = hierarchical_bootstrap(both, "difference", resamples=resamples, rng_seed=rng_seed)
    return {"method": method, "utility": utility, "fraction": fraction, "id_lost": float(both.utility_lost.mean()),
            "placebo_lost": float(both.placebo_lost.mean()), "estimate": iv.estimate, "low": iv.low,
            "high": iv.high, "verdict": verdict(iv, "positive"), "n_seeds": iv.n_seeds, "n_units": iv.n_units}


def utility_bands(results: pd.DataFrame, utilities=("general_loss",), kinds=("id", PLACEBO), method: str = "ga",
                  resamples: int = 1000, rng_seed: int = 0) -> pd.DataFrame:
    """Utility lost per step, mean over original seeds with a 95% bootstrap interval over seeds (one model per
    seed and step): kind, method, utility, step, estimate, low, high."""
    res = results[(results.method == method) & results.kind.isin(list(kinds))]
    frames = []
    for u in utilities:
        lost = utility_lost(res, u).assign(utility=u)
        frames.append(interval_table(lost, ["kind", "method", "utility", "step"], "utility_lost", unit_col="seed",
                                     resamples=resamples, rng_seed=rng_seed))
    return pd.concat(frames, ignore_index=True)


PLACEBO_WORDS = {
    "agrees": "unlearning the ID forget set costs more utility than ascent on ID text the model never saw: the decay "
              "is not only what ascent on Shakespeare does to Shakespeare",
    "disagrees": "ascent on never-trained ID text costs more utility than unlearning the ID forget set",
    "inconclusive": "the decay cannot be told apart from what ascent on any ID text of that size does: C3's utility "
                    "loss is explained by ascending on ID text, not by unlearning trained examples",
    "not measurable": "no ID example reached the progress point, so there is nothing to compare"}


def placebo_markdown(d: dict) -> str:
    """The placebo comparison in one paragraph of plain words."""
    pct = f"{round(d['fraction'] * 100):d}%"
    return (f"By the step at which each ID forget example had lost {pct} of its initial GenEx, unlearning the ID "
            f"forget set had raised the {UTILITY_LABELS.get(d['utility'], d['utility'])} by {d['id_lost']:.3g} on "
            f"average, and ascent on never-trained ID text (the placebo, same size and settings) by "
            f"{d['placebo_lost']:.3g}. ID minus placebo: "
            f"{d['estimate']:.3g} [{d['low']:.3g}, {d['high']:.3g}] (95% interval over {d['n_seeds']} original "
            f"seed(s), then examples) → **{d['verdict']}**: {PLACEBO_WORDS[d['verdict']]}.")
