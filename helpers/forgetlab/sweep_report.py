"""A sweep's collected results: the run report, the tidy table, means with 95% intervals across seeds, the figure.

``results.csv`` has one row per unit x kind x method x summary metric: ``unit_id``, the swept parameters
(list values as JSON, e.g. ``[0]``), ``kind``, ``method``, ``metric``, ``value``. It is rebuilt from the
finished unit folders after every run, so it never holds a half-finished unit.

Intervals: where a seed parameter (``seed``, ``original_seeds``, ``reference_seeds``) is swept, each point
of a curve is the mean over the seed values and its 95% **Student-t interval**
(mean ± t(0.975, n-1) · sd / sqrt(n)). A t-interval rather than a bootstrap, because a sweep has few seeds
(3 to 10) and a percentile bootstrap over 3 values cannot reach a 95% level.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from . import sweep_store as store
from .sweep import SEED_PARAMS, Sweep

ID_COLUMNS = ("kind", "method")
LEVEL = 0.95
METRIC_UNITS = {"bits": "bits", "steps": "unlearning steps", "ppl": "perplexity"}
PARAM_LABELS = {
    "insertions": "insertions (times each forget example is in the training data)",
    "unlearn_lr": "unlearning learning rate", "unlearn_steps": "unlearning steps (budget)",
    "learning_rate": "training learning rate", "epochs": "training epochs",
    "forget_size": "forget set size (examples)", "example_tokens": "example length (tokens)",
    "max_train_tokens": "training tokens (cap)", "d_model": "model width (d_model)", "n_layer": "layers",
}


def manifest(sweep: Sweep) -> dict:
    """What the sweep is: its file, base, stages, swept parameters and every unit's id and values."""
    return {"name": sweep.name, "sweep_file": str(sweep.path), "base": str(sweep.base), "stages": list(sweep.stages),
            "swept": sweep.swept_keys, "units": [{"index": u.index, "unit_id": u.unit_id, "swept": u.swept}
                                                 for u in sweep.units]}


@dataclass
class SweepReport:
    """What a run did: outcome per unit id (done, failed, interrupted, skipped-done, skipped-failed)."""
    sweep: Sweep
    outcomes: dict[str, dict]
    seconds: float
    results_rows: int
    interrupted_by_user: bool = False
    failures: dict[str, dict] = field(default_factory=dict)

    def ids(self, *statuses: str) -> list[str]:
        return [u.unit_id for u in self.sweep.units if self.outcomes[u.unit_id]["status"] in statuses]

    @property
    def exit_code(self) -> int:
        if self.interrupted_by_user:
            return 130
        return 1 if self.ids("failed", "skipped-failed", "interrupted") else 0

    def text(self) -> str:
        s = self.sweep
        ran, skipped = self.ids("done", "failed", "interrupted"), self.ids("skipped-done")
        lines = [f"[sweep] {s.name}: {len(s.units)} units; {len(self.ids('done', 'skipped-done'))} finished "
                 f"({len(skipped)} from earlier runs), ran {len(ran)} in {self.seconds:.1f} s; "
                 f"{self.results_rows} rows in {s.results_path}"]
        for uid in self.ids("failed", "skipped-failed"):
            f = self.failures.get(uid) or {}
            lines.append(f"[sweep] FAILED {uid} (point {f.get('index')}, {f.get('swept')}): "
                         f"{f.get('error_type')}: {str(f.get('error', '')).splitlines()[0] if f.get('error') else ''}"
                         f"\n         details: {s.failed_dir / uid / store.FAILED}")
        if self.ids("skipped-failed"):
            lines.append("[sweep] units that failed in an earlier run were not rerun: add --retry-failed")
        for uid in self.ids("interrupted"):
            lines.append(f"[sweep] UNFINISHED {uid}: {self.outcomes[uid].get('error', '')}")
        if self.ids("interrupted") or self.interrupted_by_user:
            lines.append("[sweep] run the same command again to finish the unfinished units "
                         "(finished ones are kept)")
        return "\n".join(lines)


