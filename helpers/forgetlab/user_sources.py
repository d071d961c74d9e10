"""A user's own text as a forget-set source (the ``custom`` kind): readers for plain text, JSONL, CSV and local
Hugging Face ``datasets`` data, each giving a list of records (one future example per record).

Formats (``custom_format``):

- ``lines``: a plain-text file, one record per non-blank line;
- ``paragraphs``: a plain-text file, one record per paragraph (blocks separated by blank lines);
- ``jsonl``: one JSON object per line, the record in the ``custom_text_field`` key;
- ``csv``: a CSV file with a header row, the record in the ``custom_text_field`` column;
- ``datasets``: a folder written by ``datasets.Dataset.save_to_disk`` (read with ``load_from_disk``), the record in
  the ``custom_text_field`` column (a ``DatasetDict`` gives its splits in name order);
- ``hf-text``: a plain-text file read by ``datasets.load_dataset("text", data_files=...)``, one record per line;
- ``auto``: a folder is ``datasets``; ``.jsonl``/``.ndjson`` is ``jsonl``; ``.csv`` is ``csv``; any other file is
  ``paragraphs`` if it has a blank line between two text lines, else ``lines``.

Everything is local: nothing is downloaded. Every problem raises :class:`CustomSourceError` with the fix.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from pathlib import Path

FORMATS = ("auto", "lines", "paragraphs", "jsonl", "csv", "datasets", "hf-text")
REPO_ROOT = Path(__file__).resolve().parents[2]


class CustomSourceError(ValueError):
    """A user's source file cannot be read as asked; the message says how to fix it."""


def resolve_source(path: str | Path) -> Path:
    """The file or folder `path` names: absolute as given; relative to the working directory, else to the
    repository root (notebooks run in ``notebooks/``, so both spellings of a repository path work)."""
    given = Path(path).expanduser()
    tried = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for candidate in tried:
        if candidate.exists():
            return candidate.resolve()
    raise CustomSourceError(f"custom_source {str(path)!r} does not exist (looked at "
                            f"{', '.join(str(t) for t in tried)}): fix the path or set custom_source to an existing "
                            f"file or datasets folder")


def detect_format(path: Path) -> str:
    """The format ``auto`` means for `path` (see the module docstring)."""
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    lines = [line.strip() for line in _read_text(path).splitlines()]
    blank_between = any(not line and i and lines[i - 1] and any(lines[i + 1:]) for i, line in enumerate(lines))
    return "paragraphs" if blank_between else "lines"


def source_digest(path: str | Path) -> str:
    """SHA-256 of a source's content (every file of a folder, with its relative name): a cache key part, so that
    editing the file rebuilds the data. '' for no source."""
    if not str(path):
        return ""
    root = resolve_source(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for f in files:
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def read_records(path: str | Path, fmt: str = "auto", field: str = "text") -> list[str]:
    """Every non-blank record of a user's source, in file order (surrounding whitespace stripped)."""
    if fmt not in FORMATS:
        raise CustomSourceError(f"custom_format = {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    root = resolve_source(path)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if root.is_dir() != (fmt == "datasets"):
        want = "a folder written by Dataset.save_to_disk" if fmt == "datasets" else "a file"
        raise CustomSourceError(f"custom_format = {fmt!r} needs {want} but {root} is "
                                f"{'a folder' if root.is_dir() else 'a file'}: set custom_format to 'auto' or fix "
                                f"custom_source")
    if fmt != "datasets" and root.stat().st_size == 0:
        raise CustomSourceError(f"custom_source {root} is empty: add text (for example one example per line)")
    reader = {"lines": _lines, "paragraphs": _paragraphs, "jsonl": _jsonl, "csv": _csv, "datasets": _datasets,
              "hf-text": _hf_text}[fmt]
    records = [r.strip() for r in (reader(root, field) if fmt in ("jsonl", "csv", "datasets") else reader(root))]
    records = [r for r in records if r]
    if not records:
        raise CustomSourceError(f"custom_source {root} has no non-blank records (read as {fmt!r}): add text, or "
                                f"pick the format that matches the file with custom_format")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CustomSourceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
                                ) from None


def _lines(path: Path) -> list[str]:
    return _read_text(path).splitlines()


def _paragraphs(path: Path) -> list[str]:
    paragraphs, current = [], []
    for line in _read_text(path).splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _missing_field(path: Path, field: str, columns, where: str = "") -> CustomSourceError:
    return CustomSourceError(f"{path}{where} has no column {field!r} (it has: {', '.join(map(str, columns)) or 'none'})"
                             f": set custom_text_field to the column that holds the text")


def _jsonl(path: Path, field: str) -> list[str]:
    records = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CustomSourceError(f"{path} line {n} is not JSON ({exc.msg}): write one JSON object per line, "
                                    f"or set custom_format to 'lines' for plain text") from None
        if not isinstance(obj, dict):
            raise CustomSourceError(f"{path} line {n} is a JSON {type(obj).__name__}, not an object: write one "
                                    f"object per line, like {{\"{field}\": \"...\"}}")
        if field not in obj:
            raise _missing_field(path, field, obj.keys(), f" line {n}")
        records.append(str(obj[field]))
    return records


def _csv(path: Path, field: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    if reader.fieldnames is None or field not in reader.fieldnames:
        raise _missing_field(path, field, reader.fieldnames or [])
    return [row[field] or "" for row in reader]


def _column(ds, path: Path, field: str) -> list[str]:
    if field not in ds.column_names:
        raise _missing_field(path, field, ds.column_names)
    return [str(v) for v in ds[field]]


def _datasets(path: Path, field: str) -> list[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise CustomSourceError(f"{path} is not a folder written by Dataset.save_to_disk ({exc}): save it with "
                                f"save_to_disk, or set custom_format to the format of its files") from None
    if isinstance(loaded, datasets.DatasetDict):
        return [r for split in sorted(loaded) for r in _column(loaded[split], path, field)]
    return _column(loaded, path, field)


def _hf_text(path: Path) -> list[str]:
    import datasets

    _read_text(path)                       # a clear message for a file that is not UTF-8
    with tempfile.TemporaryDirectory() as cache_dir:   # nothing is left in the user's datasets cache
        ds = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=cache_dir,
                                   keep_in_memory=True)
        return [str(v) for v in ds["text"]]


def custom_problems(p: dict) -> list[str]:
    """Problems of the custom-kind parameters that are cheap to find before any work (for ``validate_params``):
    'custom' without a source, a source that does not exist, an empty file, an unknown format."""
    if "custom" not in p["forget_kinds"]:
        return []
    if not p["custom_source"]:
        return [("forget_kinds has 'custom' but custom_source is empty: set custom_source to your text, JSONL or CSV "
                 "file or datasets folder, or remove 'custom' from forget_kinds")]
    try:
        path = resolve_source(p["custom_source"])
    except CustomSourceError as exc:
        return [str(exc)]
    if path.is_file() and path.stat().st_size == 0:
        return [f"custom_source {path} is empty: add text (for example one example per line)"]
    return []
