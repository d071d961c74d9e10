"""Extending an unlearning trajectory past its recorded steps ("run more steps"), for any backend.

``StepRunner(backend)(kind, method, n)`` returns the rows of ``n`` more steps of every original seed (the
columns and recording schedule of :func:`forgetlab.engine.run_study`, GenEx included). The first extension
rebuilds the recorded trajectory (same seeds and settings, hence the same weights); after each extension every
seed's unlearner state (trainable weights, optimizer, generators) and the new rows are cached in one entry, so a
rerun of the notebook resumes from the last extended step. Nothing is kept live between calls: each call
restores the state into a model from :meth:`Backend.original`, which lets backends that share one working copy
(SmolLM2) extend any trajectory at any time.
"""
from __future__ import annotations

import numbers
from typing import Callable

import pandas as pd

from .cache import ArtifactCache, cache_key, code_version
from .engine import COLUMNS, ENGINE_CODE, Backend, add_genex, make_evaluator, new_unlearner, reference_lls
from .tables import read_tidy_csv

ProgressFn = Callable[[int, int, str], None]


class StepRunner:
    """Continues (kind, method) trajectories of a backend's study beyond the recorded steps, from cached state."""

    def __init__(self, backend: Backend, cache: ArtifactCache | None = None):
        self.backend = backend
        self.cache = cache or ArtifactCache()
        self._rows: dict[tuple[str, str], pd.DataFrame] = {}
        self._ref_ll: dict[str, object] = {}

    def key(self, kind: str, method: str) -> str:
        b = self.backend
        return cache_key("trajectory-extension", code_version(*ENGINE_CODE, "trajectories"),
                         [b.key(s) for s in b.original_seeds], kind, method, b.settings(method).__dict__)

    def _check(self, kind: str, method: str) -> None:
        self.backend.view(kind)
        if method not in self.backend.methods:
            raise ValueError(f"method {method!r} is not in this run (methods = {list(self.backend.methods)})")

    def _entry(self, kind: str, method: str):
        key = self.key(kind, method)
        return self.cache.load("trajectory-extension", key) if self.cache.has("trajectory-extension", key) else None

    def cached_rows(self) -> pd.DataFrame:
        """Rows of every earlier extension of this run found in the cache (empty if none)."""
        frames = [rows for kind in self.backend.kinds for method in self.backend.methods
                  if (rows := self._load_rows(kind, method)) is not None]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))

    def _load_rows(self, kind: str, method: str) -> pd.DataFrame | None:
        if (kind, method) not in self._rows:
            entry = self._entry(kind, method)
            if entry is None:
                return None
            self._rows[(kind, method)] = read_tidy_csv(entry[2]["rows.csv"])
        return self._rows[(kind, method)]

    def end_step(self, kind: str, method: str) -> int:
        """The last step of the (kind, method) trajectory as far as it has been run (cached or recorded)."""
        rows = self._load_rows(kind, method)
        return int(rows.step.max()) if rows is not None and len(rows) else int(self.backend.settings(method).steps)

    def __call__(self, kind: str, method: str, n: int, progress: ProgressFn | None = None) -> pd.DataFrame:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n = {n!r} must be a whole number of steps >= 1")
        self._check(kind, method)
        progress = progress or (lambda done, total, what="": None)
        b = self.backend
        view = b.view(kind)
        if kind not in self._ref_ll:
            self._ref_ll[kind] = reference_lls(b, [kind])[kind]
        entry = self._entry(kind, method)
        recorded = b.settings(method).steps
        start = entry[0]["step"] if entry else recorded
        final = start + int(n)
        every = b.settings(method).record_every
        evaluate = make_evaluator(b, view, final, utility_every=b.settings(method).utility_every)
        seeds = b.original_seeds
        total, done = int(n) * len(seeds), 0
        frames, tensors = [], {}
        for seed in seeds:
            model = b.original(seed)
            try:
                u = new_unlearner(b, view, method, model)
                if entry:
                    prefix = f"seed{seed}."
                    u.load_state_tensors({k[len(prefix):]: v for k, v in entry[1].items() if k.startswith(prefix)})
                else:
                    progress(done, total, f"seed {seed}: rebuilding the recorded {recorded} steps once")
                    u.run(recorded, lambda model, step: [])   # weights only: nothing to score
                records = []
                # stop at the same steps as one long run would record (multiples of record_every, and the last)
                while u.step < final:
                    stop = min(final, (u.step // every + 1) * every)
                    taken = stop - u.step
                    records += u.run(taken, evaluate)
                    done += taken
                    progress(done, total, f"seed {seed}: step {u.step} of {final}")
                frames.append(pd.DataFrame(records).assign(seed=seed))
                tensors.update({f"seed{seed}.{k}": v for k, v in u.state_tensors().items()})
                del u
            finally:
                b.release(model)
        table = pd.concat(frames, ignore_index=True).assign(kind=kind, method=method)
        table = add_genex(table, view.targets, self._ref_ll[kind])[list(COLUMNS)]
        old = self._load_rows(kind, method)
        rows = table if old is None or old.empty else pd.concat([old, table], ignore_index=True)
        self.cache.save("trajectory-extension", self.key(kind, method),
                        {"kind": kind, "method": method, "step": final, "seeds": seeds},
                        tensors=tensors, files={"rows.csv": rows.to_csv(index=False)})
        self._rows[(kind, method)] = rows
        return table
