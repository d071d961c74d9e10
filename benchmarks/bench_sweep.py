"""Sweep executors on one machine, and what Ray adds to a fresh setup.

    .venv/bin/python benchmarks/bench_sweep.py [--skip-install] [--workers 2]

1. The same 8-unit sweep (the smoke sweep's tiny models: 2 unlearning rates x 4 original seeds; 8 steps of GA and
   of NPO on the ID and canary forget sets, each step recorded) three ways: sequential (workers=1, in this
   process), the local process pool with `--workers` workers, and Ray (a private local instance with `--workers`
   CPUs). Study data and models are built once beforehand into a scratch cache; each run gets a copy of it
   without the unlearning trajectories, so every run does the same unlearning work. Wall time, units per second
   and the speed-up are printed as a table. Every unit uses one torch thread whatever the executor (so the three
   runs give identical tables, which is checked). A worker process pays Python's imports first (torch,
   transformers: about 9 CPU seconds on these machines), which the sequential run has already paid; the
   benchmark prints that cost too.
2. Ray's footprint: the bytes its installed files take in .venv (from each package's RECORD), plus the
   packages installed only because of Ray; and the time and size of `pip install --no-cache-dir ray==<pin>`
   into a scratch venv (what a fresh machine pays; needs the package registry).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import load_average  # noqa: E402


def bench_sweep_file(folder: Path) -> Path:
    smoke = yaml.safe_load((REPO / "papermill_params" / "sweeps" / "smoke.yaml").read_text())
    spec = {"name": "bench-sweep", "base": "smoke", "stages": ["study"],
            "overrides": dict(smoke["overrides"], unlearn_steps=8, methods=["ga", "npo"]),
            "grid": {"unlearn_lr": [0.0001, 0.0003], "original_seeds": [[0], [3], [4], [5]]}}
    path = folder / "bench-sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def warm_cache(sweep, root: Path) -> float:
    """Data and every model of the sweep, built once with one torch thread (like the workers)."""
    import torch

    from forgetlab.cache import ArtifactCache
    from forgetlab.experiment import get_models, get_study_data
    t = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for u in sweep.units:
        get_models(u.params, get_study_data(u.params, ArtifactCache(root)), ArtifactCache(root))
    torch.set_num_threads(threads)
    return time.perf_counter() - t


def timed_run(path: Path, warm: Path, scratch: Path, label: str, executor: str, workers: int):
    from forgetlab import sweep_report
    from forgetlab.sweep import load_sweep
    from forgetlab.sweep_exec import run_sweep
    cache = scratch / f"cache-{label}"
    for kind in ("data", "models"):
        shutil.copytree(warm / kind, cache / kind)
    os.environ["FORGETLAB_CACHE"] = str(cache)
    sweep = load_sweep(path, scratch / f"out-{label}")
    print(f"  {label}: {executor}, {workers} worker(s) ... [{load_average()}]", flush=True)
    t = time.perf_counter()
    report = run_sweep(sweep, executor, workers=workers, progress=False)
    wall = time.perf_counter() - t
    if report.exit_code != 0:
        raise SystemExit(report.text())
    unit_s = [json.loads((sweep.units_dir / u.unit_id / "done.json").read_text())["timings"]["total"]
              for u in sweep.units]
    return wall, sum(unit_s), sweep_report.read_results(sweep.results_path)


def import_seconds() -> float:
    """Wall time of a fresh Python that imports what a unit needs (each pool or Ray worker pays it once)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, forgetlab.engine, forgetlab.backend_tiny, "
                    "forgetlab.experiment"], check=True)
    return time.perf_counter() - t


