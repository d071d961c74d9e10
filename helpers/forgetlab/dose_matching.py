"""Matched memorization (notebook 07), part 2: endpoints per example and the ID-vs-OOD difference at matched
initial GenEx, with a bootstrap interval and a verdict.

The question: does OOD need more gradient-ascent steps than ID *because it is OOD*, or only because it is more
memorized? Comparing raw means cannot tell (an OOD set memorized twice as strongly needs more steps either way), so
we compare within **bins of initial GenEx** where both kinds have examples:

- the overlap is ``[max(min_a, min_b), min(max_a, max_b)]`` of the two kinds' initial GenEx; it is cut into
  ``bins`` equal bins; examples outside it do not count;
- in each bin with at least ``min_per_arm`` examples of each kind, the difference of mean steps (ID minus OOD);
- the matched difference is their weighted mean, weight ``n_a n_b / (n_a + n_b)`` per bin (the stratified
  estimator's weight: a bin counts as much as the precision of its difference).

Steps never reached within the budget are censored at the budget (so a mean is a restricted mean: the true
difference of a censored arm can only be larger). The 95% interval resamples the insertion-count models (each is a
model of its own; ID and OOD examples at one count share it, so a drawn count is used in both arms), then examples
within each (count, kind); bin edges stay those of the data.

GenEx is **calibrated** by default, as in notebooks 03/04 (:func:`forgetlab.claims.calibrate`), per (count, kind,
original seed): each count has models of its own, so the never-trained controls of a kind under one count's models
give that group's offset, their mean GenEx at step 0, which a shared draw of forget and twin sets puts on every
example of the group; every value (initial GenEx, the path to the target, the controls) is read minus it. The noise
floor of a kind is the 95th percentile of its controls' |calibrated GenEx| at step 0, every count and seed pooled
(at least ``target_bits``). ``calibrated=False`` gives the raw GenEx of earlier runs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from . import claims, intervals
from .intervals import LEVEL, Interval

CLAIM = "OOD needs more steps at matched memorization"
ENDPOINTS = {"steps_to_target": "steps to unlearn (GenEx below the noise floor)",
             "steps_to_50pct": "steps to remove 50% of initial GenEx"}
KEYS = ["count", "kind", "seed", "uid"]
GROUP = ["count", "kind", "seed"]        # one calibration group: a count's models, a kind, an original seed
SCALE_WORDS = {
    True: "calibrated GenEx (each example's GenEx minus its offset: the mean step-0 GenEx of the never-trained "
          "controls of its kind under the same count's models and original seed)",
    False: "raw GenEx (not calibrated: the controls' offset of each count, kind and seed is left in)"}
INTERVAL_WORDS = (
    "Each interval holds the middle 95% of the matched differences we get when we redo the comparison on resampled "
    "data: insertion-count models drawn with replacement (ID and OOD examples of a drawn count come from the same "
    "model, so they are drawn together), then examples drawn with replacement within each drawn count and kind; the "
    "bins stay fixed. It shows how much the answer depends on which models and examples we happened to use, not on "
    "model size, data or hyper-parameters. The claim *" + CLAIM + "* means ID minus OOD is below 0: it agrees when "
    "the whole interval is below 0, disagrees when the whole interval is above 0, and is inconclusive when the "
    "interval contains 0.")


# ------------------------------------------------------------------------------------------ endpoints

def genex_rows(table: pd.DataFrame, role: str = "forget") -> pd.DataFrame:
    """Per-example GenEx per step from a dose table: count, kind, seed, uid, step, value (per original seed)."""
    df = table[(table.metric == "genex_seed_bits") & (table.role == role)]
    return df[KEYS + ["step", "value"]].reset_index(drop=True)


def _per_count(table: pd.DataFrame) -> list[tuple[int, pd.DataFrame]]:
    if "count" not in table:
        raise KeyError("no count column: pass the table of dose_response.run_dose_study (or the dose grid's results)")
    return list(table.groupby("count", sort=True))


def count_offsets(table: pd.DataFrame) -> pd.DataFrame:
    """Per count, kind and original seed: ``offset`` (bits), the mean step-0 GenEx of that group's never-trained
    controls, and ``controls`` (how many): :func:`forgetlab.claims.control_offsets` on each count's own models."""
    frames = [claims.control_offsets(g).assign(count=c) for c, g in _per_count(table)]
    return pd.concat(frames, ignore_index=True)[[*GROUP, "offset", "controls"]]


