"""Running a sweep's units: one function per unit, on a process pool or on Ray, with one progress bar.

Executors are existing engines, never a home-made scheduler: ``local`` is a
``concurrent.futures.ProcessPoolExecutor`` (spawn; one torch thread per worker; ``workers=1`` runs in this
process), ``ray`` submits ``ray.remote`` tasks that declare one CPU each, so Ray packs them on a local instance
or across a cluster (``address``). At most ``workers`` units are in flight, so the bar's "running" is exact.
Every unit runs with one torch thread whatever the executor, so all executors give the same numbers.
A unit writes its own folder (see :mod:`forgetlab.sweep_store`); a unit that raises is recorded and the others
go on; a worker that dies leaves its unit unfinished, to be rerun by the next run.
"""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from . import sweep_store as store
from .sweep import REPO_ROOT, Sweep, table_stage
from . import sweep_report
from .sweep_report import SweepReport

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WORKER_ENV = {**THREAD_ENV, "TQDM_DISABLE": "1"}   # worker processes: the sweep's own bar is the only one
CRASH_ENV = "FORGETLAB_SWEEP_TEST_CRASH"   # test only: a unit whose id starts with this SIGKILLs its own worker
RAY_RETRIES = 1                            # Ray reruns a task once when its worker or node dies
RAY_START_ATTEMPTS = 3


class SweepRunError(RuntimeError):
    """The sweep could not run (Ray did not start, another driver holds the folder); the message says what to do."""


def unit_tables(p: dict, stage: str = "study") -> dict[str, Any]:
    """The one place a sweep calls the study: the tables a unit keeps, by file stem (CSV each).

    Every stage keeps ``summary`` (steps_to_unlearn, one row per method x kind: what results.csv collects).
    ``study``: the main study of the unit's parameters. ``dose``: notebook 07's dose-response at the unit's
    ``dose_insertions`` (see :func:`forgetlab.dose_grid.grid_unit_tables`), also keeping the full ``dose`` table,
    ``dose_models`` and the ``code`` it ran. Data, models and unlearning trajectories come from the shared cache
    (FORGETLAB_CACHE), so units that need the same ones build them once.
    """
    if stage == "dose":
        from .dose_grid import grid_unit_tables
        return grid_unit_tables(p)
    if stage != "study":
        raise ValueError(f"unknown table stage {stage!r}: use study or dose")
    from . import engine, experiment, study
    from .backend_tiny import TinyGPT2
    data = experiment.get_study_data(p)
    models = experiment.get_models(p, data)
    table = engine.run_study(TinyGPT2(p, data, models))
    return {"summary": study.steps_to_unlearn(table, p["target_bits"])}


def notebook_prefixes(selection: tuple[str, ...] | list[str]) -> list[str]:
    """Notebook prefixes a unit's notebooks stage runs: `selection`, or every numbered notebook but 08 (sweeps)."""
    if selection:
        return list(selection)
    names = sorted(p.name for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    return [n[:2] for n in names if not n.startswith("08")]


def _set_threads() -> None:
    """One torch thread and deterministic kernels: a unit's numbers do not depend on where it ran."""
    import torch

    from . import determinism
    torch.set_num_threads(1)
    determinism()


def run_unit(job: dict) -> dict:
    """Run one unit in this process and write its folder; never raises for a failure of the unit itself.

    `job` is plain data (so it travels to any worker): unit_id, index, swept, params, stages, notebooks,
    units_dir, failed_dir, cache_dir, crash. Returns {"unit_id", "status": "done" | "failed", "seconds", ...}.
    """
    with _env({**THREAD_ENV, "FORGETLAB_CACHE": job["cache_dir"]}):
        _set_threads()
        return _run_unit(job)


def _run_unit(job: dict) -> dict:
    units_dir, failed_dir, uid = Path(job["units_dir"]), Path(job["failed_dir"]), job["unit_id"]
    start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = store.new_unit_dir(units_dir, uid)
    try:
        timings: dict[str, float] = {}
        (tmp / "params.yaml").write_text(yaml.safe_dump(job["params"], sort_keys=False))
        t0, stage = time.perf_counter(), table_stage(job["stages"])
        for name, df in unit_tables(job["params"], stage).items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        timings[stage] = round(time.perf_counter() - t0, 3)
        if job.get("crash") and uid.startswith(job["crash"]):
            os.kill(os.getpid(), signal.SIGKILL)     # test only: die mid-unit, files half-written in tmp
        if "notebooks" in job["stages"]:
            t0 = time.perf_counter()
            _run_notebooks(tmp, job)
            timings["notebooks"] = round(time.perf_counter() - t0, 3)
        timings["total"] = round(time.perf_counter() - start, 3)
        record = {"index": job["index"], "swept": job["swept"], "parameters": job["params"],
                  "stages": job["stages"], "timings": timings, "started": started,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid()}
        store.commit_unit(tmp, units_dir, uid, record)
        store.clear_failure(failed_dir, uid)
        return {"unit_id": uid, "status": "done", "seconds": timings["total"]}
    except Exception as exc:  # noqa: BLE001  a unit's own failure is recorded, the sweep goes on
        seconds = time.perf_counter() - start
        path = store.record_failure(failed_dir, uid, job["index"], job["swept"], job["params"], exc, seconds)
        return {"unit_id": uid, "status": "failed", "seconds": round(seconds, 3),
                "error": f"{type(exc).__name__}: {exc}", "record": str(path)}
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _run_notebooks(tmp: Path, job: dict) -> None:
    """The notebooks stage: the batch CLI on the unit's full parameter file, into <unit>/notebooks/."""
    cmd = [sys.executable, "-m", "forgetlab.batch", str(tmp / "params.yaml"), "--output-dir", str(tmp / "notebooks"),
           "--only", *notebook_prefixes(job["notebooks"])]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}   # the notebooks show their own bars
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    (tmp / "notebooks").mkdir(exist_ok=True)
    (tmp / "notebooks" / "batch.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the notebooks stage failed (exit {proc.returncode}): "
                           f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-2000:]}")


