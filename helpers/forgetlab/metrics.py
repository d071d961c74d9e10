"""Unlearning metrics: exposure (exact and extrapolated), GenEx, RelEx, membership AUC.

The pure functions take log-likelihoods (nats, numpy) and return bits or plain floats; the
model-level helpers score sequences with :func:`forgetlab.scoring.sequence_logprobs` in batches.
Names follow the "Definitions" section of the design brief.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import torch
from scipy import special, stats

from .scoring import sequence_logprobs

LN2 = math.log(2.0)
MIN_CDF = np.finfo(np.float64).tiny      # floor of the skew-normal CDF: exposure stays finite (<= ~1022 bits)
TIE_TOL = 1e-5                           # nats: candidates closer than this to the secret count as ties
RETAIN_SEED = 0                          # fixed seed of the retain-set sample used by utility()


# --------------------------------------------------------------------------------------------- pure

def log_mean_exp(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """log(mean(exp(x))) along `axis`, computed stably (no overflow at +1e4, -inf entries allowed).

    An expectation of probabilities over model seeds, taken in log space (GenEx).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    if n == 0:
        raise ValueError("log_mean_exp of an empty axis")
    with np.errstate(divide="ignore", invalid="ignore"):
        return special.logsumexp(x, axis=axis) - math.log(n)


def exposure_from_logprobs(secret_ll: float, candidate_ll: np.ndarray, tol: float = TIE_TOL) -> float:
    """Exact Carlini exposure (bits) of a secret among all candidates R (the secret included).

    rank = 1 + #{r : ll(r) > ll(secret)}; exposure = log2|R| - log2 rank. Ties (within `tol`
    nats, so that float noise between two scorings of the same sequence is no rank change) count
    in the secret's favour, so the most likely candidate gets log2|R| and the least likely 0
    (when it is unique).
    """
    cand = np.asarray(candidate_ll, dtype=np.float64).ravel()
    if cand.size == 0:
        raise ValueError("exposure needs a non-empty candidate set")
    rank = 1 + int(np.count_nonzero(cand > float(secret_ll) + tol))
    return float(math.log2(cand.size) - math.log2(rank))


def exposure_rank(secret_ll: float, candidate_ll: np.ndarray, tol: float = TIE_TOL) -> int:
    """The secret's rank among the candidates (1 = most likely), as in :func:`exposure_from_logprobs`."""
    return 1 + int(np.count_nonzero(np.asarray(candidate_ll, dtype=np.float64) > float(secret_ll) + tol))


_FIT_CACHE: "OrderedDict[bytes, tuple[float, float, float]]" = OrderedDict()


def _skewnorm_fit(nll: np.ndarray) -> tuple[float, float, float]:
    """skewnorm.fit, memoised on the sample (the evaluator extrapolates many secrets per sample)."""
    key = nll.tobytes()
    if key not in _FIT_CACHE:
        _FIT_CACHE[key] = tuple(float(v) for v in stats.skewnorm.fit(nll))
        while len(_FIT_CACHE) > 16:
            _FIT_CACHE.popitem(last=False)
    return _FIT_CACHE[key]


def extrapolated_exposure(secret_ll: float | np.ndarray, sample_ll: np.ndarray) -> float | np.ndarray:
    """Exposure (bits) estimated from a sample of candidates, when R is too large to score whole.

    Fits a skew-normal to the sample's log-perplexities (-ll) and returns -log2 CDF(-ll(secret)):
    the (log) fraction of R expected to be at least as likely as the secret. The CDF is floored at
    the smallest positive double so the estimate stays finite. Vectorised over `secret_ll`.
    NaN if the sample has fewer than 3 finite values or no spread.
    """
    nll = -np.asarray(sample_ll, dtype=np.float64).ravel()
    nll = nll[np.isfinite(nll)]
    scalar = np.ndim(secret_ll) == 0
    secret = np.asarray(secret_ll, dtype=np.float64)
    if nll.size < 3 or np.ptp(nll) == 0:
        out = np.full(secret.shape, np.nan)
    else:
        a, loc, scale = _skewnorm_fit(nll)
        log_cdf = stats.skewnorm.logcdf(-secret, a, loc=loc, scale=scale)
        out = -np.maximum(log_cdf, math.log(MIN_CDF)) / LN2
        out = np.where(np.isnan(secret), np.nan, out + 0.0)   # + 0.0 turns -0.0 into 0.0
    return float(out) if scalar else out