def calibrate_by_count(rows: pd.DataFrame, offsets: pd.DataFrame) -> pd.DataFrame:
    """`rows` (count, kind, seed, value, ...) with ``value`` minus its (count, kind, seed) ``offset`` (kept as a
    column): :func:`forgetlab.claims.calibrate` count by count. KeyError naming the group when one has no controls."""
    frames = []
    for c, g in _per_count(rows):
        try:
            frames.append(claims.calibrate(g, offsets[offsets["count"] == c].drop(columns="count")))
        except KeyError as e:
            raise KeyError(f"count {c}: {e.args[0]}") from None
    return pd.concat(frames, ignore_index=True)


def start_controls(table: pd.DataFrame, calibrated: bool = True) -> pd.DataFrame:
    """The controls' GenEx before unlearning, one row per count, kind, original seed and control
    (:func:`forgetlab.claims.start_controls` per count); calibrated per (count, kind, seed) unless told not to."""
    ctl = pd.concat([claims.start_controls(g).assign(count=c) for c, g in _per_count(table)], ignore_index=True)
    return calibrate_by_count(ctl, count_offsets(table)) if calibrated else ctl


def kind_targets(table: pd.DataFrame, minimum: float, quantile: float = 0.95, calibrated: bool = True
                 ) -> dict[str, float]:
    """Per kind: the GenEx target from the noise floor of its never-trained controls before unlearning, the
    `quantile` of their |calibrated GenEx| at step 0 (every count and seed pooled;
    :func:`forgetlab.intervals.noise_floor_target`), at least ``minimum`` bits. ``calibrated=False``: of their raw
    GenEx (the earlier floors)."""
    if calibrated:
        controls = start_controls(table)
    else:
        controls = genex_rows(table, "control")
        controls = controls[controls.step == controls.step.min()]
    return {kind: intervals.noise_floor_target(g.value, quantile, minimum)
            for kind, g in controls.groupby("kind", sort=False)}


def dose_endpoints(table: pd.DataFrame, targets: Mapping[str, float], calibrated: bool = True) -> pd.DataFrame:
    """Per forget example and count: initial and final GenEx, steps to its kind's target (first step at or below it,
    as :func:`forgetlab.claims.endpoints` reads the floor;
    censored at the budget when never reached), steps to remove 50% of its initial GenEx
    (:func:`intervals.example_endpoints`) and the (count, kind, seed) ``offset`` subtracted (0 when not
    `calibrated`). Every value is calibrated GenEx when `calibrated`: pass `targets` made with the same flag."""
    rows = genex_rows(table)
    rows = calibrate_by_count(rows, count_offsets(table)) if calibrated else rows.assign(offset=0.0)
    at_or_below = {k: float(np.nextafter(t, np.inf)) for k, t in targets.items()}   # |value| <= floor: within noise
    return intervals.example_endpoints(rows, at_or_below, fractions=(0.5,), by=[*KEYS, "offset"])


def dose_table(endpoints: pd.DataFrame, resamples: int, rng_seed: int = 0) -> pd.DataFrame:
    """Mean initial GenEx per kind and count with its 95% bootstrap interval over examples (the dose-response)."""
    t = intervals.interval_table(endpoints, ["kind", "count"], "initial", resamples=resamples, rng_seed=rng_seed)
    return t.rename(columns={"estimate": "initial_genex_bits"}).sort_values(["kind", "count"], kind="stable")


