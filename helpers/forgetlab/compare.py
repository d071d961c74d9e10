"""Compare two runs: `python -m forgetlab.compare outputs/A outputs/B [--exact] [--rtol R] [--atol A]`.

Compares the runs' `summary.json` (nested dicts and lists of numbers and strings) and their CSV tables
(every `*.csv` under the run folder, matched by relative path), prints every difference (file, key or
row and column, the value in A and in B) and a one-line verdict. Exit code 0 when the runs agree, 1 otherwise.

What "agree" means:
- `--exact` (two runs on the same machine): every value identical, bit for bit (numbers compared by their
  exact text), every string identical.
- default (runs on different machines): numbers equal within a relative tolerance of 1e-5 or an absolute
  tolerance of 1e-8 (numpy's `allclose` defaults; change with --rtol/--atol). A value reported with an
  interval beside it (keys or columns `X_lo`/`X_hi`, `X_low`/`X_high`, `X_ci_low`/`X_ci_high`; or bare
  `low`/`high`, `lo`/`hi`, `ci_low`/`ci_high` next to `estimate`, `value`, `mean`, `median`, or next to a single
  other non-integer number) also agrees when each run's value lies within the other run's interval; its
  bounds are then not compared one by one. Strings (verdicts, names) must be identical.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

RTOL, ATOL = 1e-5, 1e-8
SUFFIX_BOUNDS = (("_ci_low", "_ci_high"), ("_lo", "_hi"), ("_low", "_high"))
BARE_BOUNDS = (("ci_low", "ci_high"), ("lo", "hi"), ("low", "high"))
ESTIMATES = ("estimate", "value", "mean", "median")


@dataclass(frozen=True)
class Tolerance:
    rtol: float = RTOL
    atol: float = ATOL
    exact: bool = False

    def describe(self) -> str:
        if self.exact:
            return "bitwise"
        return f"rtol={self.rtol:g}, atol={self.atol:g}, or within each other's reported interval"


@dataclass(frozen=True)
class Difference:
    file: str
    where: str
    a: Any
    b: Any
    note: str = ""

    def line(self) -> str:
        return f"{self.file}  {self.where}  A={self.a!r}  B={self.b!r}" + (f"  ({self.note})" if self.note else "")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(a: Any, b: Any, tol: Tolerance) -> bool:
    """Two scalars agree (numbers within tolerance, or bit for bit with `exact`; anything else: equal)."""
    if tol.exact:
        return type(a) is type(b) and repr(a) == repr(b)
    if _is_number(a) and _is_number(b):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=tol.rtol, abs_tol=tol.atol)
    return type(a) is type(b) and a == b


def interval_groups(keys: Iterable[str], is_float: Callable[[str], bool]) -> dict[str, tuple[str, str]]:
    """{value key: (low key, high key)} for the values that have an interval beside them."""
    keys = list(keys)
    present, groups = set(keys), {}
    for k in keys:
        for lo, hi in SUFFIX_BOUNDS:
            base = k[: -len(lo)]
            if k.endswith(lo) and base and base in present and base + hi in present and base not in groups:
                groups[base] = (k, base + hi)
    bounds = {b for pair in groups.values() for b in pair}
    for lo, hi in BARE_BOUNDS:
        if lo in present and hi in present:
            named = [k for k in ESTIMATES if k in present]
            others = [k for k in keys if is_float(k) and k not in bounds and k not in groups
                      and k not in {b for pair in BARE_BOUNDS for b in pair}]
            target = named[0] if named else (others[0] if len(others) == 1 else None)
            if target is not None and target not in groups:
                groups[target] = (lo, hi)
                break
    return groups


def _within(xa, xb, loa, hia, lob, hib) -> bool:
    vals = (xa, xb, loa, hia, lob, hib)
    if not all(_is_number(v) and not math.isnan(v) for v in vals):
        return False
    return loa <= xb <= hia and lob <= xa <= hib


class Comparison:
    """Collects differences and counts compared values over the files of two runs."""

    def __init__(self, tol: Tolerance):
        self.tol, self.differences, self.values, self.files = tol, [], 0, 0

    def add(self, file: str, where: str, a: Any, b: Any, note: str = "") -> None:
        self.differences.append(Difference(file, where, a, b, note))

    # ------------------------------------------------------------ summary.json

    def json(self, a: Any, b: Any, file: str, where: str = "") -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            self._dict(a, b, file, where)
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.add(file, where or "(top)", f"{len(a)} items", f"{len(b)} items", "list lengths differ")
            for i, (x, y) in enumerate(zip(a, b)):
                self.json(x, y, file, f"{where}[{i}]")
        else:
            self.values += 1
            if not _same(a, b, self.tol):
                self.add(file, where or "(top)", a, b)

    def _dict(self, a: dict, b: dict, file: str, where: str) -> None:
        def path(k: str) -> str:
            return f"{where}.{k}" if where else k

        for k in sorted(set(a) ^ set(b)):
            self.add(file, path(k), a.get(k, "(missing)"), b.get(k, "(missing)"), "key in one run only")
        common = [k for k in a if k in b]
        groups = {} if self.tol.exact else interval_groups(
            common, lambda k: isinstance(a[k], float) and isinstance(b[k], float))
        done: set[str] = set()
        for value, (lo, hi) in groups.items():
            self.values += 3
            done |= {value, lo, hi}
            if all(_same(a[k], b[k], self.tol) for k in (value, lo, hi)):
                continue
            if not _within(a[value], b[value], a[lo], a[hi], b[lo], b[hi]):
                self.add(file, path(value), a[value], b[value],
                         f"outside tolerance and intervals: A [{a[lo]}, {a[hi]}], B [{b[lo]}, {b[hi]}]")
        for k in common:
            if k not in done:
                self.json(a[k], b[k], file, path(k))

    # ------------------------------------------------------------ CSV tables

    def csv(self, path_a: Path, path_b: Path, file: str) -> None:
        opts = {"dtype": str, "keep_default_na": False} if self.tol.exact else {}
        a, b = pd.read_csv(path_a, **opts), pd.read_csv(path_b, **opts)
        for col in sorted(set(a.columns) ^ set(b.columns)):
            self.add(file, f"column {col}", "present" if col in a else "(missing)",
                     "present" if col in b else "(missing)", "column in one run only")
        cols = [c for c in a.columns if c in b.columns]
        a, b, labels = self._align(a[cols], b[cols], file)
        numeric = [c for c in cols if not self.tol.exact and pd.api.types.is_numeric_dtype(a[c])
                   and pd.api.types.is_numeric_dtype(b[c])]
        groups = interval_groups(numeric, lambda c: pd.api.types.is_float_dtype(a[c]))
        bad: dict[str, np.ndarray] = {}
        for c in cols:
            if c in numeric:
                x, y = a[c].to_numpy(float), b[c].to_numpy(float)
                bad[c] = ~np.isclose(x, y, rtol=self.tol.rtol, atol=self.tol.atol, equal_nan=True)
            else:
                bad[c] = ~((a[c] == b[c]) | (a[c].isna() & b[c].isna())).to_numpy()
        for value, (lo, hi) in groups.items():
            g = {k: (a[k].to_numpy(float), b[k].to_numpy(float)) for k in (value, lo, hi)}
            (xa, xb), (loa, lob), (hia, hib) = g[value], g[lo], g[hi]
            inside = (loa <= xb) & (xb <= hia) & (lob <= xa) & (xa <= hib)
            group_bad = (bad[value] | bad[lo] | bad[hi]) & ~inside
            for i in np.flatnonzero(group_bad):
                self.add(file, f"{labels[i]} column {value}", _plain(a[value].iat[i]), _plain(b[value].iat[i]),
                         f"outside tolerance and intervals: A [{loa[i]}, {hia[i]}], B [{lob[i]}, {hib[i]}]")
            bad[value] = bad[lo] = bad[hi] = np.zeros(len(a), bool)
        for c in cols:
            for i in np.flatnonzero(bad[c]):
                self.add(file, f"{labels[i]} column {c}", _plain(a[c].iat[i]), _plain(b[c].iat[i]))
        self.values += len(a) * len(cols)

    def _align(self, a: pd.DataFrame, b: pd.DataFrame, file: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
        """Rows matched by their first text columns that identify rows in both tables (e.g. kind, method), else
        by position. Later text columns (a verdict) are compared, not used to match."""
        text = [c for c in a.columns if not pd.api.types.is_numeric_dtype(a[c])
                and not pd.api.types.is_numeric_dtype(b[c])]
        keys = next((text[:n] for n in range(1, len(text) + 1)
                     if not a.duplicated(text[:n]).any() and not b.duplicated(text[:n]).any()), [])
        if keys:
            ka = a[keys].astype(str).agg(", ".join, axis=1) if len(a) else pd.Series(dtype=str)
            kb = b[keys].astype(str).agg(", ".join, axis=1) if len(b) else pd.Series(dtype=str)
            for k in sorted(set(ka) ^ set(kb)):
                self.add(file, f"row {', '.join(keys)} = {k}", "present" if k in set(ka) else "(missing)",
                         "present" if k in set(kb) else "(missing)", "row in one run only")
            common = [k for k in ka if k in set(kb)]
            ia = dict(zip(ka, range(len(ka))))
            ib = dict(zip(kb, range(len(kb))))
            a = a.iloc[[ia[k] for k in common]].reset_index(drop=True)
            b = b.iloc[[ib[k] for k in common]].reset_index(drop=True)
            return a, b, [f"row {', '.join(keys)} = {k}" for k in common]
        if len(a) != len(b):
            self.add(file, "rows", len(a), len(b), "row counts differ; the first rows are compared")
        n = min(len(a), len(b))
        return a.iloc[:n].reset_index(drop=True), b.iloc[:n].reset_index(drop=True), [f"row {i}" for i in range(n)]


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def compare_runs(a: Path | str, b: Path | str, tol: Tolerance | None = None) -> Comparison:
    """Compare `summary.json` and every CSV table of two run folders."""
    tol, a, b = tol or Tolerance(), Path(a), Path(b)
    for folder in (a, b):
        if not folder.is_dir():
            raise FileNotFoundError(f"run folder {folder} does not exist: pass two folders such as outputs/smoke")
    result = Comparison(tol)
    summaries = [p / "summary.json" for p in (a, b)]
    if any(p.is_file() for p in summaries):
        if not all(p.is_file() for p in summaries):
            result.add("summary.json", "(file)", *["present" if p.is_file() else "(missing)" for p in summaries])
        else:
            result.files += 1
            result.json(*(json.loads(p.read_text()) for p in summaries), "summary.json")
    tables = [{str(p.relative_to(root)) for p in root.rglob("*.csv") if not any(s.startswith(".") for s in
                                                                                p.relative_to(root).parts)}
              for root in (a, b)]
    for rel in sorted(tables[0] ^ tables[1]):
        result.add(rel, "(file)", "present" if rel in tables[0] else "(missing)",
                   "present" if rel in tables[1] else "(missing)", "table in one run only")
    for rel in sorted(tables[0] & tables[1]):
        result.files += 1
        result.csv(a / rel, b / rel, rel)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="a run folder, e.g. outputs/smoke")
    parser.add_argument("run_b", help="the other run folder")
    parser.add_argument("--exact", action="store_true", help="bit for bit (two runs on the same machine)")
    parser.add_argument("--rtol", type=float, default=RTOL, help=f"relative tolerance (default {RTOL:g})")
    parser.add_argument("--atol", type=float, default=ATOL, help=f"absolute tolerance (default {ATOL:g})")
    args = parser.parse_args(argv)
    if not (args.rtol >= 0 and args.atol >= 0 and math.isfinite(args.rtol) and math.isfinite(args.atol)):
        parser.error("--rtol and --atol must be finite numbers >= 0")
    try:
        result = compare_runs(args.run_a, args.run_b, Tolerance(args.rtol, args.atol, args.exact))
    except FileNotFoundError as exc:
        print(f"[forgetlab] {exc}", file=sys.stderr)
        return 2
    for d in result.differences:
        print(d.line())
    n = len(result.differences)
    if n:
        print(f"DIFFERENT: {n} difference(s) in {len({d.file for d in result.differences})} file(s) "
              f"({result.values} values in {result.files} files compared; {result.tol.describe()})")
        return 1
    print(f"EQUAL: {result.values} values in {result.files} files agree ({result.tol.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