def genex_bits(ll_unlearned: np.ndarray, ll_reference: np.ndarray) -> np.ndarray:
    """Generalized exposure per example, in bits.

    Inputs are [n_models, n_examples] sequence log-likelihoods (nats); a 1-D input is one model.
    GenEx = (log E_unlearned p(x) - log E_reference p(x)) / ln 2, expectations over models taken
    with log-mean-exp. 0: as if never seen; > 0: still exposed; < 0: over-unlearned.
    """
    u = np.atleast_2d(np.asarray(ll_unlearned, dtype=np.float64))
    r = np.atleast_2d(np.asarray(ll_reference, dtype=np.float64))
    if u.shape[1] != r.shape[1]:
        raise ValueError(f"genex_bits: {u.shape[1]} unlearned examples vs {r.shape[1]} reference examples")
    return (log_mean_exp(u, axis=0) - log_mean_exp(r, axis=0)) / LN2


def exposure_max_bits(digits: int) -> float:
    """The largest exposure of a canary with ``digits`` digits: log2 |R| = digits * log2(10) bits."""
    return digits * math.log2(10)


def relex_max_bits(population_size: int) -> float:
    """The largest RelEx against ``population_size`` peers: log2(1 + |Pop|) bits (the example beats every peer)."""
    return math.log2(1 + population_size)


def relex_bits(ll_x: np.ndarray | float, ll_pop: np.ndarray) -> np.ndarray | float:
    """Relative exposure (bits) of each x against a never-trained population, reference-free.

    RelEx = -log2((1 + #{x' in Pop : ll(x') >= ll(x)}) / (1 + |Pop|)); ties count against x, so
    an x no more likely than the whole population gets 0 and the maximum is log2(1 + |Pop|).
    NaN population entries are dropped; a NaN x gives NaN.
    """
    pop = np.asarray(ll_pop, dtype=np.float64).ravel()
    pop = np.sort(pop[~np.isnan(pop)])
    x = np.asarray(ll_x, dtype=np.float64)
    at_least = pop.size - np.searchsorted(pop, x, side="left")     # #{pop >= x}
    out = -np.log2((1.0 + at_least) / (1.0 + pop.size))
    out = np.where(np.isnan(x), np.nan, out + 0.0)
    return float(out) if np.ndim(ll_x) == 0 else out


def membership_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of telling members from non-members by score (higher = member), ties count 1/2.

    Equals the Mann-Whitney probability P(member > non-member) + P(tie)/2; 0.5 is chance. NaN
    if either group is empty.
    """
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        return float("nan")
    ranks = stats.rankdata(np.concatenate([m, n]))          # average ranks: ties split evenly
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def steps_to_target(steps: np.ndarray, values: np.ndarray, target: float) -> float:
    """First step (in step order) whose value is below `target`; NaN if none is (NaN values never are)."""
    steps = np.asarray(steps, dtype=np.float64).ravel()
    values = np.asarray(values, dtype=np.float64).ravel()
    if steps.shape != values.shape:
        raise ValueError(f"steps_to_target: {steps.size} steps vs {values.size} values")
    order = np.argsort(steps, kind="stable")
    hit = np.flatnonzero(values[order] < target)
    return float(steps[order][hit[0]]) if hit.size else float("nan")


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation over pairs where both are finite; NaN if < 3 pairs or either is constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------------- model-level

@torch.no_grad()
def example_logprobs(model: torch.nn.Module, examples: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
    """ll (nats) of each row's scored tokens ids[score_start:] given what precedes them; one value per row."""
    if len(examples) == 0:
        return np.zeros(0, dtype=np.float64)
    seqs = [list(map(int, ids)) for ids in examples.ids]
    return sequence_logprobs(model, seqs, [int(s) for s in examples.score_start], batch_size=batch_size)


def seeded_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """A fixed, seeded sample of `n` of `rows` (in original order): the rows the retain loss is measured on."""
    idx = np.sort(np.random.default_rng(RETAIN_SEED).choice(len(rows), size=min(n, len(rows)), replace=False))
    return rows[idx]
