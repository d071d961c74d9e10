"""Independent unlearning trajectories of a study on a process pool (used by :func:`forgetlab.engine.run_study`).

Trajectories of different forget sets, methods and original seeds share nothing but their starting models, so
they run on ``workers`` processes (spawned, one torch thread each, :func:`forgetlab.determinism` set). Each worker
rebuilds the backend once from ``backend.worker_recipe()``, a picklable ``(factory, args)`` (pickled to a
temporary file once), and writes each
trajectory to the cache itself (entries are safe under concurrent processes); the caller then reads them.

Step 0 is the same model for every method of a (forget set, seed): it is evaluated once, by the first free
worker, and handed to those methods' trajectories, exactly as the sequential loop shares it.

Bit for bit: a trajectory computes the same operations in a worker as in the calling process at one thread, and
torch's CPU kernels can round differently at different thread counts (a tiny model's Adam step does), so
``run_study`` also runs a poolable backend's trajectories at one thread when it runs them itself.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .cache import ArtifactCache

WORKERS_ENV = "FORGETLAB_WORKERS"
_STATE: dict = {}            # the worker's backend and cache (set by _init in each worker process)


def resolve_workers(workers: int | None = None) -> int:
    """``workers`` if given, else FORGETLAB_WORKERS, else min(2, cores); refuses anything but a whole number >= 1."""
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "").strip()
        if not env:
            return max(1, min(2, os.cpu_count() or 1))
        try:
            workers = int(env)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} = {env!r} is invalid: set it to a whole number >= 1 (1 runs the "
                             f"trajectories one after another in the calling process)") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers = {workers!r} is invalid: pass a whole number >= 1 (or set {WORKERS_ENV})")
    return workers


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block at ``n`` torch threads (None: leave them), then restore the previous count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cancel_on_error(pool: ProcessPoolExecutor, bar) -> Iterator[None]:
    """Collect a pool's results in the block; on any error cancel the work not yet started (waiting for what runs)
    and re-raise; close the progress bar either way."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()


def _init(recipe_path: str, root: str, heal: bool) -> None:
    import forgetlab
    torch.set_num_threads(1)
    forgetlab.determinism()
    with open(recipe_path, "rb") as f:
        factory, args = pickle.load(f)
    _STATE["backend"] = factory(*args)
    _STATE["cache"] = ArtifactCache(root, heal)


def _step_zero(kind: str, seed: int, steps: int) -> list[dict]:
    """The evaluator's records at step 0 of (kind, seed): the original model, before any update."""
    from .engine import make_evaluator
    backend = _STATE["backend"]
    model = backend.original(seed)
    try:
        model.eval()
        return make_evaluator(backend, backend.view(kind), steps)(model, 0)
    finally:
        backend.release(model)


def _trajectory(kind: str, method: str, seed: int, start_records: list[dict] | None) -> tuple[str, str, int]:
    """Run and cache one trajectory (the same entry and rows as run_study's sequential loop)."""
    from .engine import trajectory_key, unlearn_trajectory
    backend, cache = _STATE["backend"], _STATE["cache"]
    start = {} if start_records is None else {(kind, seed): start_records}

    def build():
        rows = unlearn_trajectory(backend, kind, method, seed, start=start)
        return {"rows": len(rows), "kind": kind, "method": method, "seed": seed}, None, {
            "rows.csv": rows.to_csv(index=False)}
    cache.get_or_build("trajectory", trajectory_key(backend, kind, method, seed), build)
    return kind, method, seed


def run_trajectories(backend, cache: ArtifactCache, jobs: list[tuple[str, str, int]], workers: int) -> None:
    """Run and cache the (kind, method, seed) ``jobs`` on ``workers`` spawned processes; returns when all are
    cached, raises the first worker error (after cancelling what has not started)."""
    if not jobs:
        return
    groups: dict[tuple[str, int], list[str]] = {}
    for kind, method, seed in jobs:
        groups.setdefault((kind, seed), []).append(method)
    ctx = multiprocessing.get_context("spawn")
    # The recipe (models and data: megabytes) goes through a file: handed to Process.start it would be written
    # into each new worker's pipe, which blocks until that worker has imported torch, so workers would start one
    # after the other instead of together.
    scratch = tempfile.TemporaryDirectory(prefix="forgetlab-pool-")
    recipe_path = os.path.join(scratch.name, "recipe.pkl")
    with open(recipe_path, "wb") as f:
        pickle.dump(backend.worker_recipe(), f, protocol=pickle.HIGHEST_PROTOCOL)
    bar = tqdm(total=len(jobs), desc=f"unlearning ({backend.name}, {workers} workers)", mininterval=1.0)
    with scratch, ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init,
                                      initargs=(recipe_path, str(cache.root), cache.heal)) as pool:
        pending: dict[Future, tuple] = {}
        for (kind, seed), methods in groups.items():
            if len(methods) > 1:     # several methods start from this model: score its step 0 once
                steps = backend.settings(methods[0]).steps
                pending[pool.submit(_step_zero, kind, seed, steps)] = ("start", kind, seed, methods)
            else:
                pending[pool.submit(_trajectory, kind, methods[0], seed, None)] = ("trajectory",)
        with cancel_on_error(pool, bar):
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    what = pending.pop(fut)
                    result = fut.result()
                    if what[0] == "start":
                        _, kind, seed, methods = what
                        for method in methods:
                            pending[pool.submit(_trajectory, kind, method, seed, result)] = ("trajectory",)
                    else:
                        bar.update(1)
