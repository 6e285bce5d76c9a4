"""Keeping memory-mapped columns out of the resident set.

Every-event splits are memory-mapped columns of several GB (177M samples at Taobao's size). Each page a
read through a map touches stays mapped in the process - and counted in its RSS - until released, and a
random read maps a whole page-cache folio around it. So random batches read whole-file columns with pread
(take, take_runs), which maps nothing; sequential passes (the loader's cache build, the pack-size pass)
read through the map a chunk at a time and unmap each chunk (chunks, release_pages: MADV_DONTNEED, the
pages stay in the kernel's page cache). Arrays held in RAM are left alone.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterator

import numpy as np

CHUNK_ROWS = 1 << 22  # rows per chunk of a sequential pass


def release_pages(*arrays: np.ndarray) -> None:
    """Unmaps the resident pages of each array's read-only memory map (once per map)."""
    _advise(arrays, mmap.MADV_DONTNEED)


def take(column: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """column[indices] (1-d); a whole memory-mapped .npy column is read with pread instead, one call per run of
    consecutive indices (a random batch: one per index; a batch in file order, as evaluation reads: one).

    Random reads through a map make whole page-cache folios resident: on this machine's kernel (6.18) 512 random
    4-byte reads of a mapped column mapped ~400 MB, whatever madvise said (MADV_RANDOM, MADV_NOHUGEPAGE). pread
    copies the bytes out of the page cache and maps nothing: ~1.7 us a read, ~6 ms for a random batch's 3.6k.
    """
    source = _file_of(column)
    if source is None:
        return column[indices]
    indices = np.asarray(indices, np.int64)
    if not len(indices):
        return np.zeros(0, column.dtype)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1  # where a run of consecutive indices ends
    return _pread_runs(source, column.dtype, indices[np.r_[0, breaks]], np.diff(np.r_[0, breaks, len(indices)]))


def take_runs(column: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The runs column[start:start + length] one after another (histories); one pread per run for a whole
    memory-mapped .npy column (see take)."""
    source = _file_of(column)
    if source is None:
        positions = np.arange(int(lengths.max(initial=0)))
        return column[(starts[:, None] + positions)[positions < lengths[:, None]]]
    return _pread_runs(source, column.dtype, starts, lengths)


def _pread_runs(source: tuple[str, int], dtype: np.dtype, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The runs [start, start + length) of the .npy data at `source` (path, data offset), read with pread."""
    path, offset = source
    size = dtype.itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b"".join([os.pread(fd, size * n, offset + size * s)
                         for s, n in zip(starts.tolist(), lengths.tolist()) if n])
    finally:
        os.close(fd)
    return np.frombuffer(data, dtype)


def _file_of(column: np.ndarray) -> tuple[str, int] | None:
    """(path, data offset) of a read-only np.memmap over a whole file's array (np.load's), else None."""
    if (type(column) is np.memmap and isinstance(column.base, mmap.mmap) and column.filename is not None
            and not column.flags.writeable and column.ndim == 1):
        return column.filename, column.offset
    return None


def _advise(arrays: tuple[np.ndarray, ...], advice: int) -> None:
    """madvise(advice) on the read-only memory map under each array, once per map; arrays in RAM are skipped."""
    done = set()
    for array in arrays:
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        if (isinstance(base, mmap.mmap) and not base.closed and id(base) not in done
                and not array.flags.writeable):  # read-only: never a copy-on-write map's private pages
            base.madvise(advice)
            done.add(id(base))


def chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """`array` a CHUNK_ROWS slice at a time, its pages released after each: a sequential pass at bounded RSS."""
    for start in range(0, len(array), CHUNK_ROWS):
        yield array[start:start + CHUNK_ROWS]
        release_pages(array)
