"""A content-addressed cache of trained artifacts: safetensors weights plus JSON metadata.

An entry's key is a hash of everything that determines it (parameters, data fingerprint, code
version). Entries are written to a temporary folder and renamed into place, so a crash never
leaves a half-written entry; on load, the weights' SHA-256 is checked against the metadata.
Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]


class CacheCorruptError(RuntimeError):
    """A cache entry failed verification; the message names the folder to delete."""


def default_cache_dir() -> Path:
    """FORGETLAB_CACHE if set, else `.cache/forgetlab` in the repository."""
    return Path(os.environ.get("FORGETLAB_CACHE", REPO_ROOT / ".cache" / "forgetlab"))


def cache_key(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
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


class ArtifactCache:
    """Folder of entries `<root>/<kind>/<key>/` each holding `meta.json` and optional files."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "meta.json").is_file()

    def save(self, kind: str, key: str, meta: dict, tensors: dict[str, torch.Tensor] | None = None,
             files: dict[str, str] | None = None) -> Path:
        """Write an entry atomically: build it in a temp folder, then rename into place."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            meta = dict(meta, key=key, kind=kind, checksums={})
            if tensors is not None:
                unique, aliases = _split_aliases(tensors)
                meta["aliases"] = aliases
                save_file(unique, str(tmp / "weights.safetensors"))
                meta["checksums"]["weights.safetensors"] = _sha256(tmp / "weights.safetensors")
            for name, text in (files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
                meta["checksums"][name] = _sha256(tmp / name)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def load(self, kind: str, key: str, map_location: str | torch.device = "cpu"
             ) -> tuple[dict, dict[str, torch.Tensor] | None, dict[str, str]]:
        """Return (meta, tensors or None, text files); raise CacheCorruptError on any mismatch."""
        folder = self.path(kind, key)
        fix = f"delete the folder {folder} and rerun to rebuild it"
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyError(f"no cache entry {kind}/{key}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheCorruptError(f"cache entry {folder} has unreadable meta.json ({exc}): {fix}") from None
        if meta.get("key") != key or meta.get("kind") != kind:
            raise CacheCorruptError(f"cache entry {folder} holds another entry's metadata: {fix}")
        texts: dict[str, str] = {}
        for name, digest in meta.get("checksums", {}).items():
            path = folder / name
            if not path.is_file():
                raise CacheCorruptError(f"cache entry {folder} is missing {name}: {fix}")
            if _sha256(path) != digest:
                raise CacheCorruptError(f"cache entry {folder}: {name} does not match its checksum: {fix}")
            if name != "weights.safetensors":
                texts[name] = path.read_text(encoding="utf-8")
        tensors = None
        if "weights.safetensors" in meta.get("checksums", {}):
            tensors = load_file(str(folder / "weights.safetensors"), device=str(map_location))
            for alias, target in meta.get("aliases", {}).items():
                tensors[alias] = tensors[target]
        return meta, tensors, texts
