"""Keeps freed host memory in the process, so that XLA:CPU's per-step scratch buffer stops page-faulting.

XLA:CPU mallocs each execution's temporary buffer and frees it when the step ends (51 MB for a
long-history train step of batch 512). glibc serves a request that large with a fresh mmap and unmaps it
on free, so every step touched ~12k new pages, which the kernel faulted in and zeroed: 22-27 ms of system
time per step on 2 cores, a 34 ms step instead of 21. Three malloc settings make the next step reuse the
same pages:
  - M_MMAP_MAX 0: large blocks come from the heap instead of their own mmap;
  - M_TRIM_THRESHOLD 64 MiB: a heap's free top is given back only past that (a thread arena's heap
    holds at most 64 MiB, so a scratch it holds stays);
  - M_TOP_PAD 64 MiB: a thread arena keeps an extra heap that falls free instead of unmapping it at once
    (glibc does so when the previous heap has less room than the pad; without it, the scratch landed in
    such a heap in some runs and faulted in again every step).
A scratch over 64 MiB (long histories at batch 1024 and more) is still mapped afresh by the XLA thread
that asks for it: glibc cannot hold it in a thread arena. Starting Python with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 makes those maps transparent huge pages (a batch-2048 step 165 ->
89 ms here); it must be set before the process starts.

What a phase frees (loading the data, compiling, a checkpoint's host copies) now stays in the heap, so
training calls release_free_memory between phases. Applied when din_jax is imported (din_jax/__init__.py),
on glibc only; DIN_JAX_REUSE_HOST_MEMORY=0 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os

ENV = "DIN_JAX_REUSE_HOST_MEMORY"
# mallopt parameters (glibc's malloc.h) and the values set
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 64 << 20), (M_TOP_PAD, 64 << 20))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None under another C library (musl, macOS), whose malloc is left alone.

    The process's own symbols (dlopen(NULL)), which include the C library Python runs on: no library search
    (ctypes.util.find_library runs ldconfig in a subprocess, 10-16 ms of every `import din_jax`)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it, and only glibc's mallopt takes these parameters
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory for reuse (see the module docstring); whether it did.

    False where it does not apply: DIN_JAX_REUSE_HOST_MEMORY=0, or a C library that is not glibc.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    return libc is not None and all([bool(libc.mallopt(parameter, value)) for parameter, value in SETTINGS])


def release_free_memory() -> None:
    """Gives the heap's free pages back to the system (glibc's malloc_trim), where a phase ends.

    With malloc's mmap off, what a phase frees stays in the heap, partly as holes later blocks do not fill;
    trimming them keeps the process's memory to what it holds. It walks the heap (milliseconds), so it is
    called between phases, not per step.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
