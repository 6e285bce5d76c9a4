"""Reading plain or gzip text files with clear errors, and writing outputs atomically."""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import zlib
from typing import IO, Iterator

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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Writes to a temporary file beside `path` and renames it over `path` only on success."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs should get the usual permissions
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


__all__ = ["DataError", "read_bytes", "open_lines", "atomic_write"]