# --------------------------------------------------------------------------------------------- matching

def overlap_edges(initial_a, initial_b, bins: int) -> np.ndarray | None:
    """``bins + 1`` equal-width edges over the overlap of two kinds' initial GenEx; None when they do not overlap."""
    a, b = np.asarray(initial_a, dtype=np.float64), np.asarray(initial_b, dtype=np.float64)
    if bins < 1:
        raise ValueError(f"bins = {bins}: use at least 1")
    if a.size == 0 or b.size == 0:
        return None
    lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
    if not lo < hi:
        return None
    return np.linspace(lo, hi, bins + 1)


def _bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value (the last bin includes its upper edge); -1 outside the edges."""
    idx = np.searchsorted(edges, x, side="right") - 1
    idx[x == edges[-1]] = len(edges) - 2
    idx[(x < edges[0]) | (x > edges[-1])] = -1
    return idx


def _binned(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(examples, sum of y) per bin."""
    idx = _bin_index(x, edges)
    ok = idx >= 0
    n = len(edges) - 1
    return np.bincount(idx[ok], minlength=n).astype(np.float64), np.bincount(idx[ok], y[ok], minlength=n)


def _combine(n_a, s_a, n_b, s_b, min_per_arm: int) -> float:
    use = (n_a >= min_per_arm) & (n_b >= min_per_arm) & (n_a > 0) & (n_b > 0)
    if not use.any():
        return math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = s_a[use] / n_a[use] - s_b[use] / n_b[use]
        w = n_a[use] * n_b[use] / (n_a[use] + n_b[use])
    return float((w * diff).sum() / w.sum())


