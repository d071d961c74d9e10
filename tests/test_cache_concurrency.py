"""The cache under several processes: interleaved writers and readers, one build per missing entry, and
processes SIGKILLed in the middle of a save. Workers are forked processes (each with its own locks and file
descriptors, as two notebooks would have); forking skips re-importing torch, which keeps the tests fast."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import forgetlab.cache as fc
from forgetlab.cache import ArtifactCache

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forked workers and SIGKILL (Linux)")
FORK = multiprocessing.get_context("fork") if sys.platform == "linux" else None
SIZE = 1 << 16                                  # 256 KiB of float32: a save is not instant


def _wait_for_go(root: Path, name: str) -> ArtifactCache:
    torch.set_num_threads(1)
    (root / f"ready-{name}").touch()
    while not (root / "go").exists():
        time.sleep(0.005)
    return ArtifactCache(root)


def _entry(writer: int, count: int) -> tuple[dict, dict, dict]:
    w = torch.full((SIZE,), float(writer * 1000 + count))
    return {"writer": writer, "count": count}, {"w": w, "tied": w}, {"note.txt": f"{writer}-{count}"}


def _writer(root: Path, ident: int, saves: int) -> None:
    cache = _wait_for_go(root, f"writer-{ident}")
    errors, done = [], 0
    for count in range(saves):
        meta, tensors, files = _entry(ident, count)
        try:
            cache.save("models", "shared", meta, tensors=tensors, files=files)
            done += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    (root / f"result-writer-{ident}.json").write_text(json.dumps({"done": done, "errors": errors, "t": time.time()}))


def _reader(root: Path, ident: int, writers: int) -> None:
    cache = _wait_for_go(root, f"reader-{ident}")
    errors, done, seen = [], 0, set()
    deadline = time.time() + 60
    while time.time() < deadline and len(list(root.glob("result-writer-*"))) < writers:
        try:
            meta, tensors, files = cache.load("models", "shared")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        w, c = meta["writer"], meta["count"]
        expected_meta, expected, expected_files = _entry(w, c)
        if not (torch.equal(tensors["w"], expected["w"]) and tensors["tied"] is tensors["w"]
                and files == expected_files):
            errors.append(f"load of {w}-{c} differs from what was saved")
        done += 1
        seen.add((w, c))
    (root / f"result-reader-{ident}.json").write_text(json.dumps({"done": done, "errors": errors,
                                                                  "distinct": len(seen), "t": time.time()}))


def _builder(root: Path, ident: int) -> None:
    cache = _wait_for_go(root, f"builder-{ident}")

    def build():
        with open(root / "builds.log", "a") as f:
            f.write(f"{ident}\n")
        time.sleep(1.0)                         # a slow build: the others must wait, not build too
        return {"builder": ident}, {"w": torch.arange(1000.0)}, {"note.txt": "built"}

    meta, tensors, files = cache.get_or_build("models", "missing", build)
    (root / f"result-builder-{ident}.json").write_text(json.dumps(
        {"builder": meta["builder"], "sum": float(tensors["w"].sum()), "files": files}))


def _start(target, *args) -> multiprocessing.Process:
    proc = FORK.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _go(root: Path, procs: list, timeout: float = 30.0) -> float:
    """Release the workers once every one of them is waiting."""
    deadline = time.time() + timeout
    while len(list(root.glob("ready-*"))) < len(procs):
        assert time.time() < deadline, "workers did not start"
        time.sleep(0.01)
    (root / "go").touch()
    return time.time()


def _results(root: Path, procs: list, role: str) -> list[dict]:
    for p in procs:
        p.join(timeout=90)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    return [json.loads(f.read_text()) for f in sorted(root.glob(f"result-{role}-*.json"))]


def test_interleaved_writers_and_readers_see_only_whole_entries(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.save("models", "shared", *_entry(9, 0)[:1], tensors=_entry(9, 0)[1], files=_entry(9, 0)[2])
    n_writers, saves_each, n_readers = 3, 20, 2
    procs = [_start(_writer, tmp_path, i, saves_each) for i in range(n_writers)]
    procs += [_start(_reader, tmp_path, i, n_writers) for i in range(n_readers)]
    go = _go(tmp_path, procs)
    writers, readers = _results(tmp_path, procs, "writer"), _results(tmp_path, procs, "reader")
    report = {"saves": sum(r["done"] for r in writers), "loads": sum(r["done"] for r in readers),
              "distinct_entries_read": sum(r["distinct"] for r in readers),
              "errors": [e for r in writers + readers for e in r["errors"]],
              "seconds": round(max(r["t"] for r in writers + readers) - go, 2)}
    print("concurrency:", json.dumps(report))
    assert report["errors"] == []
    assert report["saves"] == n_writers * saves_each
    assert len(readers) == n_readers and all(r["done"] > 0 for r in readers)
    meta, tensors, _ = cache.load("models", "shared")               # the last save wins, whole
    assert meta["count"] == saves_each - 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["shared"]
    assert list((tmp_path / ".tmp" / "models").iterdir()) == []        # no temp or trash left


def test_concurrent_get_or_build_builds_once(tmp_path):
    procs = [_start(_builder, tmp_path, i) for i in range(3)]
    _go(tmp_path, procs)
    results = _results(tmp_path, procs, "builder")
    builds = (tmp_path / "builds.log").read_text().split()
    print("builds:", builds, "results:", results)
    assert len(builds) == 1 and len(results) == 3                    # one process built, the others loaded
    assert all(r == results[0] for r in results) and results[0]["builder"] == int(builds[0])
    assert results[0]["sum"] == sum(range(1000)) and results[0]["files"] == {"note.txt": "built"}


def _killed_save(root: Path, where: str) -> None:
    """A save that stops, killable, at a chosen point: half-way through writing the weights, between moving the
    old entry aside and renaming the new one in (the two renames of a replacement), or inside a build."""
    torch.set_num_threads(1)

    def stop(*_):
        (root / "stopped").touch()
        time.sleep(120)

    if where == "weights":
        real_save_file = fc.save_file

        def half_save(tensors, path):
            real_save_file(tensors, path)
            blob = Path(path).read_bytes()
            Path(path).write_bytes(blob[: len(blob) // 2])
            stop()

        fc.save_file = half_save                 # this process only: the test's own module is untouched
    elif where == "swap":
        real_rename, calls = os.rename, []

        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:                  # the old entry is aside, the new one not yet in place
                stop()
            real_rename(a, b)

        fc.os.rename = rename
    cache = fc.ArtifactCache(root)
    if where == "build":
        cache.get_or_build("models", "k", stop)
    else:
        cache.save("models", "k", {"version": 2}, tensors={"w": torch.full((1000,), 2.0)})


def _kill_when_stopped(root: Path, where: str) -> None:
    proc = _start(_killed_save, root, where)
    deadline = time.time() + 60
    while not (root / "stopped").exists():
        assert proc.is_alive(), f"the save ended (exit code {proc.exitcode}) before the kill point"
        assert time.time() < deadline, "the save never reached the kill point"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("where", ["weights", "swap", "build"])
def test_sigkill_mid_save_never_exposes_a_half_written_entry(tmp_path, where):
    cache = ArtifactCache(tmp_path, heal=False)          # a half-written entry must not exist, not be healed
    if where != "build":                                   # the child replaces a committed entry
        cache.save("models", "k", {"version": 1}, tensors={"w": torch.full((1000,), 1.0)})
    _kill_when_stopped(tmp_path, where)
    if where == "weights":
        assert list((tmp_path / ".tmp" / "models").glob("k.tmp-*"))   # the dead writer's half-written folder
    if where == "swap":
        assert not (tmp_path / "models" / "k").exists()       # died between the renames
    t0 = time.perf_counter()
    if where == "build":
        with pytest.raises(KeyError):                         # nothing was saved, and the lock is free
            cache.load("models", "k")
    else:
        meta, tensors, _ = cache.load("models", "k")          # the last committed entry, whole
        assert meta["version"] == 1 and torch.equal(tensors["w"], torch.full((1000,), 1.0))
    meta, tensors, _ = cache.get_or_build("models", "k", lambda: ({"version": 3}, {"w": torch.zeros(3)}, None))
    waited = time.perf_counter() - t0
    print(f"{where}: load and get_or_build after SIGKILL took {waited:.2f} s")
    assert waited < 5.0                                       # the dead process's lock did not block
    assert meta["version"] == (3 if where == "build" else 1)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["k"]
    assert list((tmp_path / ".tmp" / "models").iterdir()) == []        # its leftovers were cleared
