"""benchmarks.compare reads a server's resident memory over its whole process tree (chatstream's
engine or tokenizer workers are children of the server): a parent that holds little and a child
that holds 200 MiB count together."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from benchmarks.compare import ServerMemory, process_tree, tree_memory_kib

CHILD = "import sys, time; block = bytearray(200 << 20); print('ready', flush=True); time.sleep(60)"
PARENT = (
    "import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=sys.stdout); "
    "child.wait()"
)


def test_memory_is_summed_over_the_servers_process_tree() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
        watch = ServerMemory(parent.pid)
        time.sleep(0.5)
        figures = watch.finish()
        own_rss = tree_memory_kib(tree[0])[0] - tree_memory_kib(tree[1])[0]
        child_rss, child_hwm = tree_memory_kib(tree[1])
        assert child_rss >= 200 << 10 and child_hwm >= child_rss  # bytearray zero-fills: resident
        assert own_rss < 100 << 10
        for key in ("ready", "sampled_peak", "peak", "steady"):
            assert figures[key] >= 200, (key, figures)  # MiB: the child's block counted
    finally:
        for pid in tree[1:]:  # the child first: once the parent is gone it is no longer in its tree
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
