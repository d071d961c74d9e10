"""The study engine: what one unlearning run scores, the per-step evaluator, the runs, and their cache.

Written once for every model. What differs between models (which originals to unlearn, the references, how a
model scores text and canary candidates, its utility, its cache key) is a :class:`Backend`; the tiny GPT-2 and
SmolLM2-135M are two (:mod:`forgetlab.backends`).

The result of :func:`run_study` is one tidy table, a row per method x kind x seed x step x example x metric
(columns ``step, seed, uid, role, metric, value, kind, method``). Recorded at each recorded step:

- per forget and control example: ``ll`` (nats, under each unlearned original seed), ``relex_bits`` against the
  never-trained population, and for canaries ``exposure_bits`` (skew-normal extrapolation from the population)
  and, at the first and last step, ``exposure_exact_bits`` over all of R;
- per model: ``membership_auc`` (forget examples against the population) and the backend's utility;
- per model: ``grad_norm`` (the gradient norm before clipping of the step that led to the record) and
  ``clip_fraction`` (1 where clipping bound at that step);
- after the run, ``genex_bits`` per example and step (``seed = -1``: all unlearned seeds against all references)
  and ``genex_seed_bits`` (each original seed against all references, for intervals over seeds).

Every (forget set, method, original seed) trajectory is its own cache entry, so an interrupted run redoes at
most the trajectory in progress.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics
from .cache import ArtifactCache, cache_key, code_version
from .tables import read_tidy_csv
from .unlearning import UnlearnSettings, Unlearner

ENGINE_CODE = ("engine", "unlearning", "metrics", "scoring", "canaries", "exposure_trie")  # code of a run
COLUMNS = ("step", "seed", "uid", "role", "metric", "value", "kind", "method")
Evaluator = Callable[[torch.nn.Module, int], list[dict]]


class StudyInputError(ValueError):
    """The forget set, models or parameters cannot be used together; the message says why."""


@dataclass
class ForgetSetView:
    """What one unlearning run scores: its forget and control examples and their never-trained population."""
    kind: str
    targets: pd.DataFrame      # forget + control examples of the kind
    population: pd.DataFrame   # never-trained peers (RelEx population, membership non-members)

    @classmethod
    def build(cls, examples: pd.DataFrame, kind: str, kinds: tuple[str, ...] | list[str],
              population: pd.DataFrame | None = None) -> "ForgetSetView":
        """The view of ``kind`` from an examples table; ``population`` replaces the table's population rows."""
        if kind not in kinds:
            raise StudyInputError(f"unknown forget set {kind!r}: this run has {', '.join(kinds)} (forget_kinds)")
        ex = examples[examples.kind == kind]
        targets = ex[ex.role.isin(["forget", "control"])].reset_index(drop=True)
        if population is None:
            population = ex[ex.role == "population"].reset_index(drop=True)
        return cls(kind, targets, population)

    @property
    def forget(self) -> pd.DataFrame:
        return self.targets[self.targets.role == "forget"]


class Backend(Protocol):
    """What the engine needs from a model family. See :mod:`forgetlab.backends` for the two shipped ones."""
    name: str                      # short name, used in cache keys and labels
    kinds: tuple[str, ...]         # the forget sets of this run
    labels: dict[str, str]         # kind -> label for figures and text
    methods: tuple[str, ...]       # unlearning methods of this run
    original_seeds: list[int]      # one unlearning trajectory per original model
    pad_id: int                    # pads forget batches
    retain_rows: np.ndarray        # gradient difference draws its retain batches from these [n, L] rows
    target_bits: float             # GenEx below which an example counts as unlearned

    def settings(self, method: str) -> UnlearnSettings: ...
    def view(self, kind: str) -> ForgetSetView: ...
    def original(self, seed: int) -> torch.nn.Module: ...          # a model at the original's weights, to modify
    def release(self, model: torch.nn.Module) -> None: ...         # done with a model from original()
    def reference_logprobs(self, examples: pd.DataFrame) -> np.ndarray: ...   # [n_reference, n_examples]
    def example_logprobs(self, model: torch.nn.Module, examples: pd.DataFrame) -> np.ndarray: ...
    def candidate_logprobs(self, model: torch.nn.Module) -> np.ndarray: ...   # every canary candidate [10**d]
    def utility(self, model: torch.nn.Module) -> dict[str, float]: ...
    def key(self, seed: int) -> str: ...   # everything one original seed's trajectories depend on (not kind/method)


# ---- one recorded step --------------------------------------------------------------------------------

def target_records(targets: pd.DataFrame, ll_t: np.ndarray, ll_pop: np.ndarray, extrapolate: bool) -> list[dict]:
    """Per forget and control example: ``ll``, ``relex_bits`` against the population and, with `extrapolate`
    (canaries), ``exposure_bits`` from a skew-normal fitted to the population."""
    relex = metrics.relex_bits(ll_t, ll_pop)
    exposure = metrics.extrapolated_exposure(ll_t, ll_pop) if extrapolate else None
    recs = []
    for i, r in enumerate(targets.itertuples()):
        recs += [{"uid": r.uid, "role": r.role, "metric": "ll", "value": float(ll_t[i])},
                 {"uid": r.uid, "role": r.role, "metric": "relex_bits", "value": float(relex[i])}]
        if exposure is not None:
            recs.append({"uid": r.uid, "role": r.role, "metric": "exposure_bits", "value": float(exposure[i])})
    return recs


