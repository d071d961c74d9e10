"""A run's rendered report, readable without Jupyter: `outputs/<run>/index.html`.

Every executed notebook is converted to HTML by nbconvert's HTMLExporter (figures are embedded in the page),
and an index page links them with the run's timings, failures and parameters. The index is itself a small
notebook of markdown cells exported by the same exporter, so no HTML is written by hand.
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat

from .config import SCHEMA, SECTIONS, params_in

LISTED_FILES = 200          # at most this many tables and figures are linked from the index


def _exporter():
    from nbconvert import HTMLExporter   # slow import (about a second): only when a report is written

    return HTMLExporter(template_name="lab", embed_images=True)


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell: HTML-escaped, pipes escaped, one line."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def render_notebooks(folder: Path, force: bool = False) -> dict[str, str]:
    """Convert each `*.ipynb` in `folder` whose HTML is missing or older (or all, with `force`) to `<stem>.html`
    beside it. Returns {stem: problem} for notebooks that could not be converted (none, normally)."""
    exporter, problems = None, {}
    for ipynb in sorted(folder.glob("*.ipynb")):
        page = ipynb.with_suffix(".html")
        if not force and page.is_file() and page.stat().st_mtime >= ipynb.stat().st_mtime:
            continue
        exporter = exporter or _exporter()
        try:
            body, _ = exporter.from_notebook_node(nbformat.read(ipynb, as_version=4),
                                                  resources={"metadata": {"name": ipynb.stem}})
            page.write_text(body, encoding="utf-8")
        except Exception as exc:           # a damaged notebook must not hide the rest of the report
            problems[ipynb.stem] = f"{type(exc).__name__}: {exc}"
    return problems


def index_markdown(run_name: str, params: dict, report: dict, pages: list[str], files: list[str],
                   render_problems: dict[str, str] | None = None) -> list[str]:
    """The index page as markdown cells: title, notebooks (links, status, seconds), failures, parameters, files."""
    seconds = report.get("seconds", {})
    failed = {f["notebook"]: f for f in report.get("failed", [])}
    render_problems = render_problems or {}
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cells = [f"# forgetlab run `{run_name}`\n\nProfile `{report.get('profile', '?')}`, report written {written}. "
             f"Total notebook time {seconds.get('total', 0):.1f} s; peak kernel memory "
             f"{report.get('peak_kernel_rss_mib', 0):.0f} MiB" +
             (f"; peak memory of the batch with its kernels and workers {report['peak_tree_pss_mib']:.0f} MiB "
              f"(summed PSS)" if report.get("peak_tree_pss_mib") is not None else "") + "."]
    rows = ["| notebook | status | seconds |", "|---|---|---|"]
    for stem in pages:
        status = "ok"
        if stem in failed:
            f = failed[stem]
            first = (f.get("error") or "").split("\n")[0]
            status = f"**failed** at cell {f.get('cell', '?')}: {_cell(first)}"
        if stem in render_problems:
            status += f"; not rendered ({_cell(render_problems[stem])})"
        link = f"[{stem}](notebooks/{stem}.html)" if stem not in render_problems else stem
        rows.append(f"| {link} | {status} | {seconds.get(stem, '')} |")
    cells.append("## Notebooks\n\n" + "\n".join(rows))
    if failed:
        parts = ["## Failures"]
        for stem, f in failed.items():
            parts.append(f"**{stem}**, cell {f.get('cell', '?')}: `{_cell(f.get('source', ''))}`\n\n"
                         f"```\n{f.get('error', '')}\n```")
        cells.append("\n\n".join(parts))
    table = ["## Parameters"]
    for section in SECTIONS:
        values = params_in(params, section)
        lines = [f"### {section}", "| parameter | value | meaning |", "|---|---|---|"]
        lines += [f"| `{name}` | {_cell(json.dumps(value))} | {_cell(SCHEMA[name].help)} |"
                  for name, value in values.items()]
        table.append("\n".join(lines))
    cells.append("\n\n".join(table))
    if files:
        shown = files[:LISTED_FILES]
        more = f"\n\n(and {len(files) - len(shown)} more)" if len(files) > len(shown) else ""
        cells.append("## Tables and figures\n\n" + "\n".join(f"- [{_cell(f)}]({f})" for f in shown) + more)
    return cells


def write_report(out: Path, params: dict, report: dict) -> Path:
    """Render the notebooks in `out/notebooks/` and write `out/index.html`; return its path."""
    out = Path(out)
    folder = out / "notebooks"
    problems = render_notebooks(folder) if folder.is_dir() else {}
    pages = sorted(p.stem for p in folder.glob("*.ipynb")) if folder.is_dir() else []
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.suffix in (".csv", ".png", ".svg", ".pdf", ".json")
                   and p.name != "timings.json" and "notebooks" not in p.relative_to(out).parts[:1])
    run_name = params.get("run_name", out.name)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text) for text in
                                         index_markdown(run_name, params, report, pages, files, problems)])
    body, _ = _exporter().from_notebook_node(nb, resources={"metadata": {"name": f"forgetlab run {run_name}"}})
    index = out / "index.html"
    index.write_text(body, encoding="utf-8")
    return index
