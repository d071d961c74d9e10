"""Parameter sweeps: `python -m forgetlab.sweep SWEEP.yaml [--executor local|ray] [--workers N]`.

A sweep file names a base profile and the points to run: a ``grid`` (lists crossed) and/or explicit
``points``, plus ``overrides`` applied to every point and the ``stages`` each unit runs: one table stage
(``study``: the main study; ``dose``: notebook 07's dose-response at the unit's ``dose_insertions``), and optionally
``notebooks`` through the batch; :func:`write_sweep` defines a sweep from code (notebook 07's grid). Every point is
validated before anything runs; all bad points are reported together (exit code 2). Each unit gets a stable id, a
readable slug plus a short hash of its full parameters, and its results land atomically in
``outputs/<name>/units/<unit_id>/``: a restart skips finished units, a failed unit is recorded and the others go on.
After every run ``outputs/<name>/results.csv`` is rebuilt from the unit folders. Execution lives in
:mod:`forgetlab.sweep_exec`, reading and plotting in :mod:`forgetlab.sweep_report`.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import ParameterError, resolve_profile, resolve_yaml, validate_params

REPO_ROOT = Path(__file__).resolve().parents[2]
SWEEP_DIR = REPO_ROOT / "papermill_params" / "sweeps"
SWEEP_KEYS = ("name", "description", "base", "grid", "points", "overrides", "stages", "notebooks")
STAGES = ("study", "dose", "notebooks")
TABLE_STAGES = ("study", "dose")    # what a unit computes; exactly one per sweep (see sweep_exec.unit_tables)
SEED_PARAMS = ("seed", "original_seeds", "reference_seeds")   # replicates: intervals are taken across them


class SweepError(ParameterError):
    """A sweep file or one of its points is invalid; the message lists every problem and its fix."""


@dataclass(frozen=True)
class Unit:
    """One point of a sweep: its position, stable id, the values it sets, and its full validated parameters."""
    index: int
    unit_id: str
    swept: dict[str, Any]
    params: dict[str, Any]


@dataclass
class Sweep:
    """A validated sweep file: every unit with its parameters, and where its outputs go."""
    name: str
    path: Path
    base: Path
    stages: tuple[str, ...]
    notebooks: tuple[str, ...]
    swept_keys: list[str]
    units: list[Unit]
    root: Path
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def units_dir(self) -> Path:
        return self.root / "units"

    @property
    def failed_dir(self) -> Path:
        return self.root / "failed"

    @property
    def results_path(self) -> Path:
        return self.root / "results.csv"


def resolve_sweep(sweep: str | Path) -> Path:
    """A sweep name in papermill_params/sweeps/ (e.g. 'smoke') or a path to a sweep YAML file."""
    return resolve_yaml(sweep, SWEEP_DIR, "sweep", SweepError)


def _short(value: Any) -> str:
    """A value as it appears in a unit slug: 0.0001 -> 1e-04, [0, 1] -> 0+1."""
    if isinstance(value, list):
        return "+".join(_short(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-").replace("e+0", "e")
    return str(value)


def unit_id(swept: Mapping[str, Any], params: Mapping[str, Any], stages: tuple[str, ...],
            notebooks: tuple[str, ...]) -> str:
    """`<slug>-<hash>`: the slug names the swept values (readable), the hash covers every parameter and stage
    (stable: the same point gets the same id in any sweep file, in any order)."""
    slug = "_".join(f"{k}-{_short(v)}" for k, v in swept.items()) or "base"
    slug = re.sub(r"[^A-Za-z0-9.+_-]", "", slug)[:60]
    blob = json.dumps([dict(params), list(stages), list(notebooks)], sort_keys=True, separators=(",", ":"))
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _read_yaml(path: Path, what: str) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{what} {path} must hold a mapping (name, base, grid/points, stages, ...)")
    return raw


def _base_path(base: str, sweep_path: Path) -> Path:
    """The base profile: a name (smoke, default, full), a path, or a path relative to the sweep file."""
    beside = sweep_path.parent / base
    return resolve_profile(beside if not Path(base).is_absolute() and beside.is_file() else base)


def _check_keys(keys, known, where: str, problems: list[str]) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{where}: unknown parameter {key!r}{hint}: remove it or fix its name")


def _structure(raw: dict, path: Path) -> tuple[list[str], dict]:
    """Check the sweep file's own fields; return the problems and the base profile's raw parameters."""
    problems: list[str] = []
    for key in raw:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1, cutoff=0.6)
            problems.append(f"unknown sweep field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f": the fields are {', '.join(SWEEP_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        problems.append(f"name = {name!r} is invalid: give the sweep a name of letters, digits, '.', '-' and '_' "
                        "(it names the folder outputs/<name>/)")
    base_raw: dict = {}
    if not isinstance(raw.get("base"), str):
        problems.append("base is missing: name a profile (smoke, default, full) or a parameter YAML path")
    else:
        try:
            base_raw = _read_yaml(_base_path(raw["base"], path), "base profile")
        except ParameterError as exc:
            problems.append(f"base: {exc}")
    grid, points = raw.get("grid"), raw.get("points")
    if grid is None and points is None:
        problems.append("the sweep has no points: add a grid (parameter -> list of values) and/or points "
                        "(a list of parameter -> value mappings)")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            problems.append("grid must be a non-empty mapping of parameter -> list of values")
        else:
            for key, values in grid.items():
                if not isinstance(values, list) or not values:
                    problems.append(f"grid.{key} must be a non-empty list of values, e.g. {key}: [a, b]")
            if base_raw:
                _check_keys(grid, base_raw, "grid", problems)
    if points is not None:
        if not isinstance(points, list) or not points or not all(isinstance(p, dict) and p for p in points):
            problems.append("points must be a non-empty list of non-empty mappings parameter -> value")
        elif base_raw:
            for i, point in enumerate(points):
                _check_keys(point, base_raw, f"points[{i}]", problems)
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict):
        problems.append("overrides must be a mapping parameter -> value applied to every point")
    elif base_raw:
        _check_keys(overrides, base_raw, "overrides", problems)
    stages = raw.get("stages", ["study"])
    if not isinstance(stages, list) or not set(stages) <= set(STAGES) or len(set(stages)) != len(stages) \
            or len(set(stages) & set(TABLE_STAGES)) != 1:
        problems.append(f"stages = {stages!r} is invalid: use [study] or [study, notebooks] (or [dose]: notebook "
                        "07's dose-response per point)")
    nbs = raw.get("notebooks")
    if nbs is not None and (not isinstance(nbs, list) or not all(isinstance(n, str) for n in nbs)):
        problems.append("notebooks must be a list of notebook name prefixes, e.g. [\"03\", \"04\"]")
    elif nbs is not None and isinstance(stages, list) and "notebooks" not in stages:
        problems.append("notebooks is set but stages has no notebooks stage: add it ([study, notebooks]) or "
                        "remove notebooks")
    return problems, base_raw


def _expand(raw: dict) -> list[dict]:
    """The sweep's points in order: the grid crossed (first key varies slowest), then the explicit points."""
    out: list[dict] = []
    grid = raw.get("grid") or {}
    if grid:
        keys = list(grid)
        out += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    out += [dict(p) for p in raw.get("points") or []]
    return out