def _init_worker() -> None:
    """Process-pool initializer: one thread for every math library (the env is set before torch loads)."""
    os.environ.update(WORKER_ENV)
    _set_threads()


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for processes started inside the block (pool workers, Ray's raylet)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Progress:
    """One tqdm bar over units, postfix done / running / failed; tqdm adds elapsed time and ETA."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="unit", disable=not enabled, dynamic_ncols=True,
                        mininterval=0.5, smoothing=0.0)
        self.done = self.failed = self.running = 0
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix({"done": self.done, "running": self.running, "failed": self.failed}, refresh=True)

    def started(self) -> None:
        self.running += 1
        self._show()

    def finished(self, status: str) -> None:
        self.running -= 1
        self.done += status == "done"
        self.failed += status != "done"
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()


def _window(jobs: list[dict], width: int, submit: Callable[[dict], Any], wait_any: Callable[[list], tuple[list, list]],
            result: Callable[[Any], dict], crashed: type[BaseException] | tuple, bar: Progress,
            stop_on_crash: bool) -> dict[str, dict]:
    """Keep at most `width` units in flight on an engine; collect each unit's outcome by id."""
    queue, inflight, out = list(jobs), {}, {}
    broken = False
    while (queue and not broken) or inflight:
        while queue and not broken and len(inflight) < width:
            job = queue.pop(0)
            inflight[submit(job)] = job
            bar.started()
        finished, _ = wait_any(list(inflight))
        for handle in finished:
            job = inflight.pop(handle)
            try:
                outcome = result(handle)
            except crashed as exc:
                outcome = {"unit_id": job["unit_id"], "status": "interrupted",
                           "error": f"the worker died mid-unit ({type(exc).__name__}: {exc})"}
                broken = broken or stop_on_crash
            out[job["unit_id"]] = outcome
            bar.finished(outcome["status"])
    for job in queue:
        out[job["unit_id"]] = {"unit_id": job["unit_id"], "status": "interrupted",
                               "error": "not started: a worker died and the process pool stopped"}
    return out


def run_inline(jobs: list[dict], bar: Progress) -> dict[str, dict]:
    """workers=1: each unit in this process, one after another (torch threads restored afterwards)."""
    import torch
    threads = torch.get_num_threads()
    out = {}
    try:
        for job in jobs:
            bar.started()
            out[job["unit_id"]] = run_unit(job)
            bar.finished(out[job["unit_id"]]["status"])
    finally:
        torch.set_num_threads(threads)
    return out


def run_pool(jobs: list[dict], workers: int, bar: Progress) -> dict[str, dict]:
    """A spawn-context process pool of `workers` single-threaded workers. A killed worker breaks the pool
    (Python's design): its unit and the others in flight are reported unfinished and rerun next time."""
    from concurrent.futures.process import BrokenProcessPool
    with _env(WORKER_ENV), cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_init_worker) as pool:
        def wait_any(handles: list) -> tuple[list, list]:
            done, pending = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
            return list(done), list(pending)
        return _window(jobs, workers, lambda j: pool.submit(run_unit, j), wait_any, lambda f: f.result(),
                       BrokenProcessPool, bar, stop_on_crash=True)


