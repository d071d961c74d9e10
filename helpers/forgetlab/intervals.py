"""Intervals and endpoints: the statistics behind every verdict of the study (pure numpy/pandas).

- A hierarchical percentile bootstrap: original seeds with replacement, then examples (or groups of
  examples unlearned together) within each drawn seed; one-arm and paired two-arm (ID minus OOD).
- Verdicts from intervals: agrees / disagrees / inconclusive / not measurable.
- Per-example endpoints from per-step GenEx: steps to a target (censored when never reached), steps to
  remove a fraction of the example's own initial GenEx, fraction removed per step.
- Kaplan-Meier survival curves (fraction of examples still exposed vs step) with bootstrap bands.
- The noise-floor target from the controls' GenEx.

Tidy tables use the study's columns: step, seed, uid, value (plus kind, method, role, ...). GenEx rows
with seed = -1 pool all seeds; intervals need the per-original-seed rows (seed >= 0).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

LEVEL = 0.95
CHUNK_ROWS = 200_000          # resampled rows per chunk: bounds memory and stays in cache
VERDICTS = ("agrees", "disagrees", "inconclusive", "not measurable")
INTERVAL_WORDS = (
    "The 95% interval holds the middle 95% of the answers we get when we redo the analysis on resampled data: "
    "original models (seeds) drawn with replacement, then examples (or groups of examples unlearned together) "
    "drawn with replacement within each drawn seed. It shows how much the answer depends on which seeds and "
    "examples we happened to use; it says nothing about other model sizes, data or hyper-parameters. "
    "A claim agrees when the whole interval lies on its side of 0, disagrees when the whole interval lies on "
    "the other side, and is inconclusive when the interval contains 0.")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval [low, high] at `level`.

    n_seeds: original seeds resampled; n_units: distinct examples (or groups) resampled within them.
    """
    estimate: float
    low: float
    high: float
    n_seeds: int
    n_units: int
    resamples: int
    level: float = LEVEL

    @property
    def measurable(self) -> bool:
        return not (math.isnan(self.estimate) or math.isnan(self.low) or math.isnan(self.high))

    def contains(self, x: float) -> bool:
        """True if low <= x <= high (False for a NaN interval)."""
        return self.measurable and self.low <= x <= self.high

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]" if self.measurable else "n/a"


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples = {resamples}: use at least 1 (1000-2000 for a 95% interval)")
    if not 0 < level < 1:
        raise ValueError(f"level = {level}: give a coverage strictly between 0 and 1, e.g. 0.95")


