"""Keeping memory-mapped columns out of the resident set: pages a pass has read are unmapped again.

Every-event splits are memory-mapped columns of several GB (177M samples at Taobao's size). Each page a
read touches stays mapped in the process - and counted in its RSS - until released, so one random pass
over an epoch, or one sequential pass building the loader's cache, would leave every column resident.
release_pages unmaps them (MADV_DONTNEED): they stay in the kernel's page cache, and the next read maps
a page again without I/O. Arrays held in RAM are left alone.
"""

from __future__ import annotations

import mmap
from typing import Iterator

import numpy as np

CHUNK_ROWS = 1 << 22  # rows per chunk of a sequential pass


def release_pages(*arrays: np.ndarray) -> None:
    """Unmaps the resident pages of each array's read-only memory map (once per map)."""
    released = set()
    for array in arrays:
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        if (isinstance(base, mmap.mmap) and not base.closed and id(base) not in released
                and not array.flags.writeable):  # read-only: never a copy-on-write map's private pages
            base.madvise(mmap.MADV_DONTNEED)
            released.add(id(base))


def chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """`array` a CHUNK_ROWS slice at a time, its pages released after each: a sequential pass at bounded RSS."""
    for start in range(0, len(array), CHUNK_ROWS):
        yield array[start:start + CHUNK_ROWS]
        release_pages(array)