def load_sweep(sweep: str | Path, outputs_root: str | Path | None = None,
               extra_overrides: Mapping[str, Any] | None = None) -> Sweep:
    """Read and validate a sweep file; every problem (file fields, then every bad point) is reported at once.

    `extra_overrides` apply to every point after the file's own overrides (notebook 08's `overrides`).
    Raises SweepError (a ParameterError) naming each bad point by index and values.
    """
    path = resolve_sweep(sweep)
    raw = _read_yaml(path, "sweep file")
    problems, base_raw = _structure(raw, path)
    if extra_overrides:
        _check_keys(extra_overrides, base_raw or extra_overrides, "overrides (from the caller)", problems)
    if problems:
        raise SweepError(f"{len(problems)} problem(s) in sweep file {path}:\n  - " + "\n  - ".join(problems))
    overrides = {**raw.get("overrides", {}), **(extra_overrides or {})}
    stages = tuple(raw.get("stages", ["study"]))
    notebooks = tuple(raw.get("notebooks") or ()) if "notebooks" in stages else ()
    points = _expand(raw)
    swept_keys = list(dict.fromkeys(k for p in points for k in p))
    units: list[Unit] = []
    seen: dict[str, int] = {}
    for i, point in enumerate(points):
        values = json.dumps(point, default=str)
        try:
            params = validate_params({**base_raw, **overrides, **point}, f"point {i} {values}")
        except ParameterError as exc:
            problems.append(str(exc).replace("\n  - ", "\n      - "))
            continue
        if "dose" in stages and len(params["dose_insertions"]) != 1:
            problems.append(f"point {i} {values} has dose_insertions = {params['dose_insertions']}: the dose stage "
                            "runs one insertion count per unit; sweep it over single counts, e.g. dose_insertions: "
                            "[[1], [5]]")
            continue
        uid = unit_id(point, params, stages, notebooks)
        if uid in seen:
            problems.append(f"point {i} {values} repeats point {seen[uid]}: the two have identical parameters; "
                            "remove one")
            continue
        seen[uid] = i
        units.append(Unit(i, uid, point, params))
    if problems:
        raise SweepError(f"{len(problems)} bad point(s) of {len(points)} in sweep file {path}, nothing was run:\n"
                         "  - " + "\n  - ".join(problems))
    root = Path(outputs_root or REPO_ROOT / "outputs").resolve() / raw["name"]
    return Sweep(raw["name"], path.resolve(), _base_path(raw["base"], path), stages, notebooks, swept_keys, units, root,
                 str(raw.get("description", "")), overrides)