def sweep_section(workers: int) -> list[dict]:
    import pandas as pd

    from forgetlab.sweep import load_sweep
    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        path = bench_sweep_file(scratch)
        sweep = load_sweep(path, scratch / "out")
        warm = scratch / "warm"
        print(f"8-unit sweep {sweep.swept_keys}; warming the cache (data + "
              f"{len({s for u in sweep.units for s in u.params['original_seeds']}) + 1} models) ...", flush=True)
        print(f"  warm-up {warm_cache(sweep, warm):.1f} s", flush=True)
        rows, tables = [], []
        for label, executor, n in [("sequential", "local", 1), ("local", "local", workers), ("ray", "ray", workers)]:
            wall, unit_total, table = timed_run(path, warm, scratch, label, executor, n)
            rows.append({"run": label, "executor": executor, "workers": n, "wall": wall, "unit_total": unit_total})
            tables.append(table)
        for t in tables[1:]:
            pd.testing.assert_frame_equal(t, tables[0])
        print("  the three results tables are identical")
        return rows
    finally:
        os.environ.pop("FORGETLAB_CACHE", None)
        shutil.rmtree(scratch, ignore_errors=True)


def _dist_bytes(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total


def _req_names(dist: md.Distribution) -> set[str]:
    out = set()
    for r in dist.requires or []:
        if "extra ==" in r:
            continue
        out.add(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-"))
    return out


def ray_footprint() -> dict:
    """Ray's bytes in this venv, and its dependencies that nothing else installed needs."""
    dists = {d.metadata["Name"].lower().replace("_", "-"): d for d in md.distributions()}
    needed_by: dict[str, set[str]] = {}
    for name, d in dists.items():
        for req in _req_names(d):
            needed_by.setdefault(req, set()).add(name)
    only_ray = sorted(r for r in _req_names(dists["ray"]) if r in dists and needed_by.get(r, set()) <= {"ray"})
    return {"ray_version": dists["ray"].version, "ray_bytes": _dist_bytes(dists["ray"]),
            "only_ray": {n: (dists[n].version, _dist_bytes(dists[n])) for n in only_ray}}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def scratch_install(version: str) -> dict:
    """Time `pip install --no-cache-dir ray==version` into a fresh venv; the size it adds to site-packages."""
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-venv-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        py = folder / "bin" / "python"
        site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        before = _du(site)
        t = time.perf_counter()
        proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-cache-dir", f"ray=={version}"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            return {"error": (proc.stdout + proc.stderr)[-400:]}
        listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                                text=True).stdout
        return {"seconds": seconds, "bytes": _du(site) - before,
                "packages": [ln for ln in listed.split() if not ln.startswith(("pip==", "setuptools=="))]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="workers of the local pool and CPUs of Ray (default 2)")
    ap.add_argument("--skip-install", action="store_true", help="skip the scratch-venv install of Ray")
    ap.add_argument("--skip-sweep", action="store_true", help="only Ray's footprint")
    args = ap.parse_args(argv)
    print(f"sweep benchmark on {os.cpu_count()} cores [{load_average()}]", flush=True)
    if not args.skip_sweep:
        rows = sweep_section(args.workers)
        base = rows[0]["wall"]
        print(f"\n{'run':12s} {'executor':9s} {'workers':>7s} {'wall':>9s} {'units/s':>8s} {'vs sequential':>14s} "
              f"{'sum of unit times':>18s}")
        for r in rows:
            print(f"{r['run']:12s} {r['executor']:9s} {r['workers']:>7d} {r['wall']:>8.1f}s {8 / r['wall']:>8.3f} "
                  f"{base / r['wall']:>13.2f}x {r['unit_total']:>17.1f}s")
        print(f"a worker's imports (fresh Python): {import_seconds():.1f} s  [{load_average()}]")
    fp = ray_footprint()
    extra = sum(b for _, b in fp["only_ray"].values())
    print(f"\nRay {fp['ray_version']} in .venv: {fp['ray_bytes'] / 2 ** 20:.0f} MiB; installed only for Ray: "
          + (", ".join(f"{n}=={v} {b / 2 ** 20:.1f} MiB" for n, (v, b) in fp["only_ray"].items()) or "nothing")
          + f"; total {(fp['ray_bytes'] + extra) / 2 ** 20:.0f} MiB")
    if not args.skip_install:
        res = scratch_install(fp["ray_version"])
        if "error" in res:
            print(f"scratch install failed (no registry?): {res['error']}")
        else:
            print(f"pip install --no-cache-dir ray=={fp['ray_version']} into an empty venv: {res['seconds']:.1f} s, "
                  f"{res['bytes'] / 2 ** 20:.0f} MiB in site-packages, {len(res['packages'])} packages: "
                  f"{' '.join(res['packages'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