def model_records(per_token_forget: np.ndarray, per_token_pop: np.ndarray, utility: dict[str, float]) -> list[dict]:
    """Per model: ``membership_auc`` (forget examples against the population, per-token ll) and the utility."""
    recs = [{"uid": "", "role": "model", "metric": "membership_auc",
             "value": metrics.membership_auc(per_token_forget, per_token_pop)}]
    return recs + [{"uid": "", "role": "model", "metric": name, "value": float(value)}
                   for name, value in utility.items()]


def exact_exposure_records(targets: pd.DataFrame, candidate_ll: np.ndarray) -> list[dict]:
    """``exposure_exact_bits`` of each canary target, its own ll read from the same candidate array."""
    return [{"uid": r.uid, "role": r.role, "metric": "exposure_exact_bits",
             "value": metrics.exposure_from_logprobs(candidate_ll[int(r.secret)], candidate_ll)}
            for r in targets.itertuples()]


def utility_due(step: int, final_step: int, utility_every: int) -> bool:
    """Whether a recorded step measures utility: step 0, the last step and every ``utility_every``-th step."""
    return utility_every <= 1 or step in (0, final_step) or step % utility_every == 0


def make_evaluator(backend: Backend, view: ForgetSetView, final_step: int, fast: bool = True,
                   utility_every: int = 1) -> Evaluator:
    """The function an :class:`Unlearner` calls at each recorded step; returns tidy records.

    ``fast`` (default) scores the step's rows and the utility together through the backend's optional
    ``step_scores(model, examples, utility) -> (ll, utility)`` (every row once, few forward passes);
    ``fast=False``, or a backend without it, calls ``example_logprobs`` and ``utility`` apart: the
    straightforward reference that tests/test_fast_paths.py and benchmarks/bench_evaluation.py compare against.
    Utility (held-out, retain and population losses: most of a step's rows) is measured only where
    :func:`utility_due`; the forgetting metrics at every recorded step.
    """
    scored = pd.concat([view.targets, view.population], ignore_index=True)
    n_t = len(view.targets)
    n_scored = scored.n_scored.to_numpy()
    is_forget = (view.targets.role == "forget").to_numpy()
    canary = view.kind == "canary"
    together = getattr(backend, "step_scores", None) if fast else None

    def evaluate(model: torch.nn.Module, step: int) -> list[dict]:
        due = utility_due(step, final_step, utility_every)
        if together is not None:
            ll, util = together(model, scored, utility=due)
        else:
            ll, util = backend.example_logprobs(model, scored), None if due else {}
        ll_t, ll_pop = ll[:n_t], ll[n_t:]
        recs = target_records(view.targets, ll_t, ll_pop, extrapolate=canary)
        if canary and step in (0, final_step):
            recs += exact_exposure_records(view.targets, backend.candidate_logprobs(model))
        per_token = ll / n_scored
        util = backend.utility(model) if util is None else util
        return recs + model_records(per_token[:n_t][is_forget], per_token[n_t:], util)

    return evaluate


# ---- unlearning runs ----------------------------------------------------------------------------------

def new_unlearner(backend: Backend, view: ForgetSetView, method: str, model: torch.nn.Module) -> Unlearner:
    """An unlearner of ``view``'s forget set with ``method``, at step 0 on ``model``."""
    forget = view.forget
    return Unlearner(model, [list(map(int, i)) for i in forget.ids], forget.score_start.tolist(),
                     backend.settings(method), backend.pad_id, retain_rows=backend.retain_rows)


def unlearn_trajectory(backend: Backend, kind: str, method: str, seed: int, steps: int | None = None,
                       start: dict | None = None) -> pd.DataFrame:
    """Unlearn one forget set from one original seed with one method: its per-step records (no GenEx).

    ``start``, shared by the runs of one study, keeps each (kind, seed)'s step-0 records: every method starts
    from the same model, so step 0 is scored once.
    """
    view = backend.view(kind)
    settings = backend.settings(method)
    steps = steps or settings.steps
    evaluate = make_evaluator(backend, view, steps, utility_every=settings.utility_every)
    if start is not None:
        scored_start = start.get((kind, seed))

        def first_cached(model, step, inner=evaluate):
            if step == 0 and scored_start is not None:
                return scored_start
            recs = inner(model, step)
            if step == 0:
                start[(kind, seed)] = recs
            return recs
        evaluate = first_cached
    model = backend.original(seed)
    try:
        records = new_unlearner(backend, view, method, model).run(steps, evaluate)
    finally:
        backend.release(model)
    return pd.DataFrame(records).assign(seed=seed, kind=kind, method=method)