def percentile_interval(boot: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` range of bootstrap values (NaNs dropped). Linear interpolation when all values
    are finite; with ±inf present (e.g. a median step never reached) the bounds are actual resampled values."""
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[~np.isnan(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    method = "linear" if np.isfinite(boot).all() else "inverted_cdf"
    lo, hi = np.quantile(boot, [a, 1.0 - a], method=method)
    return float(lo), float(hi)


# ------------------------------------------------------------------------------ resampling machinery

@dataclass
class _Layout:
    """Rows sorted by seed, then unit; units contiguous within their seed, rows contiguous within units."""
    seeds: np.ndarray        # seed labels, sorted
    unit_offset: np.ndarray  # [S + 1]: units of seed s are unit_offset[s]:unit_offset[s + 1]
    unit_start: np.ndarray   # [U]: first sorted row of each unit
    unit_len: np.ndarray     # [U]: rows per unit
    frame: pd.DataFrame      # the rows, sorted
    n_labels: int            # distinct unit labels (examples or groups)

    def rows(self, rng: np.random.Generator, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draw units within the seeds chosen in `sigma` [r, S] (indices into self.seeds); return the drawn
        rows and the resample (0..r-1) each belongs to, in resample order."""
        r, s = sigma.shape
        sizes = np.diff(self.unit_offset)[sigma].ravel()
        size_rep = np.repeat(sizes, sizes)
        local = np.minimum((rng.random(size_rep.size) * size_rep).astype(np.int64), size_rep - 1)
        units = np.repeat(self.unit_offset[sigma.ravel()], sizes) + local
        owner = np.repeat(np.arange(r), sizes.reshape(r, s).sum(axis=1))
        if (self.unit_len == 1).all():
            return self.unit_start[units], owner
        lens = self.unit_len[units]
        first = np.repeat(self.unit_start[units] - (np.cumsum(lens) - lens), lens)
        return first + np.arange(lens.sum()), np.repeat(owner, lens)


def _layout(df: pd.DataFrame, seed_col: str, unit_col: str, group_col: str | None,
            needed: Sequence[str]) -> _Layout:
    unit = group_col or unit_col
    missing = [c for c in [seed_col, unit, *needed] if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table (has {list(df.columns)}): pass the right column names")
    seeds = np.sort(pd.unique(df[seed_col]))
    if len(seeds) > 1 and (seeds == -1).any():
        raise ValueError("the table mixes pooled rows (seed = -1, all seeds at once) with per-seed rows: "
                         "keep seed >= 0 for intervals over original seeds")
    frame = df.sort_values([seed_col, unit], kind="stable").reset_index(drop=True)
    sid = frame[seed_col].to_numpy()
    key = frame.groupby([seed_col, unit], sort=False, dropna=False).ngroup().to_numpy()
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    unit_len = np.diff(np.r_[start, len(frame)])
    unit_seed = np.searchsorted(seeds, sid[start])
    unit_offset = np.searchsorted(unit_seed, np.arange(len(seeds) + 1))
    return _Layout(seeds, unit_offset, start, unit_len, frame, int(frame[unit].nunique()))


def _bootstrap(layouts: list[_Layout], stats: list[Callable], resamples: int, rng_seed: int) -> list[np.ndarray]:
    """Per layout, the statistic of each resample (stacked on axis 0). Seeds are drawn once for all layouts
    (paired arms share them, matched by label), then units within each drawn seed, independently per layout."""
    rng = np.random.default_rng(rng_seed)
    seeds = layouts[0].seeds
    for lay in layouts[1:]:
        if not np.array_equal(lay.seeds, seeds):
            raise ValueError(f"paired arms must share original seeds: {list(seeds)} vs {list(lay.seeds)}; "
                             "filter both tables to the seeds they have in common")
    sigma = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    width = max(len(lay.frame) for lay in layouts) * len(seeds)
    chunk = max(1, CHUNK_ROWS // max(1, width))
    out: list[list[np.ndarray]] = [[] for _ in layouts]
    for b in range(0, resamples, chunk):
        sig = sigma[b:b + chunk]
        for lay, stat, o in zip(layouts, stats, out):
            rows, owner = lay.rows(rng, sig)
            o.append(stat(rows, owner, len(sig)))
    return [np.concatenate(o, axis=0) for o in out]


def _is_mean(statistic) -> bool:
    return statistic is np.mean or statistic is np.nanmean or statistic == "mean"


def _stat_fn(values: np.ndarray, statistic) -> Callable:
    """(rows, owner, n) -> statistic per resample; a weighted sum for the mean, a loop otherwise."""
    if _is_mean(statistic):
        def mean(rows, owner, n):
            return np.bincount(owner, values[rows], n) / np.bincount(owner, None, n)
        return mean

    def generic(rows, owner, n):
        cut = np.searchsorted(owner, np.arange(n + 1))
        return np.array([statistic(values[rows[cut[i]:cut[i + 1]]]) for i in range(n)], dtype=np.float64)
    return generic


def _prepared(df: pd.DataFrame, value: str, seed_col: str, unit_col: str, group_col: str | None,
              statistic) -> tuple[_Layout, np.ndarray] | None:
    if value not in df.columns:
        raise KeyError(f"column {value!r} is not in the table (has {list(df.columns)}): pass the value column")
    df = df[df[value].notna()]
    if df.empty:
        return None
    lay = _layout(df, seed_col, unit_col, group_col, [value])
    values = lay.frame[value].to_numpy(dtype=np.float64)
    if _is_mean(statistic) and not np.isfinite(values).all():
        raise ValueError(f"{value!r} holds ±inf (a step never reached?): the mean is undefined; use steps "
                         "censored at the budget, a survival curve or median_survival_interval")
    return lay, values


def _interval(frames: list[pd.DataFrame], value: str, seed_col: str, unit_col: str, group_col: str | None,
              statistic, resamples: int, rng_seed: int, level: float) -> Interval:
    """statistic(frames[0]) [- statistic(frames[1])] with its hierarchical percentile bootstrap interval."""
    _check(resamples, level)
    preps = [_prepared(f, value, seed_col, unit_col, group_col, statistic) for f in frames]
    if any(p is None for p in preps):
        return Interval(math.nan, math.nan, math.nan, 0, 0, resamples, level)
    point = [float(np.mean(v) if _is_mean(statistic) else statistic(v)) for _, v in preps]
    boots = _bootstrap([lay for lay, _ in preps], [_stat_fn(v, statistic) for _, v in preps], resamples, rng_seed)
    with np.errstate(invalid="ignore"):
        est, boot = (point[0], boots[0]) if len(preps) == 1 else (point[0] - point[1], boots[0] - boots[1])
    return Interval(est, *percentile_interval(boot, level), len(preps[0][0].seeds),
                    sum(lay.n_labels for lay, _ in preps), resamples, level)


def hierarchical_bootstrap(df: pd.DataFrame, value: str, seed_col: str = "seed", unit_col: str = "uid",
                           group_col: str | None = None, statistic: Callable | str = np.mean,
                           resamples: int = 1000, rng_seed: int = 0, level: float = LEVEL) -> Interval:
    """`statistic` of column `value` over all rows, with a hierarchical percentile bootstrap interval.

    Each resample draws as many original seeds as there are, with replacement; within each drawn seed it
    draws that seed's units (examples, by `unit_col`, or whole groups of examples unlearned together, by
    `group_col`: a group's rows move together) with replacement; the statistic is taken over all drawn
    rows. With a single seed the interval reflects the examples only, not seed-to-seed variation.
    Rows whose value is NaN are dropped (not measurable for that example); NaN interval if none is left.
    The mean uses a fast weighted path; any other callable is called once per resample.
    """
    return _interval([df], value, seed_col, unit_col, group_col, statistic, resamples, rng_seed, level)


def difference_interval(a_df: pd.DataFrame, b_df: pd.DataFrame, value: str, seed_col: str = "seed",
                        unit_col: str = "uid", group_col: str | None = None, statistic: Callable | str = np.mean,
                        resamples: int = 1000, rng_seed: int = 0, level: float = LEVEL) -> Interval:
    """statistic(a) - statistic(b) (e.g. ID minus OOD) with a paired hierarchical bootstrap interval.

    The arms were unlearned from the same original models, so each resample draws the seeds once and uses
    them in both arms; examples (or groups) are then drawn within each arm independently. Both tables must
    hold the same seeds. n_units counts both arms' units.
    """
    return _interval([a_df, b_df], value, seed_col, unit_col, group_col, statistic, resamples, rng_seed, level)


def interval_table(df: pd.DataFrame, by: Sequence[str], value: str, **kwargs) -> pd.DataFrame:
    """:func:`hierarchical_bootstrap` per group of `by` (e.g. kind, method, step): one row per group with
    estimate, low, high, n_seeds, n_units, resamples, level (for curves with bands and summary tables)."""
    by = list(by)
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))),
             **asdict(hierarchical_bootstrap(g, value, **kwargs))} for key, g in df.groupby(by, sort=False)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- verdicts

def verdict(interval: Interval, direction: str, null: float = 0.0) -> str:
    """The verdict on a claim about a difference (e.g. ID minus OOD), from its interval.

    direction "positive": the claim says the difference is above `null` (0); "negative": below it.
    - "agrees": the whole interval lies on the claimed side (low > 0 for positive, high < 0 for negative);
    - "disagrees": the whole interval lies on the other side;
    - "inconclusive": the interval contains 0 (the data cannot tell the sign apart);
    - "not measurable": no interval (NaN: a quantity missing for an arm).
    What the interval means, in words the notebooks quote (:data:`INTERVAL_WORDS`): it holds the middle 95%
    of the answers we get when we redo the analysis on resampled data (original seeds with replacement, then
    examples or groups within each drawn seed); it shows how much the answer depends on which seeds and
    examples we happened to use, not on model size, data or hyper-parameters.
    """
    if direction not in ("positive", "negative"):
        raise ValueError(f"direction = {direction!r}: use 'positive' (claim: difference > 0) or 'negative'")
    if not interval.measurable:
        return "not measurable"
    above, below = interval.low > null, interval.high < null
    if not (above or below):
        return "inconclusive"
    return "agrees" if above == (direction == "positive") else "disagrees"


# ---------------------------------------------------------------------------------------- endpoints

def _sorted_series(steps, values) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if s.shape != v.shape or s.size == 0:
        raise ValueError(f"need one value per step and at least one step (got {s.size} steps, {v.size} values)")
    order = np.argsort(s, kind="stable")
    return s[order], v[order]


def first_crossing(steps, values, threshold: float) -> tuple[float, bool]:
    """(step, censored): the first recorded step whose value is strictly below `threshold` (step 0 counts),
    else (last recorded step, True): never reached, censored at the last step. NaN values never cross."""
    s, v = _sorted_series(steps, values)
    hit = np.flatnonzero(v < threshold)
    return (float(s[hit[0]]), False) if hit.size else (float(s[-1]), True)


def steps_to_fraction_removed(steps, values, fraction: float) -> tuple[float, bool]:
    """(step, censored) of the first step removing `fraction` of the example's own initial value (the value
    at its first recorded step): value < initial * (1 - fraction). (NaN, False) when initial <= 0 or NaN:
    nothing to remove."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction = {fraction}: give a share of the initial value in (0, 1], e.g. 0.5")
    s, v = _sorted_series(steps, values)
    if not v[0] > 0:
        return math.nan, False
    return first_crossing(s, v, v[0] * (1.0 - fraction))


def fraction_removed_per_step(steps, values, k: int, how: str = "endpoint") -> float:
    """Share of the example's initial value removed per step over the first `k` steps.

    "endpoint": (initial - v(s)) / initial / (s - s0) at s, the last recorded step <= k (s0: the first,
    normally 0); "slope": least-squares
    slope of (initial - v(t)) / initial against t over recorded t <= k. Unlike raw steps, this does not grow
    mechanically with how much there was to remove. NaN when initial <= 0 or fewer than two steps <= k.
    """
    if how not in ("endpoint", "slope"):
        raise ValueError(f"how = {how!r}: use 'endpoint' or 'slope'")
    s, v = _sorted_series(steps, values)
    keep = s <= k
    if not v[0] > 0 or keep.sum() < 2:
        return math.nan
    s, frac = s[keep], (v[0] - v[keep]) / v[0]
    if how == "endpoint":
        return float(frac[-1] / (s[-1] - s[0]))
    return float(np.polyfit(s, frac, 1)[0])


def _first_below(v: np.ndarray, thr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.where(v < thr, np.arange(v.size), v.size)
    first = np.minimum.reduceat(pos, starts)
    reached = first < ends
    return np.where(reached, first, ends - 1), ~reached


def example_endpoints(table: pd.DataFrame, target: float | Mapping, fractions: Sequence[float] = (0.5, 0.9),
                      by: Sequence[str] | None = None, target_key: str = "kind",
                      rate_steps: int | None = None) -> pd.DataFrame:
    """One row per example x seed (x the other key columns) from a tidy per-step table (step, value, ...).

    Keys: `by`, default every column but step and value. Columns added: initial and final value (first and
    last recorded step), last_step, steps_to_target and censored (never below `target`: censored at
    last_step, so the mean of steps_to_target is the restricted mean survival time up to the budget),
    steps_to_<p>pct and censored_<p>pct per fraction (NaN when initial <= 0), and with `rate_steps` k,
    fraction_removed_per_step ("endpoint" form). `target` is a number or a mapping from `target_key`
    (e.g. a noise floor per kind).
    """
    keys = list(by) if by is not None else [c for c in table.columns if c not in ("step", "value")]
    if len(table) == 0 or not {"step", "value"} <= set(table.columns):
        raise ValueError(f"need a non-empty table with step and value columns (has {list(table.columns)})")
    df = table.sort_values(keys + ["step"], kind="stable").reset_index(drop=True)
    gid = df.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    if pd.DataFrame({"g": gid, "s": df.step.to_numpy()}).duplicated().any():
        raise ValueError(f"two values for one step of one example (keys {keys}): filter the table to one "
                         "metric or add the column that tells them apart to `by`")
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    ends = np.r_[starts[1:], len(df)].astype(np.int64)
    steps, v = df.step.to_numpy(dtype=np.float64), df.value.to_numpy(dtype=np.float64)
    lens = ends - starts
    out = df.loc[starts, keys].reset_index(drop=True)
    initial = v[starts]
    out["initial"], out["final"], out["last_step"] = initial, v[ends - 1], steps[ends - 1]
    if isinstance(target, Mapping):
        absent = set(out[target_key]) - set(target)
        if absent:
            raise KeyError(f"no target for {target_key} {sorted(absent)}: give one in the target mapping")
        thr = out[target_key].map(target).to_numpy(dtype=np.float64)
    else:
        thr = np.full(len(out), float(target))
    at, cens = _first_below(v, np.repeat(thr, lens), starts, ends)
    out["steps_to_target"], out["censored"] = steps[at], cens
    for f in fractions:
        name = f"{round(f * 100):d}pct"
        at, cens = _first_below(v, np.repeat(initial * (1.0 - f), lens), starts, ends)
        ok = initial > 0
        out[f"steps_to_{name}"] = np.where(ok, steps[at], np.nan)
        out[f"censored_{name}"] = cens & ok
    if rate_steps is not None:
        last = np.maximum.reduceat(np.where(steps <= rate_steps, np.arange(v.size), -1), starts)
        last = np.where(last >= starts, last, starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = (initial - v[last]) / initial / (steps[last] - steps[starts])
        out["fraction_removed_per_step"] = np.where((initial > 0) & (last > starts), rate, np.nan)
    return out


# -------------------------------------------------------------------------------------- noise floor

def noise_floor_target(control_values, quantile: float = 0.95, minimum: float = 0.0) -> float:
    """The GenEx target (bits): the `quantile` of |GenEx| of never-trained controls before unlearning,
    at least `minimum`. An example counts as unlearned once its GenEx falls below this floor."""
    v = np.abs(np.asarray(control_values, dtype=np.float64).ravel())
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite control GenEx values: the noise floor needs controls (control_size > 0) "
                         "scored at step 0")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile = {quantile}: give a value in (0, 1], e.g. 0.95")
    return max(float(np.quantile(v, quantile)), float(minimum))


def within_noise(values, floor: float) -> np.ndarray:
    """Per value: |value| <= floor (NaN is never within noise)."""
    v = np.asarray(values, dtype=np.float64)
    return np.abs(v) <= floor
