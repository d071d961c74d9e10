"""Peak memory of a process and all its descendants (a batch's kernels, notebook 06's worker processes).

``ru_maxrss`` reports one process at a time, and the resident sets of processes that map the same file (the
workers share SmolLM2's frozen weights) count those pages once each. The proportional set size (PSS) splits each
shared page between the processes that map it, so the sum over a process tree is the memory the tree holds.
:class:`TreePeakMemory` samples that sum on a background thread (Linux: ``/proc/<pid>/smaps_rollup``) and keeps
its peak; elsewhere it reports nothing.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

PROC = Path("/proc")


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (from /proc/<pid>/stat's parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:                          # ended while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def pss_mib(pid: int) -> float:
    """Proportional set size of one process, MiB (0 if it has ended or cannot be read)."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def tree_pss_mib(root: int | None = None) -> float:
    """Summed PSS of ``root`` (default: this process) and its descendants, MiB."""
    return sum(pss_mib(pid) for pid in descendants(root or os.getpid()))


class TreePeakMemory:
    """``with TreePeakMemory() as mem: ...`` then ``mem.peak_mib``: the peak summed PSS of this process and its
    descendants, sampled every ``interval`` seconds (None where /proc has no smaps_rollup)."""

    def __init__(self, root: int | None = None, interval: float = 0.5):
        self.root, self.interval = root or os.getpid(), interval
        self.available = (PROC / str(self.root) / "smaps_rollup").is_file()
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-peak-memory", daemon=True)

    @property
    def peak_mib(self) -> float | None:
        return self._peak if self.available else None

    def sample(self) -> None:
        self._peak = max(self._peak, tree_pss_mib(self.root))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "TreePeakMemory":
        """Sample now and then every ``interval`` seconds until :meth:`stop`."""
        if self.available:
            self.sample()
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, after one last sample."""
        if self.available:
            self._stop.set()
            self._thread.join()
            self.sample()

    def __enter__(self) -> "TreePeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
