"""A content-addressed cache of trained artifacts: safetensors weights plus JSON metadata.

An entry's key is a hash of everything that determines it (parameters, data fingerprint, code
version). Nothing is ever unpickled. The cache is safe under concurrent processes (notebooks open
side by side, the batch, parallel sweeps):

- Every entry has its own lock, an OS-level ``flock`` taken through the ``filelock`` library, in
  ``<root>/.locks/<kind>/<key>.lock``. The OS releases it when its process dies, even on SIGKILL,
  so a crashed process never leaves a lock that blocks others.
- Writers build an entry in a temporary folder, then, holding the lock, move the old entry aside,
  rename the new one in and delete the old one. Readers hold the same lock while they read, so they
  see either the old entry or the new one, never a half-written or half-deleted folder.
- :meth:`ArtifactCache.get_or_build` loads an entry or builds it under its lock: two processes that
  need the same missing entry build it once; the other waits and loads it.
- On load, every file's SHA-256 is checked against the metadata. ``get_or_build`` heals a corrupt
  entry: it moves it to ``<root>/.corrupt/<kind>/<key>-<utc time>`` (kept for inspection), warns
  naming both folders, and rebuilds. ``ArtifactCache(heal=False)`` or ``FORGETLAB_CACHE_HEAL=0``
  raises :class:`CacheCorruptError` instead, for debugging.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "weights.safetensors"
WAIT_NOTICE_S = 5.0          # after this long waiting for a lock, say who we are waiting for

Entry = tuple[dict, "dict[str, torch.Tensor] | None", "dict[str, str]"]
Built = tuple[dict, "dict[str, torch.Tensor] | None", "dict[str, str] | None"]


class CacheCorruptError(RuntimeError):
    """A cache entry failed verification; the message names the folder to delete, `problem` what is wrong."""

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


class CacheHealedWarning(UserWarning):
    """A corrupt cache entry was moved aside and rebuilt; the message names both folders."""


def default_cache_dir() -> Path:
    """FORGETLAB_CACHE if set, else `.cache/forgetlab` in the repository."""
    return Path(os.environ.get("FORGETLAB_CACHE", REPO_ROOT / ".cache" / "forgetlab"))


def heal_from_env() -> bool:
    """FORGETLAB_CACHE_HEAL: 1/true/yes/on (the default when unset) or 0/false/no/off."""
    value = os.environ.get("FORGETLAB_CACHE_HEAL", "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"FORGETLAB_CACHE_HEAL = {value!r} is invalid: set it to 1 (heal corrupt cache entries) "
                     f"or 0 (stop with an error, for debugging)")


def cache_key(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def code_version(*modules: str) -> str:
    """Hash of the source files of the forgetlab modules that build an entry (e.g. ``code_version("training")``).

    Part of every cache key instead of hand-bumped version numbers: editing the code that builds an entry changes
    its key, so a stale entry is never loaded.
    """
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode() + b"\0" + (Path(__file__).with_name(f"{name}.py")).read_bytes())
    return h.hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; remember the other names as aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            aliases[name] = seen[ident]
        else:
            seen[ident] = name
            unique[name] = t.detach().cpu().contiguous()
    return unique, aliases


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


_held = threading.local()     # (root, kind, key) of the entry locks this thread holds


class ArtifactCache:
    """Folder of entries `<root>/<kind>/<key>/` each holding `meta.json` and optional files.

    heal: move a corrupt entry aside and rebuild it in :meth:`get_or_build` (default: FORGETLAB_CACHE_HEAL,
    on unless set to 0).
    """

    def __init__(self, root: Path | str | None = None, heal: bool | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.heal = heal_from_env() if heal is None else bool(heal)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lock_path(self, kind: str, key: str) -> Path:
        return self.root / ".locks" / kind / f"{key}.lock"

    def _scratch(self, kind: str) -> Path:
        """Where entries of `kind` are written before they are renamed in, and old ones wait to be deleted (the
        same file system as the entries, so renames are atomic; a folder of its own, so tidying up is cheap)."""
        return self.root / ".tmp" / kind

    # ------------------------------------------------------------------ locking

    @contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Hold the entry's inter-process lock. Not re-entrant: one thread taking it twice is a bug (raises)."""
        ident = (str(self.root.resolve()), kind, key)
        held: set = getattr(_held, "keys", None) or set()
        _held.keys = held
        if ident in held:
            raise RuntimeError(f"cache entry {kind}/{key} is already locked by this thread: a build must not "
                               f"read or write its own entry")
        path = self.lock_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=WAIT_NOTICE_S)
        except Timeout:
            print(f"[forgetlab] waiting for another process using cache entry {kind}/{key} (lock {path})",
                  flush=True)
            lock.acquire()
        held.add(ident)
        try:
            yield
        finally:
            held.discard(ident)
            lock.release()

    # ------------------------------------------------------------------ public API

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry is stored (not whether it is valid: `load` checks that)."""
        with self.lock(kind, key):
            self._tidy(kind, key)
            return (self.path(kind, key) / "meta.json").is_file()

    def save(self, kind: str, key: str, meta: dict, tensors: dict[str, torch.Tensor] | None = None,
             files: dict[str, str] | None = None) -> Path:
        """Write an entry atomically (temp folder, then a swap under the entry's lock); replace an older one."""
        with self.lock(kind, key):
            return self._save_locked(kind, key, meta, tensors, files)

    def load(self, kind: str, key: str, map_location: str | torch.device = "cpu") -> Entry:
        """Return (meta, tensors or None, text files); KeyError if absent, CacheCorruptError on any mismatch."""
        with self.lock(kind, key):
            return self._load_locked(kind, key, map_location)

    def get_or_build(self, kind: str, key: str, build: Callable[[], Built],
                     map_location: str | torch.device = "cpu") -> Entry:
        """The entry, loaded; if absent (or corrupt, when healing), ``build()`` it, save it and load it.

        ``build`` returns (meta, tensors or None, text files or None), like `save`'s arguments. It runs under
        the entry's lock, so concurrent processes asking for the same entry build it once.
        """
        with self.lock(kind, key):
            try:
                return self._load_locked(kind, key, map_location)
            except KeyError:
                pass
            except CacheCorruptError as exc:
                if not self.heal:
                    raise
                folder, moved = self.path(kind, key), self._quarantine(kind, key)
                warnings.warn(f"corrupt cache entry {folder} ({exc.problem}) was moved to {moved} for inspection "
                              f"and is being rebuilt (FORGETLAB_CACHE_HEAL=0 stops instead)",
                              CacheHealedWarning, stacklevel=2)
            meta, tensors, files = build()
            self._save_locked(kind, key, meta, tensors, files)
            return self._load_locked(kind, key, map_location)

    # ------------------------------------------------------------------ under the lock

    def _tidy(self, kind: str, key: str) -> None:
        """Clear what a process killed mid-save left behind (under the lock, nobody else is writing this entry):
        its temp folder, and the old entry it had moved aside; if it died between the two renames, the old
        entry is put back, so the last committed entry survives a kill at any point."""
        scratch, final = self._scratch(kind), self.path(kind, key)
        if not scratch.is_dir():
            return
        for stale in scratch.glob(f"{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        trash = sorted(scratch.glob(f"{key}.trash-*"), key=lambda p: p.stat().st_mtime)
        if trash and not final.exists():
            os.rename(trash.pop(), final)
        for stale in trash:
            shutil.rmtree(stale, ignore_errors=True)

    def _save_locked(self, kind: str, key: str, meta: dict, tensors: dict[str, torch.Tensor] | None,
                     files: dict[str, str] | None) -> Path:
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tidy(kind, key)
        self._scratch(kind).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=self._scratch(kind)))
        try:
            meta = dict(meta, key=key, kind=kind, checksums={})
            if tensors is not None:
                unique, aliases = _split_aliases(tensors)
                meta["aliases"] = aliases
                save_file(unique, str(tmp / WEIGHTS))
                meta["checksums"][WEIGHTS] = file_sha256(tmp / WEIGHTS)
            for name, text in (files or {}).items():
                if name in ("meta.json", WEIGHTS) or Path(name).name != name:
                    raise ValueError(f"cache file name {name!r} is reserved or not a plain file name: rename it")
                (tmp / name).write_text(text, encoding="utf-8")
                meta["checksums"][name] = file_sha256(tmp / name)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
            trash = None
            if final.exists():
                trash = self._scratch(kind) / f"{key}.trash-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(final, trash)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return final

    def _load_locked(self, kind: str, key: str, map_location: str | torch.device) -> Entry:
        folder = self.path(kind, key)
        fix = f"delete the folder {folder} and rerun to rebuild it"

        def corrupt(what: str) -> CacheCorruptError:
            return CacheCorruptError(f"cache entry {folder} {what}: {fix}", problem=what)

        self._tidy(kind, key)
        if not folder.is_dir():
            raise KeyError(f"no cache entry {kind}/{key}")
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise corrupt("is missing meta.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise corrupt(f"has unreadable meta.json ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("checksums", {}), dict):
            raise corrupt("has unreadable meta.json (not an entry's metadata)")
        if meta.get("key") != key or meta.get("kind") != kind:
            raise corrupt("holds another entry's metadata")
        checksums: dict = meta.get("checksums", {})
        texts: dict[str, str] = {}
        for name, digest in checksums.items():
            path = folder / name
            if Path(name).name != name or not path.is_file():
                raise corrupt(f"is missing {name}")
            if file_sha256(path) != digest:
                raise corrupt(f"has {name} that does not match its checksum")
            if name != WEIGHTS:
                texts[name] = path.read_text(encoding="utf-8")
        tensors = None
        if WEIGHTS in checksums:
            try:
                tensors = load_file(str(folder / WEIGHTS), device=str(map_location))
            except Exception as exc:           # unreadable despite its checksum: treat as corrupt, never crash deeper
                raise corrupt(f"has unreadable {WEIGHTS} ({exc})") from None
            aliases = meta.get("aliases", {})
            if not isinstance(aliases, dict) or not all(t in tensors for t in aliases.values()):
                raise corrupt("has aliases that name no stored tensor")
            for alias, target in aliases.items():
                tensors[alias] = tensors[target]
        return meta, tensors, texts

    def _quarantine(self, kind: str, key: str) -> Path:
        """Move a corrupt entry to `<root>/.corrupt/<kind>/<key>-<utc time>` (kept for inspection)."""
        dest = self.root / ".corrupt" / kind / f"{key}-{_utc_stamp()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path(kind, key), dest)
        return dest
