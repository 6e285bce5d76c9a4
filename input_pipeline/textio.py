"""Reading plain or gzip text files with clear errors, and writing outputs atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import queue
import tempfile
import threading
import zlib
from typing import IO, Callable, Iterator

from input_pipeline.errors import DataError, bad_file


def _check_readable(path: str | os.PathLike) -> None:
    if not os.path.exists(path):
        raise bad_file(path, "no such file", "check the path")
    if os.path.isdir(path):
        raise bad_file(path, "is a directory, not a file", "name the file inside it")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole (decompressed, for *.gz) content of `path`; a truncated or corrupt gzip is a DataError."""
    _check_readable(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (EOFError, OSError, zlib.error) as e:
        raise bad_file(path, f"unreadable gzip stream ({e})",
                       "the file is truncated or corrupt: download or copy it again") from None


@contextlib.contextmanager
def open_lines(path: str | os.PathLike) -> Iterator[Iterator[tuple[int, bytes]]]:
    """Streams (1-based line number, line without its '\\n' / '\\r\\n') from a plain or gzip file."""
    _check_readable(path)
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    handle: IO[bytes] = gzip.open(path, "rb") if is_gzip else open(path, "rb")

    def lines() -> Iterator[tuple[int, bytes]]:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):
                yield number, line.rstrip(b"\r\n")
        except (EOFError, OSError, zlib.error) as e:
            raise bad_file(path, f"unreadable gzip stream after line {number} ({e})",
                           "the file is truncated or corrupt: download or copy it again") from None

    try:
        yield lines()
    finally:
        handle.close()


@dataclasses.dataclass(frozen=True)
class LineBlock:
    """Whole lines of a file: `data` starts at 1-based line `first_line` and holds `lines` lines."""

    first_line: int
    data: bytes  # every line ends with b"\n", except perhaps the file's last one
    lines: int
    position: int  # bytes of the (compressed) file read so far, for progress bars


_END = object()


@contextlib.contextmanager
def line_blocks(path: str | os.PathLike, block_bytes: int = 4 << 20) -> Iterator[Iterator[LineBlock]]:
    """Streams blocks of about `block_bytes` whole lines from a plain or gzip file.

    A background thread reads and decompresses (zlib releases the GIL), so decompression overlaps
    with whatever the caller does with the previous blocks; at most three blocks wait in between.
    A truncated or corrupt gzip stream is a DataError raised after the blocks of its complete lines.
    Multi-member gzip files (pigz, bgzip, concatenated .gz) are read whole.
    """
    _check_readable(path)
    blocks: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                blocks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        line = 1
        try:
            with open(path, "rb") as f:
                is_gzip = f.read(2) == b"\x1f\x8b"
                f.seek(0)
                pieces = _gunzip(f, block_bytes) if is_gzip else iter(lambda: f.read(block_bytes), b"")
                tail = b""
                for piece in pieces:
                    cut = piece.rfind(b"\n") + 1
                    if not cut:  # a line longer than a block
                        tail += piece
                        continue
                    data = b"".join((tail, memoryview(piece)[:cut])) if tail or cut < len(piece) else piece
                    tail = piece[cut:]
                    count = data.count(b"\n")
                    if not put(LineBlock(line, data, count, f.tell())):
                        return
                    line += count
                if tail:
                    put(LineBlock(line, tail, 1, f.tell()))
            put(_END)
        except (EOFError, OSError, zlib.error) as e:
            put(bad_file(path, f"unreadable gzip stream after line {line - 1} ({e})",
                         "the file is truncated or corrupt: download or copy it again"))
        except BaseException as e:  # handed to the reading thread, which raises it
            put(e)

    def consume() -> Iterator[LineBlock]:
        while (item := blocks.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=produce, name=f"line_blocks:{os.path.basename(path)}", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def _gunzip(f: IO[bytes], size: int) -> Iterator[bytes]:
    """Decompressed pieces (at most `size` bytes each) of every gzip member in `f`, as gzip.open reads them."""
    member = None  # None between members, where zero padding is skipped as gzip.open does
    while raw := f.read(1 << 20):
        while raw:
            if member is None:
                raw = raw.lstrip(b"\x00")
                if not raw:
                    break
                member = zlib.decompressobj(wbits=31)
            while True:  # with output capped at `size`, call again until zlib holds nothing back
                out = member.decompress(raw, size)
                raw = member.unconsumed_tail
                if out:
                    yield out
                if member.eof or (not raw and len(out) < size):
                    break
            if member.eof:
                raw, member = member.unused_data, None
    if member is not None:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _temp_beside(path: str) -> tuple[int, str]:
    """A new temporary file next to `path` with the usual permissions (mkstemp's are 0600)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Writes to a temporary file beside `path` and renames it over `path` only on success."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fd, tmp = _temp_beside(os.fspath(path))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike) -> Iterator[Callable[[str], IO[bytes]]]:
    """Yields `open(name)` for binary files in `directory`, renamed into place together on success.

    Each file is written to a temporary name and synced; only when the block ends without an error
    are they all renamed over their targets, so an error leaves every old file as it was (and a
    directory created here is removed again).
    """
    directory = os.fspath(directory)
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    pending: list[tuple[IO[bytes], str, str]] = []

    def open_output(name: str) -> IO[bytes]:
        path = os.path.join(directory, name)
        fd, tmp = _temp_beside(path)
        f = os.fdopen(fd, "wb")
        pending.append((f, tmp, path))
        return f

    try:
        yield open_output
        for f, _, _ in pending:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for _, tmp, path in pending:
            os.replace(tmp, path)
    except BaseException:
        for f, tmp, _ in pending:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


__all__ = ["DataError", "LineBlock", "read_bytes", "open_lines", "line_blocks", "atomic_write", "atomic_files"]