def matched_difference(initial_a, steps_a, initial_b, steps_b, edges: np.ndarray,
                       min_per_arm: int = 1) -> tuple[float, pd.DataFrame]:
    """Weighted mean over bins of (mean steps of a) - (mean steps of b) at matched initial GenEx, and the
    per-bin table (bin, low, high, n_a, n_b, mean_a, mean_b, difference, weight, used). NaN when no bin holds
    ``min_per_arm`` examples of each arm."""
    xa, ya = np.asarray(initial_a, dtype=np.float64), np.asarray(steps_a, dtype=np.float64)
    xb, yb = np.asarray(initial_b, dtype=np.float64), np.asarray(steps_b, dtype=np.float64)
    n_a, s_a = _binned(xa, ya, edges)
    n_b, s_b = _binned(xb, yb, edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a, mean_b = s_a / n_a, s_b / n_b
        weight = n_a * n_b / (n_a + n_b)
    used = (n_a >= min_per_arm) & (n_b >= min_per_arm) & (n_a > 0) & (n_b > 0)
    bins = pd.DataFrame({"bin": np.arange(len(edges) - 1), "low": edges[:-1], "high": edges[1:],
                         "n_a": n_a.astype(int), "n_b": n_b.astype(int), "mean_a": mean_a, "mean_b": mean_b,
                         "difference": mean_a - mean_b, "weight": np.where(used, weight, 0.0), "used": used})
    return _combine(n_a, s_a, n_b, s_b, min_per_arm), bins


def _cells(df: pd.DataFrame, value: str) -> dict:
    return {c: (g.initial.to_numpy(dtype=np.float64), g[value].to_numpy(dtype=np.float64))
            for c, g in df.groupby("count", sort=True)}


def matched_interval(a: pd.DataFrame, b: pd.DataFrame, value: str, bins: int = 4, min_per_arm: int = 1,
                     resamples: int = 1000, rng_seed: int = 0, level: float = LEVEL
                     ) -> tuple[Interval, pd.DataFrame | None]:
    """The matched difference mean(a) - mean(b) of endpoint ``value`` with its bootstrap interval (module
    docstring), from two endpoint tables (count, initial, value); and the per-bin table (None without overlap).

    Rows with a NaN value (e.g. nothing to remove) are left out. The arms must share their counts.
    """
    a, b = a[a[value].notna()], b[b[value].notna()]
    counts = sorted(set(a["count"]) & set(b["count"]))
    a, b = a[a["count"].isin(counts)], b[b["count"].isin(counts)]
    edges = overlap_edges(a.initial, b.initial, bins)
    if edges is None:
        return Interval(math.nan, math.nan, math.nan, len(counts), 0, resamples, level), None
    est, table = matched_difference(a.initial, a[value], b.initial, b[value], edges, min_per_arm)
    ca, cb = _cells(a, value), _cells(b, value)
    rng = np.random.default_rng(rng_seed)
    boot = np.empty(resamples)
    for r in range(resamples):
        drawn = rng.integers(0, len(counts), len(counts))
        arms = []
        for cells in (ca, cb):
            xs, ys = [], []
            for i in drawn:
                x, y = cells[counts[i]]
                pick = rng.integers(0, len(x), len(x))
                xs.append(x[pick])
                ys.append(y[pick])
            arms.append(_binned(np.concatenate(xs), np.concatenate(ys), edges))
        boot[r] = _combine(*arms[0], *arms[1], min_per_arm)
    return (Interval(est, *intervals.percentile_interval(boot, level), len(counts), len(a) + len(b), resamples,
                     level), table)


def unmatched_interval(a: pd.DataFrame, b: pd.DataFrame, value: str, resamples: int = 1000, rng_seed: int = 0,
                       level: float = LEVEL) -> Interval:
    """ID minus OOD over all examples, paired by count, on the counts both arms have a value at (a count where a
    kind has no measurable example drops out of both arms); NaN (not measurable) when they share none."""
    a, b = a[a[value].notna()], b[b[value].notna()]     # e.g. nothing to remove: left out, as in the matched one
    shared = sorted(set(a["count"]) & set(b["count"]))
    if not shared:
        return Interval(math.nan, math.nan, math.nan, 0, 0, resamples, level)
    return intervals.difference_interval(a[a["count"].isin(shared)], b[b["count"].isin(shared)], value,
                                         seed_col="count", resamples=resamples, rng_seed=rng_seed, level=level)


def verdict_table(endpoints: pd.DataFrame, id_kind: str = "id", bins: int = 4, min_per_arm: int = 1,
                  resamples: int = 1000, rng_seed: int = 0,
                  labels: Mapping[str, str] | None = None, measures: Sequence[str] = tuple(ENDPOINTS)
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per OOD kind and endpoint: the ID-minus-OOD difference in steps, matched (bins of initial GenEx) and
    unmatched (all examples, paired by count), each with its 95% interval and verdict on :data:`CLAIM`.

    Returns (verdicts, bins): one row per kind x endpoint x comparison, and the matched bins of every comparison.
    """
    a = endpoints[endpoints.kind == id_kind]
    rows, bin_tables = [], []
    for kind in [k for k in dict.fromkeys(endpoints.kind) if k != id_kind]:
        b = endpoints[endpoints.kind == kind]
        for value in measures:
            matched, table = matched_interval(a, b, value, bins, min_per_arm, resamples, rng_seed)
            plain = unmatched_interval(a, b, value, resamples, rng_seed)
            base = {"kind": kind, "label": (labels or {}).get(kind, kind), "endpoint": value}
            used = table[table.used] if table is not None else None
            rows.append({**base, "comparison": "matched", **matched.as_dict(), "verdict": intervals.verdict(
                matched, "negative"), "bins_used": 0 if used is None else len(used),
                "overlap_low": np.nan if used is None else table.low.min(),
                "overlap_high": np.nan if used is None else table.high.max()})
            rows.append({**base, "comparison": "unmatched", **plain.as_dict(),
                         "verdict": intervals.verdict(plain, "negative"), "bins_used": np.nan,
                         "overlap_low": np.nan, "overlap_high": np.nan})
            if table is not None:
                bin_tables.append(table.assign(kind=kind, endpoint=value))
    bins_out = pd.concat(bin_tables, ignore_index=True) if bin_tables else pd.DataFrame()
    return pd.DataFrame(rows), bins_out


# ---------------------------------------------------------------------------------------------- record

def summary_record(dose: pd.DataFrame, verdicts: pd.DataFrame, targets: Mapping[str, float], p: dict,
                   calibrated: bool = True, offsets: pd.DataFrame | None = None) -> dict:
    """The ``matched_memorization`` section of summary.json: design, the GenEx scale (``genex_scale``: calibrated
    or raw; with `offsets` of :func:`count_offsets`, the controls' offset per kind and count, bits, the mean over
    original seeds), dose-response and verdicts with bounds."""
    curve = {k: {int(r["count"]): {"initial_genex_bits": r.initial_genex_bits, "low": r.low, "high": r.high}
                 for _, r in g.iterrows()} for k, g in dose.groupby("kind", sort=False)}
    verdict_rows = {f"{r.kind}/{r.endpoint}/{r.comparison}": {
        "id_minus_ood_steps": r.estimate, "low": r.low, "high": r.high, "verdict": r.verdict,
        "bins_used": r.bins_used} for r in verdicts.itertuples()}
    return {"claim": CLAIM, "counts": sorted(p["dose_insertions"]), "forget_size": p["dose_forget_size"],
            "unlearn_steps": p["dose_unlearn_steps"], "references": "twins (fine-tuned like the original, twins in place "
            "of the forget examples)",
            "genex_scale": "calibrated" if calibrated else "raw", "genex_scale_words": SCALE_WORDS[bool(calibrated)],
            **({} if offsets is None else {"control_offsets_bits": {
                k: {int(c): float(v) for c, v in g.groupby("count").offset.mean().items()}
                for k, g in offsets.groupby("kind", sort=False)}}),
            "targets_bits": dict(targets), "initial_genex_by_count": curve, "verdicts": verdict_rows}


def findings_markdown(verdicts: pd.DataFrame, dose: pd.DataFrame, budget: int, calibrated: bool = True) -> str:
    """What this run found, in plain words, from the matched verdicts; the first line says which GenEx scale."""
    genex = "calibrated GenEx" if calibrated else "raw GenEx"
    lines = [(f"- Scale: {SCALE_WORDS[bool(calibrated)]}. Initial GenEx, the matching bins and the noise floor "
              "(steps to unlearn) are all on this scale.")]
    for r in verdicts[verdicts.comparison == "matched"].itertuples():
        plain = verdicts[(verdicts.comparison == "unmatched") & (verdicts.kind == r.kind)
                         & (verdicts.endpoint == r.endpoint)].iloc[0]
        what = ENDPOINTS.get(r.endpoint, r.endpoint)
        if r.verdict == "not measurable":
            lines.append(f"- **{r.label}**, {what}: no bin of initial {genex} holds both kinds, so there is no "
                         f"matched comparison (unmatched ID - OOD: {plain.estimate:.1f} [{plain.low:.1f}, "
                         f"{plain.high:.1f}], {plain.verdict}).")
            continue
        lines.append(f"- **{r.label}**, {what}: at matched initial {genex} ({r.overlap_low:.1f} to "
                     f"{r.overlap_high:.1f} bits, {int(r.bins_used)} bin(s)), ID - OOD = {r.estimate:.1f} steps "
                     f"[{r.low:.1f}, {r.high:.1f}]: **{r.verdict}**; unmatched: {plain.estimate:.1f} "
                     f"[{plain.low:.1f}, {plain.high:.1f}], {plain.verdict}.")
    top = dose.loc[dose.groupby("kind", sort=False)["count"].idxmax()]
    spread = ", ".join(f"{r.kind} {r.initial_genex_bits:.1f} bits" for r in top.itertuples())
    lines.append(f"- Initial {genex} at the highest count: {spread}. Steps are censored at the budget of {budget}.")
    return "\n".join(lines)
