"""Specification of input_pipeline.batches: fixed-shape, padded, shuffled and sharded batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from input_pipeline import batches
from input_pipeline.dien import EncodedSplit

KEYS = ("uid", "mid", "cat", "hist_mids", "hist_cats", "hist_mask", "label", "weight", "user")


def make_split(lengths: list[int]) -> EncodedSplit:
    """Example i has uid i + 1 (so 0 marks padding) and history mids 1000 * i + 1, 1000 * i + 2, ..."""
    n = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hist_mids = np.concatenate([1000 * i + np.arange(1, k + 1) for i, k in enumerate(lengths)]).astype(np.int32)
    return EncodedSplit.from_offsets(
        offsets,
        label=(np.arange(n) % 2).astype(np.float32),
        uid=np.arange(1, n + 1, dtype=np.int32),
        mid=np.arange(101, n + 101, dtype=np.int32),
        cat=np.arange(201, n + 201, dtype=np.int32),
        hist_mids=hist_mids,
        hist_cats=hist_mids + 500,
        user=(np.arange(n) // 2).astype(np.int32),
    )


SPLIT = make_split([0, 3, 7, 1, 2])
LARGE = make_split([(7 * i) % 11 for i in range(23)])


def real_uids(batch_list: list[dict]) -> list[int]:
    """The uids of weight-1 rows, in batch order."""
    return [int(u) for b in batch_list for u, w in zip(b["uid"], b["weight"]) if w == 1]


def test_truncation_keeps_first_entries_by_default():
    batch = batches.make_batch(SPLIT, np.array([2, 1, 0]), max_seq_length=4)
    np.testing.assert_array_equal(batch["hist_mids"], [[2001, 2002, 2003, 2004],
                                                       [1001, 1002, 1003, 0],
                                                       [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["hist_cats"], [[2501, 2502, 2503, 2504],
                                                       [1501, 1502, 1503, 0],
                                                       [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["hist_mask"], [[True, True, True, True],
                                                       [True, True, True, False],
                                                       [False, False, False, False]])


def test_truncation_keep_last_keeps_newest_entries():
    batch = batches.make_batch(SPLIT, np.array([2, 1, 0]), max_seq_length=4, keep="last")
    np.testing.assert_array_equal(batch["hist_mids"], [[2004, 2005, 2006, 2007],
                                                       [1001, 1002, 1003, 0],
                                                       [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["hist_mask"], [[True, True, True, True],
                                                       [True, True, True, False],
                                                       [False, False, False, False]])


def test_unknown_keep_is_refused():
    with pytest.raises(ValueError, match="keep must be one of"):
        batches.make_batch(SPLIT, np.array([0]), 4, keep="newest")


def test_short_batch_is_padded_with_weight_zero_rows():
    batch = batches.make_batch(SPLIT, np.array([4, 3]), max_seq_length=3, batch_size=4)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "uid": ((4,), np.int32), "mid": ((4,), np.int32), "cat": ((4,), np.int32),
        "hist_mids": ((4, 3), np.int32), "hist_cats": ((4, 3), np.int32), "hist_mask": ((4, 3), bool),
        "label": ((4,), np.float32), "weight": ((4,), np.float32), "user": ((4,), np.int32),
    }
    np.testing.assert_array_equal(batch["weight"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["uid"], [5, 4, 0, 0])
    np.testing.assert_array_equal(batch["mid"], [105, 104, 0, 0])
    np.testing.assert_array_equal(batch["cat"], [205, 204, 0, 0])
    np.testing.assert_array_equal(batch["label"], [0, 1, 0, 0])
    np.testing.assert_array_equal(batch["user"], [2, 1, 0, 0])
    np.testing.assert_array_equal(batch["hist_mids"], [[4001, 4002, 0], [3001, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert not batch["hist_mask"][2:].any()


def test_num_batches_rounds_up():
    assert [batches.num_batches(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_train_batches_cover_every_example_once_per_epoch_with_fixed_shapes():
    epoch = list(batches.train_batches(LARGE, 5, 6, seed=0, epoch=0))
    assert len(epoch) == batches.num_batches(len(LARGE), 5) == 5
    assert sorted(real_uids(epoch)) == list(range(1, 24))
    assert all(b["hist_mids"].shape == (5, 6) for b in epoch)
    np.testing.assert_array_equal(epoch[-1]["weight"], [1, 1, 1, 0, 0])


def test_train_batches_rows_carry_their_own_history():
    for batch in batches.train_batches(LARGE, 4, 5, seed=3, epoch=1):
        for row in np.flatnonzero(batch["weight"]):
            i = batch["uid"][row] - 1
            history = LARGE.hist_mids[LARGE.hist_start[i]:][:LARGE.hist_lengths[i]][:5]
            np.testing.assert_array_equal(batch["hist_mids"][row, :len(history)], history)
            assert batch["hist_mask"][row].sum() == len(history)
            assert batch["mid"][row] == LARGE.mid[i] and batch["label"][row] == LARGE.label[i]


def test_train_order_is_fixed_by_seed_and_epoch():
    def order(seed, epoch):
        return real_uids(list(batches.train_batches(LARGE, 5, 4, seed=seed, epoch=epoch)))

    assert order(7, 0) == order(7, 0)
    assert order(7, 0) != order(7, 1)
    assert order(7, 0) != order(8, 0)
    assert order(7, 0) != sorted(order(7, 0))


def test_eval_batches_keep_file_order_and_lose_nothing():
    epoch = list(batches.eval_batches(LARGE, 10, 4))
    assert len(epoch) == 3
    assert real_uids(epoch) == list(range(1, 24))
    np.testing.assert_array_equal(epoch[-1]["weight"], [1, 1, 1] + [0] * 7)


@pytest.mark.parametrize("shard_count", [2, 4])
@pytest.mark.parametrize("make", [
    lambda **kw: batches.train_batches(LARGE, 8, 5, seed=1, epoch=2, **kw),
    lambda **kw: batches.eval_batches(LARGE, 8, 5, keep="last", **kw),
], ids=["train", "eval"])
def test_shards_concatenated_equal_the_unsharded_batches(make, shard_count):
    whole = list(make())
    shards = [list(make(shard_index=k, shard_count=shard_count)) for k in range(shard_count)]
    assert all(len(s) == len(whole) for s in shards)
    for step, batch in enumerate(whole):
        for key in KEYS:
            parts = [s[step][key] for s in shards]
            assert all(len(p) == 8 // shard_count for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), batch[key], err_msg=key)


def test_batch_size_not_divisible_by_shard_count_is_refused():
    with pytest.raises(ValueError, match="batch_size 6 must be divisible by shard_count 4"):
        batches.eval_batches(LARGE, 6, 4, shard_index=0, shard_count=4)


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and len(line.split()) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_reading_a_memory_mapped_split_leaves_its_pages_released(tmp_path):
    """Every RELEASE_EVERY_BATCHES batches the pages that reading a memory-mapped split made resident are
    unmapped again, so an epoch over columns of many GB does not grow the resident set by their size."""
    split = make_split([3, 0, 5, 2] * 256)
    path = tmp_path / "hist_mids.npy"
    np.save(path, np.repeat(split.hist_mids, 512))  # ~5 MB, all of it read below
    mapped = np.load(path, mmap_mode="r")
    split = dataclasses.replace(split, hist_mids=mapped)
    assert float(mapped[::1024].sum()) > 0 and _mapped_kb(path) > 4_000
    batch_list = list(batches.train_batches(split, 64, 4, seed=0, epoch=0))
    assert len(batch_list) % batches.RELEASE_EVERY_BATCHES == 0  # the last batch is followed by a release
    assert _mapped_kb(path) == 0
    assert float(mapped[::1024].sum()) > 0 and _mapped_kb(path) > 4_000  # readable as before, pages come back


def test_a_sequential_pass_over_a_mapped_column_leaves_no_page_resident(tmp_path, monkeypatch):
    """input_pipeline.mapped.chunks (the loader's cache build, the pack-size pass): pages released chunk by chunk."""
    from input_pipeline import mapped
    path = tmp_path / "column.npy"
    np.save(path, np.arange(4_000_000, dtype=np.int32))  # 16 MB
    column = np.load(path, mmap_mode="r")
    monkeypatch.setattr(mapped, "CHUNK_ROWS", 500_000)
    total, most = 0, 0
    for part in mapped.chunks(column):
        total += int(part.sum())
        most = max(most, _mapped_kb(path))
    assert total == 4_000_000 * 3_999_999 // 2  # every row read once
    # A 2 MB chunk (and the kernel's fault-around) at a time, never the whole 16 MB; nothing once done.
    assert 1_000 < most < 6_000 and _mapped_kb(path) == 0


def test_batches_of_a_memory_mapped_split_equal_those_in_ram_and_map_no_page(tmp_path):
    """Whole memory-mapped columns are read with pread (input_pipeline.mapped.take): the same batches, and reading
    them leaves nothing mapped (random reads through the map made ~400 MB resident per 512 on this kernel)."""
    split = make_split([3, 0, 60, 7, 1, 55] * 50)
    paths = {}
    for name in ("uid", "mid", "label", "hist_start", "hist_lengths", "hist_mids"):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], getattr(split, name))
    on_disk = dataclasses.replace(split, **{name: np.load(path, mmap_mode="r") for name, path in paths.items()})
    for keep, read in (("first", batches.train_batches), ("last", batches.train_batches),
                       ("first", batches.eval_batches)):  # eval: file order, one pread per column and batch
        options = {"seed": 3, "epoch": 1} if read is batches.train_batches else {}
        want = list(read(split, 64, 50, keep=keep, **options))
        got = list(read(on_disk, 64, 50, keep=keep, **options))
        for a, b in zip(want, got, strict=True):
            for key in KEYS:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
                assert a[key].dtype == b[key].dtype, key
        assert all(_mapped_kb(path) == 0 for path in paths.values())
