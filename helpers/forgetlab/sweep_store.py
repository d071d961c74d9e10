"""A sweep's unit folders on disk: written atomically, read only when complete and verified.

``<root>/units/<unit_id>/`` holds a finished unit: its files, then ``done.json`` (parameters, timings and
the SHA-256 of every file), written last. The folder is built as ``units/.tmp-<unit_id>-<random>/``, every
file fsynced, and renamed into place in one step, so a unit killed at any moment leaves at most a temp folder
that no reader looks at. ``<root>/failed/<unit_id>/failed.json`` records a unit that raised.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .cache import file_sha256

DONE = "done.json"
FAILED = "failed.json"
TEMP_PREFIX = ".tmp-"
FORMAT = 1


def sha256_synced(path: Path) -> str:
    """SHA-256 of a file, after forcing it to disk (files written by a subprocess are fsynced here too)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync, and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_unit_dir(units_dir: Path, unit_id: str) -> Path:
    """An empty temp folder on the same file system as the final unit folder (so the rename is atomic)."""
    units_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{unit_id}-", dir=units_dir))


def read_done(units_dir: Path, unit_id: str) -> dict | None:
    """The unit's done.json if the unit is complete and every file matches its checksum, else None."""
    folder = units_dir / unit_id
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("unit_id") != unit_id or not isinstance(done.get("checksums"), dict):
        return None
    for rel, digest in done["checksums"].items():
        path = folder / rel
        try:
            if not path.is_file() or file_sha256(path) != digest:
                return None
        except OSError:
            return None
    return done


def commit_unit(tmp: Path, units_dir: Path, unit_id: str, record: dict) -> Path:
    """Seal a unit built in `tmp`: checksum and fsync its files, write done.json last, rename into place.

    A folder already at the destination is kept if it is a valid finished unit (another run got there first;
    ours is dropped) and replaced otherwise (it was never complete).
    """
    checksums = {p.relative_to(tmp).as_posix(): sha256_synced(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json_atomic(tmp / DONE, dict(record, unit_id=unit_id, format=FORMAT, checksums=checksums))
    fsync_dir(tmp)
    final = units_dir / unit_id
    if final.exists():
        if read_done(units_dir, unit_id) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        stale = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}stale-{unit_id}-", dir=units_dir))
        os.replace(final, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(units_dir)
    return final


def clean_temp(units_dir: Path) -> int:
    """Delete temp folders left by units that were killed before they finished; return how many."""
    n = 0
    for p in units_dir.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def record_failure(failed_dir: Path, unit_id: str, index: int, swept: dict, params: dict, exc: BaseException,
                   seconds: float, tail_lines: int = 25) -> Path:
    """Write failed/<unit_id>/failed.json: the parameters, the error's type and message, the traceback tail."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
    path = failed_dir / unit_id / FAILED
    write_json_atomic(path, {"unit_id": unit_id, "index": index, "swept": swept, "parameters": params,
                             "error_type": type(exc).__name__, "error": str(exc)[-4000:],
                             "traceback_tail": tb[-tail_lines:], "seconds": round(seconds, 2),
                             "host": socket.gethostname(), "pid": os.getpid(),
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


def read_failure(failed_dir: Path, unit_id: str) -> dict | None:
    try:
        value = json.loads((failed_dir / unit_id / FAILED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def clear_failure(failed_dir: Path, unit_id: str) -> None:
    shutil.rmtree(failed_dir / unit_id, ignore_errors=True)
