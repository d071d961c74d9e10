"""Where a run writes what it shows: figures as PNG, tables as CSV, headline numbers in summary.json."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .cache import REPO_ROOT


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunOutputs:
    """The folder `outputs/<run_name>/` with `figures/`, `tables/` and `summary.json`."""

    def __init__(self, params: dict, output_dir: str | Path | None = None):
        root = output_dir or os.environ.get("FORGETLAB_OUTPUTS") or REPO_ROOT / "outputs" / params["run_name"]
        self.root = Path(root).resolve()
        (self.root / "figures").mkdir(parents=True, exist_ok=True)
        (self.root / "tables").mkdir(parents=True, exist_ok=True)

    def save_figure(self, fig, name: str) -> None:
        """Write `figures/<name>.png` (returns nothing, so a notebook cell shows only the figure)."""
        fig.savefig(self.root / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")

    def save_table(self, df: pd.DataFrame, name: str) -> Path:
        path = self.root / "tables" / f"{name}.csv"
        df.to_csv(path, index=False)
        return path

    def update_summary(self, section: str, values: dict) -> Path:
        """Merge `values` under `section` in summary.json (other notebooks' sections are kept)."""
        path = self.root / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary[section] = _jsonable(values)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path
