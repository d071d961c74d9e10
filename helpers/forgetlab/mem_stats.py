"""The memorization study, step 5: per-example endpoints and rank correlations with intervals that resample
what was drawn at random: the unlearning groups and the subset models.

- **Endpoints** from each example's GenEx curve: steps to remove 50% of its own initial GenEx (primary: the
  example's half-life, in its own units), the share of initial GenEx removed per step over the run, and raw
  steps until GenEx < target. Raw steps grow with initial GenEx by construction (a more memorized example
  starts further from a fixed target), so they are kept only to show the difference.
- **Correlations** (Spearman ρ) of memorization and difficulty with each endpoint, over all examples and
  within each kind (a pooled correlation can come from the kinds differing rather than from the examples).
- **Intervals**: each resample draws (1) whole unlearning groups with replacement, within each kind (the
  examples of a group were unlearned together from one model, so they are not independent), and (2) the
  complementary pairs of set A and of set B with replacement, and recomputes memorization (set A), difficulty
  and the GenEx reference (set B) from the drawn models. The unlearned trajectories themselves are not
  redrawn (one unlearning run per example). An example-only bootstrap (models fixed) is given beside it.

Pure numpy on arrays (no training, no cache): tested on hand-built tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .intervals import percentile_interval
from .mem_pool import MemorizationInputError, set_pairs

ENDPOINTS = ("steps_to_50pct", "fraction_removed_per_step", "steps_to_target")
PRIMARY_ENDPOINT = "steps_to_50pct"
SCORES = ("memorization", "difficulty")
CORR_PAIRS = (("memorization", "difficulty"),) + tuple((x, e) for e in ENDPOINTS for x in SCORES)
CHUNK = 256                   # resamples whose GenEx curves are held in memory at once
LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------- endpoints

def curve_endpoints(genex: np.ndarray, steps: np.ndarray, target_bits: float,
                    fraction: float = 0.5) -> dict[str, np.ndarray]:
    """Endpoints of GenEx curves [..., n_steps] (bits) recorded at `steps` (ascending, first = start).

    - steps_to_50pct: first step with GenEx < (1 - fraction) x initial; last step + 1 when never (censored,
      ranked after every reached one); NaN when initial <= 0 (nothing to remove) or the curve is NaN.
    - fraction_removed_per_step: (initial - final) / initial / (last step - first step); NaN when initial <= 0.
    - steps_to_target: first step with GenEx < target_bits; last step + 1 when never.
    - reached_50pct, reached_target (bool) and initial.
    """
    g = np.asarray(genex, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if g.shape[-1] != s.size or s.size < 2 or np.any(np.diff(s) <= 0):
        raise ValueError(f"need >= 2 ascending steps, one per curve value (got {s.size} steps, curves {g.shape})")
    initial = g[..., 0]
    censored_at = s[-1] + 1

    def first_below(thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        below = g < thr[..., None]
        hit = below.any(-1)
        return np.where(hit, s[np.argmax(below, -1)], censored_at), hit

    with np.errstate(invalid="ignore", divide="ignore"):
        removable = initial > 0
        half, reached_half = first_below(initial * (1.0 - fraction))
        target, reached_target = first_below(np.full(initial.shape, float(target_bits)))
        rate = (initial - g[..., -1]) / initial / (s[-1] - s[0])
    blank = np.isnan(initial)
    return {"initial": initial,
            "steps_to_50pct": np.where(removable, half, np.nan),
            "fraction_removed_per_step": np.where(removable, rate, np.nan),
            "steps_to_target": np.where(blank, np.nan, target),
            "reached_50pct": reached_half & removable, "reached_target": reached_target & ~blank}


# ------------------------------------------------------------------------------------------ correlations

def average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their mean rank (scipy's rankdata "average", without its
    per-call overhead: the bootstrap ranks tens of thousands of short arrays)."""
    v = np.asarray(v, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    sv = v[order]
    new = np.empty(v.size, dtype=bool)
    new[:1] = True
    np.not_equal(sv[1:], sv[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], v.size)
    ranks = np.empty(v.size)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ over the finite pairs (ties share their mean rank); NaN with < 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return math.nan
    middle = (keep.sum() + 1) / 2.0                       # the mean of average ranks 1..n
    rx, ry = average_ranks(x[keep]) - middle, average_ranks(y[keep]) - middle
    denom = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def weighted_average_ranks(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of v [R, N], the average rank of each entry in the sample where entry i appears w[r, i] times
    (ties, between copies or equal values, share their mean rank; entries with weight 0 take no part)."""
    v, w = np.atleast_2d(v), np.atleast_2d(np.asarray(w, dtype=np.float64))
    r, n = v.shape
    order = np.argsort(v, axis=1, kind="stable")
    sv, sw = np.take_along_axis(v, order, 1), np.take_along_axis(w, order, 1)
    new = np.ones((r, n), dtype=bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]
    local = np.cumsum(new, axis=1) - 1                                   # tie block of each sorted entry
    block = local + (np.arange(r) * n)[:, None]
    sums = np.bincount(block.ravel(), weights=sw.ravel(), minlength=r * n).reshape(r, n)
    before = np.cumsum(sums, axis=1) - sums
    ranked = np.take_along_axis(before, local, 1) + (np.take_along_axis(sums, local, 1) + 1) / 2.0
    out = np.empty_like(ranked)
    np.put_along_axis(out, order, ranked, 1)
    return out


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman ρ per row of x, y [R, N] on the sample where pair i appears w[r, i] times (a bootstrap
    resample as counts), over finite pairs: equal to :func:`spearman` on the expanded sample, without
    building it. NaN where fewer than 3 pairs are drawn or a side is constant."""
    x, y = np.atleast_2d(np.asarray(x, dtype=np.float64)), np.atleast_2d(np.asarray(y, dtype=np.float64))
    w = np.where(np.isfinite(x) & np.isfinite(y), np.atleast_2d(np.asarray(w, dtype=np.float64)), 0.0)
    total = w.sum(1)
    middle = ((total + 1) / 2.0)[:, None]
    dx, dy = weighted_average_ranks(x, w) - middle, weighted_average_ranks(y, w) - middle
    cov, vx, vy = (w * dx * dy).sum(1), (w * dx * dx).sum(1), (w * dy * dy).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = cov / np.sqrt(vx * vy)
    return np.where((total >= 3) & (vx > 0) & (vy > 0), rho, np.nan)


def draw_counts(draws: list[np.ndarray], n: int) -> np.ndarray:
    """Resamples as counts [R, n]: how often each example was drawn."""
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)


def cluster_draws(clusters: np.ndarray, strata: np.ndarray, resamples: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Per resample, the indices of the drawn examples: within each stratum (kind), as many clusters (groups)
    as it has, drawn with replacement; every member of a drawn cluster enters together."""
    clusters, strata = np.asarray(clusters), np.asarray(strata)
    members: list[list[np.ndarray]] = []
    for k in pd.unique(strata):
        in_k = np.flatnonzero(strata == k)
        labels = pd.unique(clusters[in_k])
        members.append([in_k[clusters[in_k] == c] for c in labels])
    draws = [rng.integers(0, len(m), size=(resamples, len(m))) for m in members]
    return [np.concatenate([m[j] for m, d in zip(members, draws) for j in d[r]]) for r in range(resamples)]


def cluster_rank_correlation(x: np.ndarray, y: np.ndarray, clusters: np.ndarray | None = None,
                             strata: np.ndarray | None = None, resamples: int = 1000, seed: int = 0,
                             level: float = 0.95) -> dict:
    """Spearman ρ of fixed scores x, y with a percentile interval from resampling clusters within strata.

    `clusters` None: every example its own cluster (the example bootstrap). Returns {spearman, ci_low,
    ci_high, n (finite pairs), n_clusters}.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    clusters = np.arange(n) if clusters is None else np.asarray(clusters)
    strata = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    counts = draw_counts(cluster_draws(clusters, strata, resamples, np.random.default_rng(seed)), n)
    boot = weighted_spearman(np.broadcast_to(x, counts.shape), np.broadcast_to(y, counts.shape), counts)
    lo, hi = percentile_interval(boot, level)
    return {"spearman": spearman(x, y), "ci_low": lo, "ci_high": hi, "n": int((np.isfinite(x) & np.isfinite(y)).sum()),
            "n_clusters": len(pd.unique(clusters))}


# ----------------------------------------------------------------------------- scores from drawn models

@dataclass
class StudyArrays:
    """What the scores are recomputed from: pool lls before unlearning, the split, the sets and the runs.

    ll [n_models, n_examples] (nats, summed over scored tokens), n_scored [n_examples], seen [n_models,
    n_examples], sets [n_models] ("A" / "B"), unlearned [n_examples, n_steps]: per step, log-mean-exp of the
    example's ll over the models it was unlearned from (NaN rows: never unlearned), steps [n_steps].
    """
    ll: np.ndarray
    n_scored: np.ndarray
    seen: np.ndarray
    sets: np.ndarray
    unlearned: np.ndarray
    steps: np.ndarray

    def pairs(self, label: str) -> list[int]:
        return set_pairs(self.sets, label)


def pair_weights(pairs: list[int], n_models: int, counts: np.ndarray) -> np.ndarray:
    """Model weights [R, n_models] from how often each pair was drawn [R, len(pairs)]: both models of a
    drawn pair get its count (so each drawn pair adds one model that saw and one that did not see x)."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    w = np.zeros((counts.shape[0], n_models))
    for j, pair in enumerate(pairs):
        w[:, 2 * pair] = counts[:, j]
        w[:, 2 * pair + 1] = counts[:, j]
    return w


def scores_from_weights(arr: StudyArrays, w_a: np.ndarray, w_b: np.ndarray, target_bits: float) -> dict:
    """Memorization (set-A weights), difficulty and GenEx reference (set-B weights) and the endpoints,
    each [R, n_examples], for R weightings of the models (weights outside a set must be 0)."""
    seen = arr.seen.astype(np.float64)
    unseen = 1.0 - seen
    per_token = arr.ll / arr.n_scored[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        mem = (w_a @ (seen * per_token)) / (w_a @ seen) - (w_a @ (unseen * per_token)) / (w_a @ unseen)
        difficulty = -(w_b @ (unseen * per_token)) / (w_b @ unseen)
        in_b = (arr.sets == "B")[:, None] & ~arr.seen
        shift = np.where(in_b, arr.ll, -np.inf).max(0)
        e = np.exp(np.where(in_b, arr.ll - shift[None, :], -np.inf))
        reference = shift[None, :] + np.log(w_b @ e) - np.log(w_b @ unseen)
        genex = (arr.unlearned[None, :, :] - reference[:, :, None]) / LN2
    out = curve_endpoints(genex, arr.steps, target_bits)
    return {"memorization": mem, "difficulty": difficulty, **{e_: out[e_] for e_ in ENDPOINTS}}


def _check_arrays(arr: StudyArrays, n: int) -> tuple[list[int], list[int]]:
    pa, pb = arr.pairs("A"), arr.pairs("B")
    if not pa or not pb:
        raise MemorizationInputError("the model sets need at least one complementary pair each: build them with "
                                     "mem_pool.model_sets (mem_models >= 4)")
    if arr.ll.shape != arr.seen.shape or arr.ll.shape[1] != n or arr.unlearned.shape[0] != n:
        raise ValueError(f"shapes disagree: ll {arr.ll.shape}, seen {arr.seen.shape}, unlearned "
                         f"{arr.unlearned.shape}, {n} examples")
    return pa, pb


def correlation_bootstrap(arr: StudyArrays, kinds: np.ndarray, groups: np.ndarray, target_bits: float,
                          resamples: int, seed: int = 0, level: float = 0.95,
                          resample_models: bool = True) -> pd.DataFrame:
    """Spearman ρ of each pair in CORR_PAIRS, over all examples ("all") and within each kind, with intervals.

    Each resample draws unlearning `groups` with replacement within each kind and, when `resample_models`,
    set A's and set B's complementary pairs with replacement, and recomputes every score from the drawn
    models. The within-kind ρ of a resample uses that kind's part of the same draw. Returns one row per
    (scope, x, y): spearman, ci_low, ci_high, n (examples with both values), n_groups, valid (resamples
    with a defined ρ).
    """
    kinds, groups = np.asarray(kinds, dtype=object), np.asarray(groups)
    n = len(kinds)
    pa, pb = _check_arrays(arr, n)
    m = len(arr.ll)
    point = scores_from_weights(arr, pair_weights(pa, m, np.ones(len(pa))), pair_weights(pb, m, np.ones(len(pb))),
                                target_bits)
    scopes = ["all"] + list(pd.unique(kinds))
    rng = np.random.default_rng(seed)
    counts = draw_counts(cluster_draws(groups, kinds, resamples, rng), n)
    in_kind = {sc: (kinds == sc).astype(np.float64)[None, :] for sc in scopes if sc != "all"}
    boot = {(sc, x, y): np.full(resamples, np.nan) for sc in scopes for x, y in CORR_PAIRS}
    for start in range(0, resamples, CHUNK):
        r = min(CHUNK, resamples - start)
        if resample_models:
            ca = np.stack([np.bincount(d, minlength=len(pa)) for d in rng.integers(0, len(pa), (r, len(pa)))])
            cb = np.stack([np.bincount(d, minlength=len(pb)) for d in rng.integers(0, len(pb), (r, len(pb)))])
            vals = scores_from_weights(arr, pair_weights(pa, m, ca), pair_weights(pb, m, cb), target_bits)
        else:
            vals = {k: np.broadcast_to(v[0], (r, n)) for k, v in point.items()}
        chunk = counts[start:start + r]
        for sc in scopes:
            w = chunk if sc == "all" else chunk * in_kind[sc]
            for x, y in CORR_PAIRS:
                boot[(sc, x, y)][start:start + r] = weighted_spearman(vals[x], vals[y], w)
    rows = []
    for sc in scopes:
        sel = np.ones(n, dtype=bool) if sc == "all" else kinds == sc
        for x, y in CORR_PAIRS:
            b = boot[(sc, x, y)]
            lo, hi = percentile_interval(b, level)
            xv, yv = point[x][0, sel], point[y][0, sel]
            both = np.isfinite(xv) & np.isfinite(yv)
            rows.append({"kind": sc, "x": x, "y": y, "spearman": spearman(xv, yv), "ci_low": lo, "ci_high": hi,
                         "n": int(both.sum()), "n_groups": len(pd.unique(groups[sel][both])),
                         "valid": int(np.isfinite(b).sum())})
    return pd.DataFrame(rows)


BOOTSTRAPS = ("groups and models", "examples only")


def correlation_table(arr: StudyArrays, kinds: np.ndarray, groups: np.ndarray, target_bits: float,
                      resamples: int, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """:func:`correlation_bootstrap` twice, told apart by the column ``bootstrap``: "groups and models" (the
    interval to read) and "examples only" (examples drawn one by one, models fixed: the naive interval, for
    comparison). Columns pairs_a / pairs_b: complementary pairs in each model set."""
    full = correlation_bootstrap(arr, kinds, groups, target_bits, resamples, seed, level, resample_models=True)
    naive = correlation_bootstrap(arr, kinds, np.arange(len(kinds)), target_bits, resamples, seed, level,
                                  resample_models=False)
    naive["n_groups"] = full.n_groups.to_numpy()
    table = pd.concat([full.assign(bootstrap=BOOTSTRAPS[0]), naive.assign(bootstrap=BOOTSTRAPS[1])],
                      ignore_index=True)
    return table.assign(pairs_a=len(arr.pairs("A")), pairs_b=len(arr.pairs("B")))