def run_ray(jobs: list[dict], workers: int | None, address: str | None, bar: Progress) -> dict[str, dict]:
    """Ray tasks declaring num_cpus=1 each: a private local instance (num_cpus=workers), or the cluster at
    `address`. No dashboard, no usage statistics, worker logs kept out of the terminal."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.exceptions import RayError

    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                                      configure_logging=True)
        if not address:
            kwargs.update(num_cpus=workers or os.cpu_count() or 1, object_store_memory=128 * 1024 ** 2)
        with _env(WORKER_ENV):
            _ray_init(ray, address, kwargs)
    try:
        width = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(run_unit)

        def wait_any(handles: list) -> tuple[list, list]:
            return ray.wait(handles, num_returns=1)
        return _window(jobs, width, remote.remote, wait_any, ray.get, RayError, bar, stop_on_crash=False)
    finally:
        if started_here:
            ray.shutdown()


def _ray_init(ray: Any, address: str | None, kwargs: dict, attempts: int = RAY_START_ATTEMPTS) -> None:
    """ray.init, retried when a local instance fails to start: Ray 2.60's raylet gives its agents a fixed 15 s
    to start, which a busy machine can exceed (the next attempt finds Python's files in the page cache)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except Exception as exc:  # noqa: BLE001  Ray raises a bare Exception for a startup timeout
            ray.shutdown()
            if address or "timed out during startup" not in str(exc) or attempt == attempts:
                raise SweepRunError(f"Ray did not start ({exc}); on a busy machine retry later, or use the local "
                                   "executor (--executor local)") from exc


@contextmanager
def sweep_lock(root: Path) -> Iterator[None]:
    """One driver per sweep folder at a time (an OS lock, released even if the driver is killed)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".sweep.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepRunError(f"another sweep driver is running on {root}: wait for it, or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_sweep(sweep: Sweep, executor: str = "local", workers: int | None = None, address: str | None = None,
              retry_failed: bool = False, progress: bool = True) -> SweepReport:
    """Run every unit not yet finished (and failed ones with `retry_failed`), then rebuild results.csv."""
    from .cache import default_cache_dir

    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', not {executor!r}")
    start = time.perf_counter()
    outcomes: dict[str, dict] = {}
    by_user = False
    with sweep_lock(sweep.root):
        store.clean_temp(sweep.units_dir)
        store.write_json_atomic(sweep.root / "manifest.json", sweep_report.manifest(sweep))
        todo = []
        for u in sweep.units:
            if store.read_done(sweep.units_dir, u.unit_id) is not None:
                outcomes[u.unit_id] = {"unit_id": u.unit_id, "status": "skipped-done"}
            elif store.read_failure(sweep.failed_dir, u.unit_id) is not None and not retry_failed:
                outcomes[u.unit_id] = {"unit_id": u.unit_id, "status": "skipped-failed"}
            else:
                todo.append(u)
        cache = str(default_cache_dir().resolve())
        jobs = [{"unit_id": u.unit_id, "index": u.index, "swept": u.swept, "params": u.params,
                 "stages": list(sweep.stages), "notebooks": list(sweep.notebooks), "units_dir": str(sweep.units_dir),
                 "failed_dir": str(sweep.failed_dir), "cache_dir": cache, "crash": os.environ.get(CRASH_ENV, "")}
                for u in todo]
        bar = Progress(len(jobs), progress and bool(jobs), f"sweep {sweep.name}")
        width = workers or os.cpu_count() or 1
        try:
            if jobs and executor == "ray":
                outcomes.update(run_ray(jobs, workers, address, bar))
            elif jobs and width == 1:
                outcomes.update(run_inline(jobs, bar))
            elif jobs:
                outcomes.update(run_pool(jobs, min(width, len(jobs)), bar))
        except KeyboardInterrupt:
            by_user = True
        finally:
            bar.close()
            for j in jobs:   # units without an outcome (Ctrl-C) or whose worker died: the disk has the last word
                uid = j["unit_id"]
                if outcomes.get(uid, {}).get("status", "interrupted") == "interrupted":
                    done = store.read_done(sweep.units_dir, uid) is not None
                    outcomes[uid] = ({"unit_id": uid, "status": "done"} if done else
                                     outcomes.get(uid, {"unit_id": uid, "status": "interrupted",
                                                        "error": "stopped by the user"}))
            table = sweep_report.collect_results(sweep)
    failures = {uid: store.read_failure(sweep.failed_dir, uid) or {} for uid, o in outcomes.items()
                if o["status"] in ("failed", "skipped-failed")}
    return SweepReport(sweep, outcomes, time.perf_counter() - start, len(table), by_user, failures)
