"""Peak memory of a process tree (tree_memory): the children are found and their memory counted."""
import subprocess
import sys
import time

import pytest

from forgetlab import tree_memory

pytestmark = pytest.mark.skipif(not tree_memory.TreePeakMemory().available, reason="needs /proc/<pid>/smaps_rollup")

CHILD = "import sys, time; b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); " \
        "print('ready', flush=True); time.sleep(30)"


def test_a_child_holding_200_mib_is_found_and_counted():
    before = tree_memory.tree_pss_mib()
    with tree_memory.TreePeakMemory(interval=0.05) as mem:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            assert child.pid in tree_memory.descendants(tree_memory.os.getpid())
            assert tree_memory.pss_mib(child.pid) >= 200            # every page of the bytearray touched
            time.sleep(0.3)                                          # a few samples while it holds the memory
        finally:
            child.kill()
            child.wait()
    assert mem.peak_mib >= before + 200
    assert tree_memory.pss_mib(child.pid) == 0.0                      # ended: nothing to read


def test_descendants_of_a_process_without_children_is_itself():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert tree_memory.descendants(proc.pid) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
