"""The memorization study, step 4: scores per pool example and how they relate.

- ``mem(x)`` = mean per-token ll of x over the subset models that saw it minus over those that did not
  (nats per token), with its standard error (Welch); **difficulty** = per-token loss of x under the models
  that did not see it.
- ``GenEx(x)`` per unlearning step uses the unlearned models that saw x against the subset models that did not
  see x (untouched); **steps to unlearn** is the first step with GenEx below ``target_bits``, and the utility
  lost is the held-out perplexity increase by that step.
- Spearman rank correlations between these, with percentile bootstrap intervals, over all examples and per kind.

Pure table arithmetic (no training, no cache): every function here is tested on hand-computed tables.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from . import metrics
from .mem_pool import MemorizationInputError

if TYPE_CHECKING:
    import torch

    from .mem_models import SubsetModel

CORR_PAIRS = (("memorization", "difficulty"), ("memorization", "steps_to_unlearn"),
              ("difficulty", "steps_to_unlearn"), ("memorization", "ppl_increase_at_target"),
              ("difficulty", "ppl_increase_at_target"))


# ------------------------------------------------------------------------------------------- memorization

def pool_logprobs(models: list[SubsetModel] | list[torch.nn.Module], pool: pd.DataFrame) -> np.ndarray:
    """ll (nats, summed over scored tokens) of every pool example under every model: [n_models, n_examples]."""
    return np.stack([metrics.example_logprobs(getattr(m, "model", m), pool) for m in models])


def memorization_scores(ll: np.ndarray, seen: np.ndarray, n_scored: np.ndarray) -> pd.DataFrame:
    """Counterfactual memorization and difficulty per example, with standard errors (nats per token).

    memorization = mean per-token ll over models that saw x - mean over models that did not;
    its standard error is Welch's sqrt(var_in / n_in + var_out / n_out) (NaN with < 2 models on a side).
    difficulty = mean per-token loss (-ll) over models that did not see x, with its standard error.
    """
    ll = np.asarray(ll, dtype=np.float64)
    seen = np.asarray(seen, dtype=bool)
    if ll.shape != seen.shape:
        raise ValueError(f"memorization_scores: ll {ll.shape} and seen {seen.shape} differ in shape")
    per_token = ll / np.asarray(n_scored, dtype=np.float64)[None, :]
    rows = []
    for i in range(ll.shape[1]):
        a, b = per_token[seen[:, i], i], per_token[~seen[:, i], i]
        if a.size == 0 or b.size == 0:
            raise MemorizationInputError(f"example {i} is seen by {a.size} and unseen by {b.size} models: "
                                         f"every example needs both")
        se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) if min(a.size, b.size) >= 2 else math.nan
        rows.append({"n_in": a.size, "n_out": b.size, "ll_in": a.mean(), "ll_out": b.mean(),
                     "memorization": a.mean() - b.mean(), "memorization_se": se,
                     "difficulty": -b.mean(),
                     "difficulty_se": b.std(ddof=1) / math.sqrt(b.size) if b.size >= 2 else math.nan})
    return pd.DataFrame(rows)


def score_table(pool: pd.DataFrame, ll: np.ndarray, seen: np.ndarray) -> pd.DataFrame:
    """Pool identity (uid, kind, source, n_scored) beside its memorization and difficulty scores."""
    scores = memorization_scores(ll, seen, pool.n_scored.to_numpy())
    cols = [c for c in ("uid", "kind", "source", "n_scored") if c in pool.columns]
    return pd.concat([pool[cols].reset_index(drop=True), scores], axis=1)



# ------------------------------------------------------------------------------- GenEx and cost per example

def genex_curves(results: pd.DataFrame, scores: pd.DataFrame, ll: np.ndarray, seen: np.ndarray) -> pd.DataFrame:
    """GenEx (bits) of each pool example at each step: its unlearned models against the models that never saw it.

    `ll`/`seen` are the pool's [n_models, n_examples] lls before unlearning and the split; the reference
    models (those that did not see x) are never unlearned, so their lls come from `ll`.
    """
    lls = results[results.metric == "ll"]
    index = {u: i for i, u in enumerate(scores.uid)}
    rows = []
    for uid, g in lls.groupby("uid", sort=False):
        i = index[uid]
        ref = ll[~seen[:, i], i]
        per_step = g.pivot_table(index="step", columns="model", values="value")
        bits = metrics.genex_bits(per_step.to_numpy().T, np.broadcast_to(ref[:, None], (len(ref), len(per_step))))
        rows.append(pd.DataFrame({"uid": uid, "step": per_step.index.to_numpy(), "genex_bits": bits}))
    return pd.concat(rows, ignore_index=True)


def example_table(scores: pd.DataFrame, results: pd.DataFrame, genex: pd.DataFrame, target_bits: float,
                  max_steps: int) -> pd.DataFrame:
    """One row per pool example: scores, initial/final GenEx, steps to unlearn, utility lost by then.

    steps_to_unlearn is NaN when the target was not reached within `max_steps` (``reached`` False);
    ppl_increase_at_target is the held-out perplexity at that step minus at step 0, averaged over the
    example's unlearning runs (NaN when not reached); ppl_increase_final the same at the last step.
    Examples without an unlearning run get NaN throughout.
    """
    ppl = results[results.metric == "heldout_ppl"].pivot_table(index="step", columns="group", values="value")
    group_of = results[results.metric == "ll"].groupby("uid").group.unique()
    curves = dict(list(genex.sort_values("step").groupby("uid")))
    rows = []
    for uid in scores.uid:
        if uid not in curves:
            rows.append({"uid": uid, "reached": False, "unlearned_from": 0})
            continue
        c = curves[uid]
        steps = metrics.steps_to_target(c.step.to_numpy(), c.genex_bits.to_numpy(), target_bits)
        runs = ppl[list(group_of[uid])]
        base = runs.iloc[0]
        at = float((runs.loc[int(steps)] - base).mean()) if np.isfinite(steps) else math.nan
        rows.append({"uid": uid, "initial_genex_bits": float(c.genex_bits.iloc[0]),
                     "final_genex_bits": float(c.genex_bits.iloc[-1]), "steps_to_unlearn": steps,
                     "reached": bool(np.isfinite(steps)), "unlearned_from": int(runs.shape[1]),
                     "heldout_ppl_initial": float(base.mean()), "ppl_increase_at_target": at,
                     "ppl_increase_final": float((runs.iloc[-1] - base).mean())})
    table = scores.merge(pd.DataFrame(rows), on="uid", how="left")
    table["steps_censored"] = table.steps_to_unlearn.fillna(max_steps + 1)
    return table


# ------------------------------------------------------------------------------------------- correlations

def bootstrap_rank_correlation(x: np.ndarray, y: np.ndarray, resamples: int, seed: int = 0,
                               level: float = 0.95) -> tuple[float, float, float, int]:
    """Spearman ρ over finite pairs and its percentile bootstrap interval: (rho, lo, hi, n).

    Resamples pairs with replacement; resamples where either side is constant are dropped. NaNs when
    fewer than 3 pairs (or a constant side) leave ρ undefined.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    rho = metrics.rank_correlation(x, y)
    if not np.isfinite(rho):
        return math.nan, math.nan, math.nan, n
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    rx, ry = stats.rankdata(x[idx], axis=1), stats.rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (rx * ry).sum(1) / denom
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return rho, math.nan, math.nan, n
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return rho, float(lo), float(hi), n


