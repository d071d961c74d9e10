"""The memorization study, step 4: scores per pool example and what unlearning it cost.

- ``mem(x)`` = mean per-token ll of x over the set-A subset models that saw it minus over the set-A models that
  did not (nats per token), with its standard error (Welch); **difficulty** = per-token loss of x under the
  set-B models that did not see it. The two sets are disjoint (:func:`forgetlab.mem_pool.model_sets`), so the
  two scores share no model: noise in the unseen models' ll no longer pushes both up together.
- ``GenEx(x)`` per unlearning step uses x's unlearned models (from set B) against the set-B models that did
  not see x (untouched). Endpoints per example (:func:`forgetlab.mem_stats.curve_endpoints`): steps to remove
  50% of its own initial GenEx (primary), the share of initial GenEx removed per step, and raw steps until
  GenEx < ``target_bits`` (grows with initial GenEx by construction: kept to show the difference).

Pure table arithmetic (no training, no cache): every function here is tested on hand-computed tables.
Correlations and their intervals are in ``mem_stats``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import metrics
from .mem_pool import MemorizationInputError
from .mem_stats import ENDPOINTS, StudyArrays, curve_endpoints

if TYPE_CHECKING:
    import torch

    from .mem_models import SubsetModel


# ------------------------------------------------------------------------------------------- memorization

def pool_logprobs(models: list[SubsetModel] | list[torch.nn.Module], pool: pd.DataFrame) -> np.ndarray:
    """ll (nats, summed over scored tokens) of every pool example under every model: [n_models, n_examples]."""
    return np.stack([metrics.example_logprobs(getattr(m, "model", m), pool) for m in models])


def _mask(mask: np.ndarray | None, n_models: int) -> np.ndarray:
    return np.ones(n_models, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def memorization_scores(ll: np.ndarray, seen: np.ndarray, n_scored: np.ndarray, mem_models: np.ndarray | None = None,
                        diff_models: np.ndarray | None = None) -> pd.DataFrame:
    """Counterfactual memorization and difficulty per example, with standard errors (nats per token).

    memorization = mean per-token ll over the `mem_models` that saw x - mean over the `mem_models` that did not;
    its standard error is Welch's sqrt(var_in / n_in + var_out / n_out) (NaN with < 2 models on a side).
    difficulty = mean per-token loss (-ll) over the `diff_models` that did not see x (n_diff of them), with its
    standard error. Masks over models; None = every model (then the two scores share the unseen models).
    """
    ll = np.asarray(ll, dtype=np.float64)
    seen = np.asarray(seen, dtype=bool)
    if ll.shape != seen.shape:
        raise ValueError(f"memorization_scores: ll {ll.shape} and seen {seen.shape} differ in shape")
    mem_m, diff_m = _mask(mem_models, len(ll)), _mask(diff_models, len(ll))
    per_token = ll / np.asarray(n_scored, dtype=np.float64)[None, :]
    rows = []
    for i in range(ll.shape[1]):
        a, b = per_token[seen[:, i] & mem_m, i], per_token[~seen[:, i] & mem_m, i]
        d = per_token[~seen[:, i] & diff_m, i]
        if a.size == 0 or b.size == 0 or d.size == 0:
            raise MemorizationInputError(f"example {i} is seen by {a.size} and unseen by {b.size} memorization "
                                         f"models, unseen by {d.size} difficulty models: every example needs all "
                                         f"three (build the sets with mem_pool.model_sets)")
        se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) if min(a.size, b.size) >= 2 else math.nan
        rows.append({"n_in": a.size, "n_out": b.size, "n_diff": d.size, "ll_in": a.mean(), "ll_out": b.mean(),
                     "memorization": a.mean() - b.mean(), "memorization_se": se, "difficulty": -d.mean(),
                     "difficulty_se": d.std(ddof=1) / math.sqrt(d.size) if d.size >= 2 else math.nan})
    return pd.DataFrame(rows)


def score_table(pool: pd.DataFrame, ll: np.ndarray, seen: np.ndarray, sets: np.ndarray | None = None) -> pd.DataFrame:
    """Pool identity (uid, kind, source, n_scored) beside its memorization and difficulty scores.

    `sets`: the set label of each model (:func:`forgetlab.mem_pool.model_sets`): memorization from set A,
    difficulty from set B. None: both from every model (the old, shared estimate).
    """
    masks = (None, None) if sets is None else (np.asarray(sets) == "A", np.asarray(sets) == "B")
    scores = memorization_scores(ll, seen, pool.n_scored.to_numpy(), *masks)
    cols = [c for c in ("uid", "kind", "source", "n_scored") if c in pool.columns]
    return pd.concat([pool[cols].reset_index(drop=True), scores], axis=1)


# ------------------------------------------------------------------------------- GenEx and cost per example

def unlearned_ll(results: pd.DataFrame, uids: list[str] | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(curves [n_examples, n_steps], steps): per example and step, log-mean-exp of its ll (nats) over the models
    it was unlearned from; a row of NaN for an example never unlearned."""
    lls = results[results.metric == "ll"]
    steps = np.sort(lls.step.unique())
    table = lls.groupby(["uid", "step"]).value.apply(lambda v: float(metrics.log_mean_exp(v.to_numpy()))).unstack()
    return table.reindex(index=list(uids), columns=steps).to_numpy(dtype=np.float64), steps.astype(np.float64)


