"""Specification of input_pipeline.textio: streaming line blocks, atomic outputs."""

from __future__ import annotations

import gzip
import os
import stat
import threading

import pytest

from input_pipeline import textio
from input_pipeline.errors import DataError

TEXT = b"".join(b"line %d %s\n" % (i, b"x" * (i % 37)) for i in range(1, 301)) + b"last line without newline"


def blocks_of(path, block_bytes: int = 64) -> list[textio.LineBlock]:
    """Every block of `path`, checked to hold whole, consecutively numbered lines."""
    with textio.line_blocks(path, block_bytes) as blocks:
        found = list(blocks)
    number = 1
    for block in found:
        assert block.first_line == number and block.lines == len(block.data.splitlines())
        assert block.data.endswith(b"\n") or block is found[-1]
        number += block.lines
    return found


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_blocks_hold_whole_lines_of_the_file(tmp_path, compress):
    path = tmp_path / "f"
    path.write_bytes(gzip.compress(TEXT) if compress else TEXT)
    found = blocks_of(path)
    assert len(found) > 10
    assert b"".join(block.data for block in found) == TEXT
    assert found[-1].position == os.path.getsize(path)


def test_a_line_longer_than_a_block_stays_whole(tmp_path):
    text = b"short\n" + b"y" * 1000 + b"\nend\n"
    (tmp_path / "f.gz").write_bytes(gzip.compress(text))
    found = blocks_of(tmp_path / "f.gz", 64)
    assert b"".join(block.data for block in found) == text
    assert any(b"\n" + b"y" * 1000 + b"\n" in b"\n" + block.data for block in found)


def test_crlf_and_blank_lines_are_kept_as_they_are(tmp_path):
    text = b"a\r\n\r\n\nb\r\n"
    (tmp_path / "f").write_bytes(text)
    [block] = blocks_of(tmp_path / "f", 1 << 20)
    assert (block.data, block.lines) == (text, 4)


def test_empty_file_has_no_blocks(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    assert blocks_of(tmp_path / "f") == []


def test_multi_member_gzip_with_zero_padding_reads_whole(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(TEXT[:1000]) + gzip.compress(TEXT[1000:]) + b"\x00" * 5)
    assert b"".join(block.data for block in blocks_of(path)) == TEXT


def test_highly_compressible_data_comes_in_bounded_pieces(tmp_path):
    text = (b"z" * 100_000 + b"\n") * 40  # 4 MB from a few KB: zlib is asked for it piece by piece
    (tmp_path / "f.gz").write_bytes(gzip.compress(text))
    found = blocks_of(tmp_path / "f.gz", 1 << 16)
    assert b"".join(block.data for block in found) == text
    assert max(len(block.data) for block in found) <= 2 * 100_001


def test_truncated_gzip_gives_the_complete_lines_then_a_data_error(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(TEXT)[:-200])
    found = []
    with pytest.raises(DataError, match=r"f\.gz: unreadable gzip stream after line (\d+) .*truncated or corrupt"
                       ) as error, textio.line_blocks(path, 64) as blocks:
        for block in blocks:
            found.append(block)
    data = b"".join(block.data for block in found)
    assert TEXT.startswith(data) and data.endswith(b"\n") and len(data) > len(TEXT) // 2
    complete_lines = data.count(b"\n")
    assert f"after line {complete_lines} " in str(error.value)


def test_garbage_after_the_gzip_stream_is_a_data_error(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(TEXT) + b"not gzip")
    with pytest.raises(DataError, match="unreadable gzip stream"):
        blocks_of(path)


def test_leaving_early_stops_the_reading_thread(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(TEXT * 50))
    before = threading.active_count()
    with textio.line_blocks(path, 64) as blocks:
        next(blocks)
    assert threading.active_count() == before


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        with textio.line_blocks(tmp_path / "missing.json.gz"):
            pass


def test_atomic_files_replace_targets_together_on_success(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    with textio.atomic_files(tmp_path) as create:
        create("a").write(b"new a")
        create("b").write(b"new b")
        assert (tmp_path / "a").read_bytes() == b"old a" and not (tmp_path / "b").exists()
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b"new b"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o666 & ~umask


def test_atomic_files_leave_everything_as_it_was_on_error(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    with pytest.raises(RuntimeError), textio.atomic_files(tmp_path) as create:
        create("a").write(b"new a")
        create("b").write(b"new b")
        raise RuntimeError("failed half way")
    assert sorted(os.listdir(tmp_path)) == ["a"] and (tmp_path / "a").read_bytes() == b"old a"


def test_atomic_files_remove_a_directory_they_created_on_error(tmp_path):
    with pytest.raises(RuntimeError), textio.atomic_files(tmp_path / "out") as create:
        create("a").write(b"data")
        raise RuntimeError
    assert not (tmp_path / "out").exists()
