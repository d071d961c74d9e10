"""Run every notebook with one parameter file: `python -m forgetlab.batch smoke`.

Parameters are validated before the first notebook starts. Every notebook runs even if an earlier one
failed (each builds what it needs from the cache); at the end a table names the failures, with the
failing cell and the first lines of its error, and the exit code is 1. The terminal shows which notebook,
which cell of how many and the elapsed time, with a heartbeat during long cells.
Executed notebooks land in `outputs/<run_name>/notebooks/`, figures and tables beside them, timings
(and failures) in `timings.json`, and a rendered report in `index.html` (see forgetlab.report).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cache import REPO_ROOT
from .config import ParameterError, load_params, resolve_profile
from .tree_memory import TreePeakMemory

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
HEARTBEAT_S = 60.0            # during a long cell, say every this many seconds that it is still running
ERROR_LINES = 4               # lines of an error kept in the failure table and timings.json


def notebooks(selection: list[str] | None = None, directory: Path | None = None) -> list[Path]:
    """Notebooks in reading order, optionally only those whose name starts with one of `selection`."""
    directory = Path(directory or NOTEBOOK_DIR)
    found = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if selection:
        found = [nb for nb in found if any(nb.name.startswith(s) for s in selection)]
        if not found:
            raise SystemExit(f"no notebook matches {selection}; available: "
                             f"{sorted(p.name for p in directory.glob('*.ipynb'))}")
    return found


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _first_line(source: str, width: int = 60) -> str:
    lines = [line for line in source.splitlines() if line.strip()]
    text = lines[0].strip() if lines else ""
    return text if len(text) <= width else text[: width - 3] + "..."


class CellProgress:
    """Prints one line per code cell (`cell 5/23`, elapsed time, its first line) and a heartbeat during long cells."""

    def __init__(self, name: str, heartbeat_s: float = HEARTBEAT_S, stream=None):
        self.name, self.heartbeat_s, self.stream = name, heartbeat_s, stream or sys.stdout
        self.total = 0
        self.count = 0                       # code cells started so far
        self.cell_index: int | None = None   # index (over all cells) of the running cell
        self.source = ""
        self.start = self.cell_start = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def say(self, text: str) -> None:
        print(f"[forgetlab] {self.name}: {text}", file=self.stream, flush=True)

    def begin(self, nb) -> None:
        self.total = sum(c.cell_type == "code" for c in nb.cells)
        self.start = self.cell_start = time.perf_counter()
        if self.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def cell_started(self, cell, index: int) -> None:
        if cell.cell_type != "code":
            return
        self.count += 1
        self.cell_index, self.source, self.cell_start = index, cell.source, time.perf_counter()
        self.say(f"cell {self.count}/{self.total} [{_clock(self.cell_start - self.start)}] {_first_line(cell.source)}")

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        """Every `heartbeat_s` without a new line (a long cell, or a slow kernel start), say what is running."""
        last = self.cell_start
        while not self._stop.wait(min(self.heartbeat_s, 1.0)):
            now, last = time.perf_counter(), max(last, self.cell_start)
            if now - last < self.heartbeat_s:
                continue
            last = now
            if self.count == 0:
                self.say(f"starting the kernel ({_clock(now - self.start)})")
            else:
                self.say(f"still in cell {self.count}/{self.total} ({_clock(now - self.cell_start)} in this cell, "
                         f"{_clock(now - self.start)} in this notebook)")


def _progress_engine(progress: CellProgress):
    """A papermill engine (nbclient's) that reports each cell's start to `progress`."""
    from papermill.engines import NBClientEngine

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            started = nb_man.cell_start

            def cell_start(cell, cell_index=None, **kw):
                progress.cell_started(cell, cell_index)
                return started(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
            progress.begin(nb_man.nb)
            try:
                return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
            finally:
                progress.end()

    return ProgressEngine


def _failure(name: str, exc: BaseException, progress: CellProgress) -> dict[str, Any]:
    """What the failure table and timings.json say about a failed notebook."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        error = f"{exc.ename}: {exc.evalue}"
        cell = f"{progress.count}/{progress.total} (In [{exc.exec_count}])"
        source = exc.source
    else:                                    # the kernel died, timed out, or the notebook could not be read
        error = f"{type(exc).__name__}: {exc}"
        cell = f"{progress.count}/{progress.total}" if progress.count else "-"
        source = progress.source
    lines = [line for line in error.splitlines() if line.strip()][:ERROR_LINES]
    return {"notebook": name, "cell": cell, "source": _first_line(source), "error": "\n".join(lines)}


def failure_table(failed: list[dict[str, Any]]) -> str:
    """The failures as a fixed-width text table (notebook, cell, its first line, the error's first lines)."""
    if not failed:
        return ""
    head = ("notebook", "cell", "source", "error")
    rows = [(f["notebook"], f["cell"], f["source"], f["error"].splitlines() or [""]) for f in failed]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(3)]

    def line(cols, error):
        return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)) + "  " + error

    out = [line(head, head[3]), line(["-" * w for w in widths], "-" * 5)]
    for name, cell, source, error in rows:
        out.append(line((name, cell, source), error[0]))
        out += [line(("", "", ""), more) for more in error[1:]]
    return "\n".join(out)


