"""Run every notebook with one parameter file: `python -m forgetlab.batch smoke`.

Parameters are validated before the first notebook starts. Executed notebooks land in
`outputs/<run_name>/notebooks/`, figures and tables beside them, timings in `timings.json`.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from .cache import REPO_ROOT
from .config import ParameterError, load_params, resolve_profile

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks(selection: list[str] | None = None) -> list[Path]:
    """Notebooks in reading order, optionally only those whose name starts with one of `selection`."""
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selection:
        found = [nb for nb in found if any(nb.name.startswith(s) for s in selection)]
        if not found:
            raise SystemExit(f"no notebook matches {selection}; available: {[p.name for p in NOTEBOOK_DIR.glob('*.ipynb')]}")
    return found


def run_batch(profile: str, selection: list[str] | None = None, output_dir: str | None = None) -> dict:
    """Execute the notebooks with papermill; return timings. Stops at the first failing notebook."""
    import papermill as pm

    params_path = resolve_profile(profile)
    params = load_params(params_path)
    out = Path(output_dir or REPO_ROOT / "outputs" / params["run_name"]).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for nb in notebooks(selection):
        t0 = time.perf_counter()
        print(f"[forgetlab] {nb.name} with {params_path.name} ...", flush=True)
        pm.execute_notebook(str(nb), str(out / "notebooks" / nb.name), cwd=str(NOTEBOOK_DIR), kernel_name="python3",
                            parameters={"profile": str(params_path), "overrides": {}, "output_dir": str(out)},
                            progress_bar=False)
        timings[nb.stem] = round(time.perf_counter() - t0, 1)
        print(f"[forgetlab] {nb.name} done in {timings[nb.stem]:.1f} s", flush=True)
    elapsed = round(time.perf_counter() - start, 1)
    kids = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    report = merge_timings(out / "timings.json", params_path.name, timings, kids, partial=bool(selection))
    (out / "timings.json").write_text(json.dumps(report, indent=2))
    print(f"[forgetlab] all done in {elapsed:.1f} s; outputs in {out}", flush=True)
    return report


def merge_timings(path: Path, profile: str, seconds: dict[str, float], peak_mib: float, partial: bool) -> dict:
    """The timings report of a run. A partial run (``--only``) updates the notebooks it ran in the report of an
    earlier run of the same profile, so `timings.json` keeps one figure per notebook; `total` is their sum."""
    report = {"profile": profile, "seconds": {}, "peak_kernel_rss_mib": peak_mib}
    if partial and path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("profile") == profile:
            report["seconds"] = {k: v for k, v in old.get("seconds", {}).items() if k != "total"}
            report["peak_kernel_rss_mib"] = max(peak_mib, old.get("peak_kernel_rss_mib", 0.0))
    report["seconds"].update(seconds)
    report["seconds"] = dict(sorted(report["seconds"].items()))
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", nargs="?", default="default", help="smoke, default, full, or a YAML path")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01 02")
    parser.add_argument("--output-dir", help="default: outputs/<run_name>")
    args = parser.parse_args(argv)
    try:
        run_batch(args.profile, args.only, args.output_dir)
    except ParameterError as exc:
        print(f"[forgetlab] bad parameters, nothing was run:\n{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