def open_sweep(sweep: str | Path | None, profile: str | Path = "smoke", overrides: Mapping[str, Any] | None = None,
               output_dir: str | Path | None = None) -> Sweep:
    """Notebook 08's sweep. `sweep` None: papermill_params/sweeps/<profile name>.yaml if there is one, else the
    smoke sweep. Results live in outputs/<sweep name>/, or in <output_dir>/sweeps/<sweep name>/ when the
    notebook runs inside a batch with its own output folder; `overrides` apply to every point."""
    from .sweep import SWEEP_DIR, load_sweep
    if sweep is None:
        own = SWEEP_DIR / f"{Path(str(profile)).stem}.yaml"
        sweep = own if own.is_file() else SWEEP_DIR / "smoke.yaml"
    return load_sweep(sweep, Path(output_dir) / "sweeps" if output_dir else None, overrides)


def ensure_results(sweep: Sweep, workers: int | None = None, progress: bool = True) -> tuple[pd.DataFrame, str]:
    """The sweep's results table, running the unfinished units first (local executor); and what was done."""
    missing = [u for u in sweep.units if store.read_done(sweep.units_dir, u.unit_id) is None]
    if missing or not sweep.results_path.is_file():
        from .sweep_exec import run_sweep
        report = run_sweep(sweep, "local", workers=workers, progress=progress)
        note = report.text()
    else:
        note = f"[sweep] {sweep.name}: all {len(sweep.units)} units finished earlier; reading {sweep.results_path}"
    results = read_results(sweep.results_path)
    if results.empty:
        raise RuntimeError(f"sweep {sweep.name} has no finished unit yet:\n{note}")
    return results, note


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def collect_results(sweep: Sweep) -> pd.DataFrame:
    """Rebuild results.csv from the sweep's finished, verified unit folders (in unit order); return it."""
    frames = []
    for u in sweep.units:
        if store.read_done(sweep.units_dir, u.unit_id) is None:
            continue
        summary = pd.read_csv(sweep.units_dir / u.unit_id / "summary.csv")
        metrics = [c for c in summary.columns if c not in ID_COLUMNS]
        long = summary.melt(id_vars=list(ID_COLUMNS), value_vars=metrics, var_name="metric", value_name="value")
        long["_order"] = np.arange(len(long)) % len(summary) * len(metrics) + np.arange(len(long)) // len(summary)
        long = long.sort_values("_order").drop(columns="_order")
        swept = {k: _cell(u.swept.get(k)) for k in sweep.swept_keys}
        frames.append(long.assign(unit_id=u.unit_id, **swept))
    columns = ["unit_id", *sweep.swept_keys, *ID_COLUMNS, "metric", "value"]
    table = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    _write_csv_atomic(table, sweep.results_path)
    return table


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            df.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(path: str | Path) -> pd.DataFrame:
    """results.csv as written by collect_results (list-valued parameters stay JSON strings)."""
    return pd.read_csv(path, dtype={"unit_id": str, "kind": str, "method": str, "metric": str})


def swept_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in results.columns if c not in ("unit_id", *ID_COLUMNS, "metric", "value")]


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of `values` (NaN ignored); (mean, nan, nan) below two values."""
    from scipy import stats
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def summarize(results: pd.DataFrame, metric: str, x: str, where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per value of `x` (and of any other non-seed swept parameter), kind and method: the metric's mean over
    the swept seeds, its 95% t-interval, n (finite values) and n_missing (e.g. a target never reached)."""
    swept = swept_columns(results)
    if x not in swept:
        raise ValueError(f"x = {x!r} is not a swept parameter of this sweep: choose one of {swept}")
    metrics = sorted(results.metric.unique())
    if metric not in metrics:
        raise ValueError(f"metric = {metric!r} is not in the results: choose one of {metrics}")
    df = results[results.metric == metric]
    for key, value in (where or {}).items():
        if key not in swept:
            raise ValueError(f"where: {key!r} is not a swept parameter: choose among {swept}")
        df = df[df[key].astype(str) == str(_cell(value))]
    facets = [c for c in swept if c != x and c not in SEED_PARAMS]
    keys = [x, *facets, *ID_COLUMNS]
    rows = []
    for group, g in df.groupby(keys, sort=False, dropna=False):
        mean, low, high = t_interval(g.value.to_numpy())
        rows.append({**dict(zip(keys, group)), "mean": mean, "low": low, "high": high,
                     "n": int(np.isfinite(g.value.to_numpy(dtype=float)).sum()),
                     "n_missing": int((~np.isfinite(g.value.to_numpy(dtype=float))).sum())})
    out = pd.DataFrame(rows, columns=[*keys, "mean", "low", "high", "n", "n_missing"])
    return out.sort_values(keys, kind="stable", key=_sort_key).reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(col, errors="coerce")
    return numeric if numeric.notna().all() else col.astype(str)