def run_batch(profile: str, selection: list[str] | None = None, output_dir: str | None = None,
              notebook_dir: str | Path | None = None, heartbeat_s: float = HEARTBEAT_S,
              echo: bool = False, report: bool = True) -> dict:
    """Execute the notebooks with papermill, each even if an earlier one failed; return the timings report
    (with a `failed` list). `echo` forwards what the notebooks print to this terminal; `report` writes
    index.html."""
    import papermill as pm
    from papermill.engines import papermill_engines

    params_path = resolve_profile(profile)
    params = load_params(params_path)
    directory = Path(notebook_dir or NOTEBOOK_DIR).resolve()
    selected = notebooks(selection, directory)
    out = Path(output_dir or REPO_ROOT / "outputs" / params["run_name"]).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    failed: list[dict[str, Any]] = []
    start = time.perf_counter()
    memory = TreePeakMemory().start()        # the kernels and their workers, summed
    for i, nb in enumerate(selected, 1):
        progress = CellProgress(nb.stem, heartbeat_s)
        papermill_engines.register("forgetlab-progress", _progress_engine(progress))
        print(f"[forgetlab] notebook {i}/{len(selected)}: {nb.name} with {params_path.name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(out / "notebooks" / nb.name), cwd=str(directory), kernel_name="python3",
                                parameters={"profile": str(params_path), "overrides": {}, "output_dir": str(out)},
                                engine_name="forgetlab-progress", progress_bar=False,
                                stdout_file=sys.stdout if echo else None, stderr_file=sys.stderr if echo else None)
        except Exception as exc:             # report and go on: later notebooks do not depend on this one
            failed.append(_failure(nb.stem, exc, progress))
            print(f"[forgetlab] {nb.name} FAILED at cell {failed[-1]['cell']}: "
                  f"{failed[-1]['error'].splitlines()[0] if failed[-1]['error'] else ''}", flush=True)
        timings[nb.stem] = round(time.perf_counter() - t0, 1)
        print(f"[forgetlab] {nb.name} {'failed' if failed and failed[-1]['notebook'] == nb.stem else 'done'} "
              f"after {timings[nb.stem]:.1f} s (batch {_clock(time.perf_counter() - start)})", flush=True)
    elapsed = round(time.perf_counter() - start, 1)
    memory.stop()
    kids = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    tree = None if memory.peak_mib is None else round(memory.peak_mib, 1)
    result = merge_timings(out / "timings.json", params_path.name, timings, kids, partial=bool(selection),
                           failed=failed, tree_peak_mib=tree)
    (out / "timings.json").write_text(json.dumps(result, indent=2))
    if report:
        try:
            from .report import write_report
            print(f"[forgetlab] report: {write_report(out, params, result)}", flush=True)
        except Exception as exc:             # the notebooks ran; say why there is no report, do not hide the rest
            print(f"[forgetlab] could not write the HTML report: {type(exc).__name__}: {exc}", flush=True)
    print(f"[forgetlab] {len(selected) - len(failed)} of {len(selected)} notebooks ran without error in "
          f"{elapsed:.1f} s; outputs in {out}", flush=True)
    if failed:
        print(f"[forgetlab] {len(failed)} notebook(s) failed:\n{failure_table(failed)}", flush=True)
    return result


def merge_timings(path: Path, profile: str, seconds: dict[str, float], peak_mib: float, partial: bool,
                  failed: list[dict[str, Any]] | None = None, tree_peak_mib: float | None = None) -> dict:
    """The timings report of a run. A partial run (``--only``) updates the notebooks it ran in the report of an
    earlier run of the same profile, so `timings.json` keeps one figure per notebook; `total` is their sum.
    `failed` lists the failures of the notebooks as last run (a rerun notebook's old failure is dropped).
    ``peak_mib`` is the largest kernel's peak resident set; ``tree_peak_mib`` (if measured) the peak summed
    proportional set size of the batch and everything it started (kernels and their worker processes)."""
    report = {"profile": profile, "seconds": {}, "peak_kernel_rss_mib": peak_mib, "failed": []}
    if tree_peak_mib is not None:
        report["peak_tree_pss_mib"] = tree_peak_mib
    if partial and path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("profile") == profile:
            report["seconds"] = {k: v for k, v in old.get("seconds", {}).items() if k != "total"}
            report["peak_kernel_rss_mib"] = max(peak_mib, old.get("peak_kernel_rss_mib", 0.0))
            if tree_peak_mib is not None and "peak_tree_pss_mib" in old:
                report["peak_tree_pss_mib"] = max(tree_peak_mib, old["peak_tree_pss_mib"])
            report["failed"] = [f for f in old.get("failed", []) if f.get("notebook") not in seconds]
    report["seconds"].update(seconds)
    report["seconds"] = dict(sorted(report["seconds"].items()))
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 1)
    report["failed"] = sorted(report["failed"] + list(failed or []), key=lambda f: f["notebook"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", nargs="?", default="default", help="smoke, default, full, or a YAML path")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 01 02")
    parser.add_argument("--output-dir", help="default: outputs/<run_name>")
    parser.add_argument("--notebook-dir", help="folder of the notebooks to run (default: notebooks/)")
    parser.add_argument("--echo", action="store_true", help="also print what the notebooks print")
    parser.add_argument("--heartbeat", type=float, default=HEARTBEAT_S,
                        help="seconds between 'still running' lines during a long cell (0: none)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report (index.html)")
    args = parser.parse_args(argv)
    try:
        result = run_batch(args.profile, args.only, args.output_dir, args.notebook_dir, heartbeat_s=args.heartbeat,
                           echo=args.echo, report=not args.no_report)
    except ParameterError as exc:
        print(f"[forgetlab] bad parameters, nothing was run:\n{exc}", file=sys.stderr)
        return 2
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