def study_arrays(scores: pd.DataFrame, results: pd.DataFrame, ll: np.ndarray, seen: np.ndarray,
                 sets: np.ndarray) -> StudyArrays:
    """What the correlation bootstrap recomputes scores from (see :class:`forgetlab.mem_stats.StudyArrays`)."""
    curves, steps = unlearned_ll(results, scores.uid)
    return StudyArrays(ll=np.asarray(ll, dtype=np.float64), n_scored=scores.n_scored.to_numpy(dtype=np.float64),
                       seen=np.asarray(seen, dtype=bool), sets=np.asarray(sets, dtype=object),
                       unlearned=curves, steps=steps)


def genex_curves(results: pd.DataFrame, scores: pd.DataFrame, ll: np.ndarray, seen: np.ndarray,
                 reference: np.ndarray | None = None) -> pd.DataFrame:
    """GenEx (bits) of each pool example at each step: its unlearned models against models that never saw it.

    `ll`/`seen` are the pool's [n_models, n_examples] lls before unlearning and the split; the reference models
    (those in the `reference` mask, default all, that did not see x) are never unlearned, so their lls come
    from `ll`. The study passes set B as `reference`.
    """
    ref_mask = _mask(reference, len(ll))
    curves, steps = unlearned_ll(results, scores.uid)
    rows = []
    for i, uid in enumerate(scores.uid):
        if np.isnan(curves[i]).all():
            continue
        ref = ll[~seen[:, i] & ref_mask, i]
        if ref.size == 0:
            raise MemorizationInputError(f"example {uid} has no reference model (none that did not see it)")
        bits = (curves[i] - metrics.log_mean_exp(ref)) / math.log(2)
        rows.append(pd.DataFrame({"uid": uid, "step": steps.astype(int), "genex_bits": bits}))
    return pd.concat(rows, ignore_index=True)


def example_table(scores: pd.DataFrame, results: pd.DataFrame, genex: pd.DataFrame, target_bits: float,
                  max_steps: int) -> pd.DataFrame:
    """One row per pool example: scores, group, initial/final GenEx, the endpoints, utility lost by the target.

    Endpoints (:func:`forgetlab.mem_stats.curve_endpoints`): ``steps_to_50pct`` (steps to remove half the
    example's initial GenEx; censored at max_steps + 1, NaN when there was nothing to remove),
    ``fraction_removed_per_step`` (share of initial GenEx removed per step over the run) and ``steps_to_target``
    (raw steps until GenEx < target_bits, censored at max_steps + 1); ``reached`` / ``reached_50pct`` say which
    were reached; ``steps_to_unlearn`` is steps_to_target when reached, else NaN, and ``steps_censored`` equals
    steps_to_target. ppl_increase_at_target is the held-out perplexity at the target step minus at step 0,
    averaged over the example's unlearning runs (NaN when not reached); ppl_increase_final the same at the last
    step. ``group`` is the example's (first) unlearning group. Examples without an unlearning run get NaN.
    """
    ppl = results[results.metric == "heldout_ppl"].pivot_table(index="step", columns="group", values="value")
    group_of = results[results.metric == "ll"].groupby("uid").group.unique()
    wide = genex.pivot_table(index="uid", columns="step", values="genex_bits").reindex(scores.uid)
    steps = wide.columns.to_numpy(dtype=np.float64)
    if len(steps) and steps[-1] != max_steps:
        raise MemorizationInputError(f"GenEx was recorded up to step {steps[-1]:g} but max_steps = {max_steps}: "
                                     f"pass mem_unlearn_steps of the run that made the table")
    ends = curve_endpoints(wide.to_numpy(dtype=np.float64), steps, target_bits)
    rows = []
    for i, uid in enumerate(scores.uid):
        if uid not in group_of.index:
            rows.append({"uid": uid, "reached": False, "reached_50pct": False, "unlearned_from": 0})
            continue
        runs = ppl[list(group_of[uid])]
        base = runs.iloc[0]
        reached = bool(ends["reached_target"][i])
        at = float((runs.loc[int(ends["steps_to_target"][i])] - base).mean()) if reached else math.nan
        rows.append({"uid": uid, "group": int(group_of[uid][0]), "initial_genex_bits": ends["initial"][i],
                     "final_genex_bits": float(wide.iloc[i, -1]),
                     **{e: ends[e][i] for e in ENDPOINTS}, "reached_50pct": bool(ends["reached_50pct"][i]),
                     "reached": reached, "unlearned_from": int(runs.shape[1]),
                     "heldout_ppl_initial": float(base.mean()), "ppl_increase_at_target": at,
                     "ppl_increase_final": float((runs.iloc[-1] - base).mean())})
    table = scores.merge(pd.DataFrame(rows), on="uid", how="left")
    table["steps_censored"] = table.steps_to_target
    table["steps_to_unlearn"] = table.steps_to_target.where(table.reached.astype(bool))
    return table


def kind_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind: mean memorization and difficulty, initial GenEx, share reaching 50% removed and the target,
    median of each endpoint (censored values count as beyond the budget) and utility lost at the target."""
    return (table.groupby("kind", sort=False)
                 .agg(examples=("uid", "size"), memorization=("memorization", "mean"),
                      memorization_se=("memorization_se", "mean"), difficulty=("difficulty", "mean"),
                      initial_genex_bits=("initial_genex_bits", "mean"), reached_50pct=("reached_50pct", "mean"),
                      median_steps_to_50pct=("steps_to_50pct", "median"),
                      median_fraction_removed_per_step=("fraction_removed_per_step", "median"),
                      reached=("reached", "mean"), median_steps=("steps_to_unlearn", "median"),
                      ppl_increase_at_target=("ppl_increase_at_target", "median"))
                 .reset_index())
