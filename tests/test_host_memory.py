"""Importing din_jax makes malloc reuse freed large blocks instead of mapping fresh, page-faulting memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: mallopt settings are process-wide and last. Allocates and frees a 48 MiB
# block (above glibc's largest mmap threshold, below a thread arena's 64 MiB heap: the size of a
# long-history train step's XLA scratch) six times from the main thread and from a worker thread, writing
# every page each time, and reports the minor page faults of the last five rounds. A 24 MiB block held
# meanwhile leaves a thread's first heap too small, so there the 48 MiB come from a heap of their own,
# which glibc unmaps as soon as it is wholly free unless M_TOP_PAD says to keep it.
_PROBE = r"""
import ctypes, json, resource, sys, threading
import din_jax
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 48 << 20

def rounds(out, key):
    held = libc.malloc(24 << 20)  # keeps part of this thread's first heap: the block needs a second one
    ctypes.memset(held, 1, 24 << 20)
    faults = 0
    for i in range(6):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(ctypes.c_void_p(block))
        if i:
            faults += resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    out[key] = faults
    libc.free(ctypes.c_void_p(held))

out = {}
rounds(out, "main")
worker = threading.Thread(target=rounds, args=(out, "thread"))
worker.start(); worker.join()
print(json.dumps(out))
"""
PAGES = (48 << 20) // 4096


def probe(script: str, reuse: str) -> dict[str, int]:
    """The JSON that `script` prints last, run in a fresh interpreter with DIN_JAX_REUSE_HOST_MEMORY=reuse."""
    env = dict(os.environ, DIN_JAX_REUSE_HOST_MEMORY=reuse)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_freed_large_blocks_are_reused_without_page_faults():
    kept, default = probe(_PROBE, "1"), probe(_PROBE, "0")
    # glibc's default maps every such block afresh: each round faults its pages in again.
    assert default["main"] > 4 * PAGES and default["thread"] > 4 * PAGES
    # With din_jax's settings the block comes back from the heap, its pages already resident.
    assert kept["main"] < PAGES // 10 and kept["thread"] < PAGES // 10


_HOLES = r"""
import ctypes, json
import din_jax
from din_jax import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

blocks = [libc.malloc(1 << 20) for _ in range(40)]
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
pin = libc.malloc(4096)  # above the blocks: their space is a hole in the heap, not its free top
for block in blocks:
    libc.free(ctypes.c_void_p(block))
held = rss()
host_memory.release_free_memory()
print(json.dumps({"held": held, "released": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim (Linux)")
def test_release_gives_freed_holes_back():
    sizes = probe(_HOLES, "1")
    # The 40 MiB freed below a live block stay resident until released, then go back to the system.
    assert sizes["held"] - sizes["released"] > 30 << 20