def add_genex(table: pd.DataFrame, targets: pd.DataFrame, ref_ll: np.ndarray) -> pd.DataFrame:
    """Append GenEx rows per example and step: ``genex_bits`` (seed = -1: all unlearned seeds against all
    references, the design's GenEx) and ``genex_seed_bits`` (each original seed against all references: the
    per-seed values that intervals resample)."""
    ll = table[table.metric == "ll"].pivot_table(index=["step", "seed"], columns="uid", values="value")
    ll = ll.reindex(columns=targets.uid)
    uids, roles = targets.uid.tolist(), targets.role.tolist()
    rows = []
    for step, block in ll.groupby(level="step"):
        bits = metrics.genex_bits(block.to_numpy(), ref_ll)
        rows += [{"step": step, "seed": -1, "uid": u, "role": r, "metric": "genex_bits", "value": float(b)}
                 for u, r, b in zip(uids, roles, bits)]
        for (_, seed), seed_ll in zip(block.index, block.to_numpy()):
            bits = metrics.genex_bits(seed_ll, ref_ll)
            rows += [{"step": step, "seed": seed, "uid": u, "role": r, "metric": "genex_seed_bits",
                      "value": float(b)} for u, r, b in zip(uids, roles, bits)]
    extra = pd.DataFrame(rows).assign(kind=table.kind.iloc[0], method=table.method.iloc[0])
    return pd.concat([table, extra], ignore_index=True)


def reference_lls(backend: Backend, kinds: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """ll of every kind's targets under every reference model, scored in one pass: kind -> [n_ref, n_targets]."""
    views = {k: backend.view(k) for k in kinds}
    targets = pd.concat([v.targets for v in views.values()], ignore_index=True)
    ll = backend.reference_logprobs(targets)
    out, pos = {}, 0
    for k, v in views.items():
        out[k] = ll[:, pos:pos + len(v.targets)]
        pos += len(v.targets)
    return out


def unlearn_forget_set(backend: Backend, kind: str, method: str, steps: int | None = None,
                       ref_ll: np.ndarray | None = None) -> pd.DataFrame:
    """Every original seed's trajectory of one forget set and method, uncached, with GenEx."""
    if ref_ll is None:
        ref_ll = reference_lls(backend, [kind])[kind]
    frames = [unlearn_trajectory(backend, kind, method, seed, steps) for seed in backend.original_seeds]
    return add_genex(pd.concat(frames, ignore_index=True), backend.view(kind).targets, ref_ll)[list(COLUMNS)]


def trajectory_key(backend: Backend, kind: str, method: str, seed: int) -> str:
    """Key of one trajectory: the engine's code, the backend's key for the seed, the forget set and method."""
    return cache_key("trajectory", code_version(*ENGINE_CODE), backend.key(seed), kind, method,
                     asdict(backend.settings(method)))


def run_study(backend: Backend, cache: ArtifactCache | None = None, kinds: list[str] | None = None,
              methods: list[str] | None = None, workers: int | None = None) -> pd.DataFrame:
    """Every forget set x every method x every original seed: the full per-step table with GenEx.

    Each trajectory comes from the cache or is run now and cached on its own. A backend that offers
    ``worker_recipe()`` runs its missing trajectories on ``workers`` processes (default: FORGETLAB_WORKERS, else
    min(2, cores); see :mod:`forgetlab.engine_pool`), each at one torch thread; with one worker they run here, also
    at one thread, so the table is the same bit for bit whatever ``workers`` is. A backend whose ``poolable`` is
    False (SmolLM2 on a GPU, or with the paths before) runs them here at torch's thread count.
    """
    from . import engine_pool
    cache = cache or ArtifactCache()
    kinds = list(kinds or backend.kinds)
    methods = list(methods or backend.methods)
    for kind in kinds:
        backend.view(kind)                                   # refuses an unknown kind before any work
    jobs = [(k, m, s) for k in kinds for m in methods for s in backend.original_seeds]
    poolable = hasattr(backend, "worker_recipe") and getattr(backend, "poolable", True)
    workers = engine_pool.resolve_workers(workers)
    if poolable and workers > 1:
        engine_pool.run_trajectories(backend, cache, [j for j in jobs if not cache.has(
            "trajectory", trajectory_key(backend, *j))], workers)
    ref = None
    start: dict = {}
    frames: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for kind, method, seed in tqdm(jobs, desc=f"unlearning ({backend.name})", mininterval=1.0):
        def build(kind=kind, method=method, seed=seed):
            with engine_pool.torch_threads(1 if poolable else None):
                rows = unlearn_trajectory(backend, kind, method, seed, start=start)
            return {"rows": len(rows), "kind": kind, "method": method, "seed": seed}, None, {
                "rows.csv": rows.to_csv(index=False)}
        _, _, files = cache.get_or_build("trajectory", trajectory_key(backend, kind, method, seed), build)
        frames.setdefault((kind, method), []).append(read_tidy_csv(files["rows.csv"]))
    out = []
    for (kind, method), parts in frames.items():
        if ref is None:
            ref = reference_lls(backend, kinds)
        table = pd.concat(parts, ignore_index=True)
        out.append(add_genex(table, backend.view(kind).targets, ref[kind])[list(COLUMNS)])
    return pd.concat(out, ignore_index=True)