def metric_label(metric: str) -> str:
    """Axis label with units: final_genex_bits -> 'final GenEx (bits)', steps_to_target -> 'steps to target
    (unlearning steps)', final_heldout_ppl -> 'final held-out perplexity'."""
    words = metric.split("_")
    unit = None
    if words[-1] == "bits":
        words, unit = words[:-1], "bits"
    elif words[0] == "steps" or words[-1] == "steps":
        unit = "unlearning steps"
    if metric.endswith("per_bit"):
        unit = "perplexity per bit"
    names = {"genex": "GenEx", "relex": "RelEx", "ppl": "perplexity", "heldout": "held-out", "pct": "%"}
    text = " ".join(names.get(w, w) for w in words).replace(" %", "%")
    return text + (f" ({unit})" if unit else "")


def plot_metric(results: pd.DataFrame, metric: str, x: str, where: Mapping[str, Any] | None = None,
                max_panels: int = 6):
    """Summary `metric` against swept parameter `x`: one line per kind and method (colour = kind, line style =
    method), a shaded 95% t-interval across seeds where seeds are swept, one panel per value of any other swept
    parameter; the legend sits outside the axes."""
    import matplotlib.pyplot as plt

    from .plots import KIND_COLORS, METHOD_LABELS, METHOD_STYLES, kind_label
    table = summarize(results, metric, x, where)
    facets = [c for c in swept_columns(results) if c != x and c not in SEED_PARAMS]
    panels = list(table.groupby(facets, sort=False)) if facets else [((), table)]
    if len(panels) > max_panels:
        raise ValueError(f"{len(panels)} panels (one per value of {facets}): pick some with `where`, "
                         f"e.g. where={{{facets[0]!r}: {table[facets[0]].iloc[0]!r}}}")
    seeds = [c for c in swept_columns(results) if c in SEED_PARAMS and c != x]
    numeric = pd.to_numeric(table[x], errors="coerce").notna().all()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 4), squeeze=False, sharey=True)
    for ax, (facet, part) in zip(axes[0], panels):
        order = list(dict.fromkeys(part[x]))
        lines = sorted(part.groupby(list(ID_COLUMNS), sort=False),
                       key=lambda kg: (list(KIND_COLORS).index(kg[0][0]) if kg[0][0] in KIND_COLORS else 99, kg[0][1]))
        for (kind, method), g in lines:
            xs = pd.to_numeric(g[x]).to_numpy() if numeric else np.array([order.index(v) for v in g[x]])
            color = KIND_COLORS.get(kind)
            label = f"{kind_label(kind)}, {METHOD_LABELS.get(method, method)}"
            ax.plot(xs, g["mean"], marker="o", color=color, linestyle=METHOD_STYLES.get(method, "-"), label=label)
            if g["low"].notna().any():
                ax.fill_between(xs, g["low"], g["high"], color=color, alpha=0.15, linewidth=0)
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order])
        else:
            values = np.sort(pd.to_numeric(pd.Series(order)).to_numpy(dtype=float))
            if (values > 0).all() and values[-1] >= 20 * values[0]:
                ax.set_xscale("log")
            if len(values) <= 10:     # ticks at the swept values, written compactly
                ax.set_xticks(values, [f"{v:g}" for v in values])
                ax.minorticks_off()
        facet = facet if isinstance(facet, tuple) else (facet,)
        ax.set_title(", ".join(f"{k} = {v}" for k, v in zip(facets, facet)) or None, fontsize=10)
        ax.set_xlabel(PARAM_LABELS.get(x, x))
    axes[0][0].set_ylabel(metric_label(metric))
    how = (f"mean over {', '.join(seeds)} with 95% t-interval (shaded)" if seeds
           else "one run per point (no seed swept, so no interval)")
    missing = int(table.n_missing.sum())
    note = f"; {missing} run(s) without a value (e.g. target never reached) left out" if missing else ""
    fig.suptitle(f"{metric_label(metric)} against {PARAM_LABELS.get(x, x).split(' (')[0]}\n{how}{note}",
                 fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), fontsize=8, title="kind, method")
    fig.tight_layout()
    return fig
