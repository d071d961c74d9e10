"""Survival curves of "still exposed" with censoring (Kaplan-Meier), their bootstrap bands and median steps.

An event is "unlearned at step t" (an example's GenEx first below the target); examples never unlearned within the
run are censored at their last step. Bands and intervals resample original seeds, then examples within them, as
:mod:`forgetlab.intervals` does.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .intervals import Interval, LEVEL, _bootstrap, _check, _layout, percentile_interval


def _km(tidx: np.ndarray, event: np.ndarray, owner: np.ndarray, n: int, m: int) -> np.ndarray:
    """Kaplan-Meier survival [n, m] at m sorted times from rows (time index, event) of n resamples."""
    cell = owner * m + tidx
    died = np.bincount(cell, event.astype(np.float64), n * m).reshape(n, m)
    left = np.bincount(cell, None, n * m).reshape(n, m)
    at_risk = np.cumsum(left[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        hazard = np.where(at_risk > 0, died / at_risk, 0.0)
    return np.cumprod(1.0 - hazard, axis=1)


def survival_curve(durations, events) -> pd.DataFrame:
    """Kaplan-Meier curve of "still exposed": one row per distinct step with at_risk, events, censored and
    survival = P(not yet unlearned after this step). events[i] true: example i was unlearned at step
    durations[i]; false: censored (still exposed at its last recorded step, then leaves the risk set).
    NaN durations are dropped."""
    d = np.asarray(durations, dtype=np.float64).ravel()
    e = np.asarray(events, dtype=bool).ravel()
    if d.shape != e.shape:
        raise ValueError(f"{d.size} durations vs {e.size} event flags: give one flag per example")
    d, e = d[~np.isnan(d)], e[~np.isnan(d)]
    times, tidx = np.unique(d, return_inverse=True)
    m = times.size
    died = np.bincount(tidx, e.astype(np.float64), m)
    left = np.bincount(tidx, None, m)
    surv = _km(tidx, e, np.zeros(d.size, dtype=np.int64), 1, m)[0] if m else np.zeros(0)
    return pd.DataFrame({"step": times, "at_risk": np.cumsum(left[::-1])[::-1].astype(np.int64),
                         "events": died.astype(np.int64), "censored": (left - died).astype(np.int64),
                         "survival": surv})


def survival_curves(endpoints: pd.DataFrame, by: Sequence[str] = ("kind", "method"),
                    duration: str = "steps_to_target", censored: str = "censored") -> pd.DataFrame:
    """:func:`survival_curve` per group of `by` of an endpoints table (events = not censored)."""
    by = list(by)
    frames = [survival_curve(g[duration], ~g[censored].astype(bool)).assign(
        **dict(zip(by, key if isinstance(key, tuple) else (key,)))) for key, g in endpoints.groupby(by, sort=False)]
    cols = by + ["step", "at_risk", "events", "censored", "survival"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def survival_at(curve: pd.DataFrame, grid) -> np.ndarray:
    """The step function of a survival curve at the steps of `grid`: 1 before its first step, held after
    its last."""
    idx = np.searchsorted(curve.step.to_numpy(), np.asarray(grid, dtype=np.float64), side="right") - 1
    surv = curve.survival.to_numpy()
    return np.where(idx >= 0, surv[np.maximum(idx, 0)] if surv.size else 1.0, 1.0)


def _median_steps(times: np.ndarray, surv: np.ndarray) -> np.ndarray:
    below = surv <= 0.5 + 1e-12
    first = np.argmax(below, axis=-1)
    return np.where(below.any(axis=-1), times[first] if times.size else np.inf, np.inf)


def median_survival(curve: pd.DataFrame) -> float:
    """First step where survival <= 0.5 (half the examples unlearned); inf when it never gets there within
    the recorded steps, NaN for an empty curve."""
    if curve.empty:
        return math.nan
    return float(_median_steps(curve.step.to_numpy(), curve.survival.to_numpy()))


def _km_boot(frames: list[pd.DataFrame], duration: str, censored: str, seed_col: str, unit_col: str,
             group_col: str | None, resamples: int, rng_seed: int):
    """Per frame: its layout, (times, point curve) and the bootstrap survival [resamples, times]."""
    lays, stats, curves = [], [], []
    for df in frames:
        lay = _layout(df[df[duration].notna()], seed_col, unit_col, group_col, [duration, censored])
        times, tidx = np.unique(lay.frame[duration].to_numpy(dtype=np.float64), return_inverse=True)
        ev = ~lay.frame[censored].to_numpy(dtype=bool)
        lays.append(lay)
        stats.append(lambda rows, owner, n, t=tidx, e=ev, m=times.size: _km(t[rows], e[rows], owner, n, m))
        curves.append((times, survival_curve(lay.frame[duration], ev)))
    return lays, curves, _bootstrap(lays, stats, resamples, rng_seed)


def survival_band(endpoints: pd.DataFrame, grid, duration: str = "steps_to_target", censored: str = "censored",
                  seed_col: str = "seed", unit_col: str = "uid", group_col: str | None = None,
                  resamples: int = 1000, rng_seed: int = 0, level: float = LEVEL) -> pd.DataFrame:
    """Kaplan-Meier survival on a fixed step grid with a hierarchical bootstrap band (seeds, then examples
    or groups within them): columns step, survival, low, high."""
    _check(resamples, level)
    if endpoints[duration].notna().sum() == 0:
        raise ValueError(f"no {duration!r} values to build a survival curve from")
    _, [(times, curve)], [boot] = _km_boot([endpoints], duration, censored, seed_col, unit_col, group_col,
                                           resamples, rng_seed)
    grid = np.asarray(grid, dtype=np.float64)
    idx = np.searchsorted(times, grid, side="right") - 1
    at = np.where(idx >= 0, boot[:, np.maximum(idx, 0)], 1.0)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(at, [a, 1.0 - a], axis=0)
    return pd.DataFrame({"step": grid, "survival": survival_at(curve, grid), "low": lo, "high": hi})


def median_survival_interval(a: pd.DataFrame, b: pd.DataFrame | None = None, duration: str = "steps_to_target",
                             censored: str = "censored", seed_col: str = "seed", unit_col: str = "uid",
                             group_col: str | None = None, resamples: int = 1000, rng_seed: int = 0,
                             level: float = LEVEL) -> Interval:
    """Median steps to unlearn (Kaplan-Meier, censoring-aware) with a hierarchical bootstrap interval; with
    `b`, the paired difference median(a) - median(b). inf means "not reached within the budget" (an
    inf - inf resample is dropped as undefined)."""
    _check(resamples, level)
    frames = [a] if b is None else [a, b]
    if any(f[duration].notna().sum() == 0 for f in frames):
        return Interval(math.nan, math.nan, math.nan, 0, 0, resamples, level)
    lays, curves, boots = _km_boot(frames, duration, censored, seed_col, unit_col, group_col, resamples, rng_seed)
    meds = [_median_steps(times, boot) for (times, _), boot in zip(curves, boots)]
    points = [median_survival(curve) for _, curve in curves]
    with np.errstate(invalid="ignore"):
        boot = meds[0] if b is None else meds[0] - meds[1]
        est = points[0] if b is None else points[0] - points[1]
    return Interval(float(est), *percentile_interval(boot, level), len(lays[0].seeds),
                    sum(lay.n_labels for lay in lays), resamples, level)