def table_stage(stages: tuple[str, ...] | list[str]) -> str:
    """The stage whose tables a unit computes: ``study`` or ``dose``."""
    return next(s for s in stages if s in TABLE_STAGES)


def write_sweep(folder: str | Path, base: Mapping[str, Any], grid: Mapping[str, list],
                stages: tuple[str, ...] = ("study",), description: str = "") -> Sweep:
    """A sweep defined in code: writes ``folder/base.yaml`` (the parameters) and ``folder/sweep.yaml`` (named after
    the folder), then loads them like any sweep file, so every point is validated and its results land in `folder`.

    The files stay so the same sweep can be rerun from the command line (e.g. on Ray):
    ``python -m forgetlab.sweep <folder>/sweep.yaml --outputs <folder's parent> --executor ray``.
    Files are rewritten only when their text changes (atomically).
    """
    folder = Path(folder).resolve()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", folder.name):
        raise SweepError(f"folder name {folder.name!r} is not a valid sweep name: use letters, digits, '.', '-', '_'")
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": folder.name, "description": description, "base": "base.yaml", "stages": list(stages),
            "grid": {k: list(v) for k, v in grid.items()}}
    for name, value in (("base.yaml", dict(base)), ("sweep.yaml", spec)):
        text = yaml.safe_dump(value, sort_keys=False)
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return load_sweep(folder / "sweep.yaml", folder.parent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forgetlab.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a sweep YAML file, or a name in papermill_params/sweeps/")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: a process pool on this machine (default); ray: Ray tasks, one CPU each")
    ap.add_argument("--workers", type=int, default=None,
                    help="units at once (default: the CPU count; local with 1 runs in this process)")
    ap.add_argument("--address", help="ray: join the Ray cluster at this address (e.g. 10.0.0.5:6379 or auto); "
                                      "default: start a private local Ray instance")
    ap.add_argument("--retry-failed", action="store_true", help="rerun units that failed in an earlier run")
    ap.add_argument("--outputs", help="folder that holds <sweep name>/ (default: outputs/ in the repository)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    from .sweep_exec import SweepRunError, run_sweep
    try:
        sweep = load_sweep(args.sweep, args.outputs)
    except ParameterError as exc:
        print(f"[sweep] bad sweep, nothing was run:\n{exc}", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("[sweep] --workers must be at least 1", file=sys.stderr)
        return 2
    if args.address and args.executor != "ray":
        print("[sweep] --address joins a Ray cluster: add --executor ray", file=sys.stderr)
        return 2
    try:
        report = run_sweep(sweep, executor=args.executor, workers=args.workers, address=args.address,
                           retry_failed=args.retry_failed, progress=not args.no_progress)
    except SweepRunError as exc:
        print(f"[sweep] {exc}", file=sys.stderr)
        return 3
    print(report.text(), flush=True)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