def correlation_table(table: pd.DataFrame, resamples: int, seed: int = 0) -> pd.DataFrame:
    """Spearman ρ and bootstrap 95% CI for each pair in CORR_PAIRS, over all examples and per kind.

    Steps to unlearn use ``steps_censored`` (not reached = budget + 1: tied last in rank); utility lost
    uses only examples that reached the target.
    """
    rows = []
    for scope, df in [("all", table)] + list(table.groupby("kind", sort=False)):
        for x, y in CORR_PAIRS:
            ycol = "steps_censored" if y == "steps_to_unlearn" else y
            rho, lo, hi, n = bootstrap_rank_correlation(df[x], df[ycol], resamples, seed)
            rows.append({"kind": scope, "x": x, "y": y, "spearman": rho, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows)


def kind_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind: mean memorization and difficulty, share unlearned within the budget, median steps and cost."""
    return (table.groupby("kind", sort=False)
                 .agg(examples=("uid", "size"), memorization=("memorization", "mean"),
                      memorization_se=("memorization_se", "mean"), difficulty=("difficulty", "mean"),
                      initial_genex_bits=("initial_genex_bits", "mean"), reached=("reached", "mean"),
                      median_steps=("steps_to_unlearn", "median"),
                      ppl_increase_at_target=("ppl_increase_at_target", "median"))
                 .reset_index())

