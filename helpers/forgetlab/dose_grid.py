"""Matched memorization (notebook 07), part 1b: the dose grid run as a sweep, one unit per insertion count.

The per-count work of :mod:`forgetlab.dose_response` (fine-tune the original and its twin reference from the base,
then unlearn every kind) is independent across counts, so notebook 07 runs it through the sweep engine
(:mod:`forgetlab.sweep_exec`) instead of a loop in the kernel: the ``dose`` stage, one unit per count, on a local
process pool by default (``inline``: one after another in this process; ``ray``: Ray tasks). No scheduler of its own.

- **Where**: ``<run outputs>/07_dose_sweep/``: ``sweep.yaml`` and ``base.yaml`` (the run's parameters; the same grid
  runs from the command line with ``python -m forgetlab.sweep <folder>/sweep.yaml --outputs <run outputs>``),
  ``units/<unit id>/`` (``dose.csv``: the count's tidy table, ``dose_models.csv``, ``summary.csv``), ``results.csv``.
- **Resumable**: a finished unit is read back, never recomputed; a unit that failed earlier is retried. Unit ids hash
  the parameters, not the code, so each unit also records the ``forgetlab`` modules it had loaded and their version
  (``code.csv``): after a change to one of them the unit is dropped and run again (reading every cache entry whose
  key did not change: models and trajectories are keyed by the code that builds them), never read stale.
- **Shared work once**: data, examples and the base model are built here before any unit starts (the base at this
  process's settings, as notebook 02 builds it); the units read them, and their models and trajectories, from the
  cache (FORGETLAB_CACHE reaches every worker). No cache key reads ``dose_insertions``, so a unit holding one count
  shares every entry with a run holding them all.
- **Same numbers**: every count runs at one torch thread, wherever it runs, and its tables are read back exactly
  (pandas parses the CSV's shortest round-trip floats to the same bits), so
  :func:`run_dose_grid` returns :func:`forgetlab.dose_response.run_dose_study`'s table bit for bit.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import sweep_store as store
from .cache import code_version
from .dose_response import DoseInputError, get_dose_examples, get_dose_models, model_table, run_dose_study
from .forget_sets import StudyData
from .sweep import Sweep, write_sweep
from .tables import read_tidy_csv

GRID_FOLDER = "07_dose_sweep"
EXECUTORS = ("local", "inline", "ray")
PACKAGE_DIR = Path(__file__).resolve().parent


class DoseGridError(RuntimeError):
    """Some units of the dose grid failed or were interrupted; the message is the sweep's report (what to do)."""


@dataclass
class DoseGrid:
    """The dose grid's outcome: the study table (as :func:`run_dose_study` returns it), the model table, the sweep
    and what this run did (units run, units read back, where the results are)."""
    results: pd.DataFrame
    models: pd.DataFrame
    sweep: Sweep
    report: str


def grid_unit_tables(p: dict) -> dict[str, pd.DataFrame]:
    """One unit of the ``dose`` stage (called by :func:`forgetlab.sweep_exec.unit_tables`): the dose study at the
    unit's ``dose_insertions``. ``summary`` (steps_to_unlearn per method x kind, for results.csv), ``dose`` (the
    tidy table with its ``count`` column), ``dose_models`` (:func:`model_table`) and ``code`` (:func:`loaded_code`)."""
    from . import experiment, study
    from .mem_models import get_base_model
    data = experiment.get_study_data(p)
    examples = get_dose_examples(p, data)
    models = get_dose_models(p, data, examples, get_base_model(p, data))
    table = run_dose_study(p, data, examples, models)
    return {"summary": study.steps_to_unlearn(table.drop(columns="count"), p["target_bits"]), "dose": table,
            "dose_models": model_table(models), "code": loaded_code()}


def loaded_code() -> pd.DataFrame:
    """The forgetlab modules loaded in this process (what a unit's tables were computed with) and their version."""
    names = sorted({n.split(".")[1] for n in sys.modules if n.startswith("forgetlab.")} | {"__init__"})
    names = [n for n in names if (PACKAGE_DIR / f"{n}.py").is_file()]
    return pd.DataFrame({"modules": [" ".join(names)], "version": [code_version(*names)]})


def _current(code_csv: Path) -> bool:
    """Whether a unit's recorded code is the code on disk now (a module gone or a file unreadable: not current)."""
    try:
        row = pd.read_csv(code_csv, dtype=str, keep_default_na=False).iloc[0]    # text: a version may be all digits
        return code_version(*row["modules"].split()) == row["version"]
    except (OSError, ValueError, KeyError, IndexError):
        return False


def grid_sweep(p: dict, output_dir: str | Path) -> Sweep:
    """The sweep of notebook 07's grid: the run's parameters, one unit per count of ``dose_insertions`` (ascending),
    in ``<output_dir>/07_dose_sweep/``."""
    counts = sorted(p["dose_insertions"])
    return write_sweep(Path(output_dir) / GRID_FOLDER, p, {"dose_insertions": [[c] for c in counts]}, ("dose",),
                       f"notebook 07's dose-response of run {p['run_name']}: one unit per insertion count")


def drop_stale_units(sweep: Sweep) -> list[str]:
    """Remove the finished units whose recorded code (``code.csv``) is not the code on disk now; return their ids."""
    from .sweep_exec import sweep_lock
    dropped = []
    with sweep_lock(sweep.root):
        for u in sweep.units:
            folder = sweep.units_dir / u.unit_id
            if store.read_done(sweep.units_dir, u.unit_id) is not None and not _current(folder / "code.csv"):
                shutil.rmtree(folder)
                dropped.append(u.unit_id)
    return dropped


def run_dose_grid(p: dict, data: StudyData, output_dir: str | Path, executor: str = "local",
                  workers: int | None = None, address: str | None = None, progress: bool = True) -> DoseGrid:
    """Run notebook 07's grid as a sweep (unfinished units only) and read every count back.

    `executor`: ``local`` (a process pool of `workers`, default one per core), ``inline`` (in this process) or ``ray``
    (a private local Ray instance, or the cluster at `address`). Raises DoseGridError with the sweep's report when a
    unit failed (its error is recorded in the sweep folder; rerunning retries it).
    """
    from .mem_models import get_base_model
    from .sweep_exec import run_sweep
    if executor not in EXECUTORS:
        raise DoseInputError(f"executor = {executor!r} is invalid: use one of {', '.join(EXECUTORS)}")
    if address and executor != "ray":
        raise DoseInputError("address joins a Ray cluster: use executor='ray' with it")
    sweep = grid_sweep(p, output_dir)
    dropped = drop_stale_units(sweep)
    if any(store.read_done(sweep.units_dir, u.unit_id) is None for u in sweep.units):
        get_dose_examples(p, data)              # shared inputs, built once here (cached) before any unit starts
        get_base_model(p, data)
    report = run_sweep(sweep, "ray" if executor == "ray" else "local",
                       workers=1 if executor == "inline" else workers, address=address, retry_failed=True,
                       progress=progress)
    if report.exit_code:
        raise DoseGridError("the dose grid did not finish; rerun to resume (finished units are kept):\n"
                            + report.text())
    units = [sweep.units_dir / u.unit_id for u in sweep.units]
    results = pd.concat([read_tidy_csv((u / "dose.csv").read_text()) for u in units], ignore_index=True)
    models = pd.concat([read_tidy_csv((u / "dose_models.csv").read_text()) for u in units], ignore_index=True)
    note = f"[sweep] {len(dropped)} unit(s) computed by other code were rerun\n" if dropped else ""
    return DoseGrid(results, models, sweep, note + report.text())
