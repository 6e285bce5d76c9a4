"""Fixed-shape numpy batches from an EncodedSplit: shuffle, truncate, pad, shard per process.

Every batch has fixed shapes: histories are cut or padded to T = max_seq_length (or, with length
bucketing, to their bucket's width: a few shapes, each compiled once), and a short last batch is
filled with weight-0 rows, so no example is dropped. With shard_count processes, each takes its contiguous share of every global batch,
so N processes together see exactly the batches one process would.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from input_pipeline import mapped, permutation
from input_pipeline.dien import EncodedSplit

KEEP_CHOICES = ("first", "last")
# Batches between two releases of a memory-mapped split's pages (release_mapped_pages). Whole-file columns (every-
# event splits) are read with pread and map nothing; this bounds the others (views of a mapped cache), whose random
# reads map whole page-cache folios (see input_pipeline.mapped.take).
RELEASE_EVERY_BATCHES = 8


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch when the last partial batch is padded: ceil(num_examples / batch_size)."""
    return -(-num_examples // batch_size)


def make_batch(split: EncodedSplit, indices: np.ndarray, max_seq_length: int, keep: str = "first",
               batch_size: int | None = None) -> dict[str, np.ndarray]:
    """The examples `indices` as fixed-shape arrays, padded with weight-0 rows up to `batch_size`.

    Histories longer than T = max_seq_length keep their first (oldest) T entries, as DeepRec
    does, or with keep='last' their newest T. Padded positions hold id 0 with mask False.
    """
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    size = n if batch_size is None else batch_size
    if n > size:
        raise ValueError(f"{n} indices do not fit in a batch of {size}")
    starts = mapped.take(split.hist_start, indices).astype(np.int64)
    lengths = mapped.take(split.hist_lengths, indices).astype(np.int64)
    if keep == "last":
        starts = starts + np.maximum(lengths - max_seq_length, 0)
    kept = np.minimum(lengths, max_seq_length)
    mask = np.zeros((size, max_seq_length), bool)
    mask[:n] = np.arange(max_seq_length) < kept[:, None]  # [n, T]
    return {
        "uid": _padded(split.uid, indices, size),
        "mid": _padded(split.mid, indices, size),
        "cat": _padded(split.cat, indices, size),
        "hist_mids": _scattered(mapped.take_runs(split.hist_mids, starts, kept), mask),
        "hist_cats": _scattered(mapped.take_runs(split.hist_cats, starts, kept), mask),
        "hist_mask": mask,
        "label": _padded(split.label, indices, size),
        "weight": (np.arange(size) < n).astype(np.float32),
        "user": _padded(split.user, indices, size),
    }


def _padded(column: np.ndarray, indices: np.ndarray, size: int) -> np.ndarray:
    """column[indices] followed by zeros up to `size` rows."""
    out = np.zeros(size, column.dtype)
    out[:len(indices)] = mapped.take(column, indices)
    return out


def _scattered(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A [B, T] int32 array holding `values` at the True positions of `mask` (row by row), 0 elsewhere."""
    out = np.zeros(mask.shape, np.int32)
    out[mask] = values
    return out


def _check_sharding(batch_size: int, shard_index: int, shard_count: int) -> None:
    """Raises ValueError unless the global batch splits evenly and shard_index names a share."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shard_count < 1 or batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} must be divisible by shard_count {shard_count} "
                         "(the process count): each process takes an equal share of every batch")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")


def bucket_widths(split: EncodedSplit, max_seq_length: int, boundaries: Sequence[int] = ()) -> np.ndarray:
    """Per example, the padded history length T of its bucket: the first boundary >= its (truncated) length.

    No boundaries: every example gets T = max_seq_length. The last bucket is always max_seq_length.
    """
    widths = np.array(sorted({b for b in boundaries if 0 < b < max_seq_length} | {max_seq_length}), np.int64)
    lengths = np.minimum(split.hist_lengths, max_seq_length)
    return widths[np.searchsorted(widths, lengths)]


# (example indices of a global batch, its history width T) per batch: a list, or a permutation.ShuffledPlan
Plan = Sequence[tuple[np.ndarray, int]]
# Splits of more samples shuffle with a keyed permutation evaluated batch by batch (input_pipeline.permutation)
# instead of holding an index permutation (4 bytes a sample: 67 MB here, 0.7 GB at Taobao's 177M samples).
LARGEST_PERMUTATION = 1 << 24


def _chunks(order: np.ndarray, batch_size: int, width: int) -> Plan:
    return [(order[start:start + batch_size], width) for start in range(0, len(order), batch_size)]


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """rng.permutation(n) (the same order), as int32 when n fits: half the memory of an epoch's index permutation."""
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(order)
    return order


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order train_plan (without buckets) shuffles n examples into, as one array (the work queue's units)."""
    if n > LARGEST_PERMUTATION:
        return permutation.KeyedPermutation(n, (seed, epoch))(np.arange(n))
    return _permutation(np.random.default_rng((seed, epoch)), n)


def train_plan(split: EncodedSplit, batch_size: int, max_seq_length: int, *, seed: int, epoch: int,
               boundaries: Sequence[int] = ()) -> Plan:
    """An epoch's global batches, fixed by (seed, epoch); every example exactly once.

    With bucket boundaries, examples are grouped by history length, shuffled within their bucket,
    cut into batches (each padded only to its bucket's width), and the batches shuffled; the math
    per example is unchanged (padding is masked), the work per batch shrinks. Without boundaries, a split of
    more than LARGEST_PERMUTATION examples gets a permutation.ShuffledPlan (O(1) memory) instead of numpy's.
    """
    if not boundaries and len(split) > LARGEST_PERMUTATION:
        return permutation.shuffled_plan(len(split), batch_size, max_seq_length, (seed, epoch))
    if not boundaries:
        return _chunks(epoch_order(len(split), seed=seed, epoch=epoch), batch_size, max_seq_length)
    rng = np.random.default_rng((seed, epoch))
    widths = bucket_widths(split, max_seq_length, boundaries)
    plan = []
    for width in np.unique(widths):
        members = np.flatnonzero(widths == width)
        plan += _chunks(members[_permutation(rng, len(members))], batch_size, int(width))
    return [plan[i] for i in rng.permutation(len(plan))]


def eval_plan(split: EncodedSplit, batch_size: int, max_seq_length: int, boundaries: Sequence[int] = ()) -> Plan:
    """All examples once: in file order, or with boundaries grouped by bucket (file order within each)."""
    if not boundaries:
        return _chunks(np.arange(len(split)), batch_size, max_seq_length)
    widths = bucket_widths(split, max_seq_length, boundaries)
    return [chunk for width in np.unique(widths)
            for chunk in _chunks(np.flatnonzero(widths == width), batch_size, int(width))]


def num_train_batches(split: EncodedSplit, batch_size: int, max_seq_length: int,
                      boundaries: Sequence[int] = ()) -> int:
    """Global batches per epoch: ceil(N / batch_size), summed over buckets when bucketing."""
    if not boundaries:
        return num_batches(len(split), batch_size)
    _, counts = np.unique(bucket_widths(split, max_seq_length, boundaries), return_counts=True)
    return int(sum(num_batches(int(c), batch_size) for c in counts))


def _batches(split: EncodedSplit, plan: Plan, batch_size: int, keep: str, shard_index: int,
             shard_count: int) -> Iterator[dict[str, np.ndarray]]:
    """The plan's global batches, each cut to this process's contiguous share of batch_size rows."""
    _check_sharding(batch_size, shard_index, shard_count)
    per_shard = batch_size // shard_count
    first = shard_index * per_shard

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for count, (indices, width) in enumerate(plan, start=1):
            yield make_batch(split, indices[first:first + per_shard], width, keep, batch_size=per_shard)
            if count % RELEASE_EVERY_BATCHES == 0:
                release_mapped_pages(split)
    return batches()


def release_mapped_pages(split: EncodedSplit) -> None:
    """Unmaps the pages reading left resident in `split`'s memory-mapped columns (input_pipeline.mapped)."""
    mapped.release_pages(*_columns(split))


def _columns(split: EncodedSplit) -> list[np.ndarray]:
    """Every column of `split`."""
    return [getattr(split, field.name) for field in dataclasses.fields(split)]


def train_batches(split: EncodedSplit, batch_size: int, max_seq_length: int, *, seed: int, epoch: int,
                  keep: str = "first", shard_index: int = 0, shard_count: int = 1, start_batch: int = 0,
                  boundaries: Sequence[int] = (), plan: Plan | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One epoch in an order fixed by (seed, epoch); the last partial batch is padded, none dropped.

    `start_batch` skips the epoch's first batches without building them (resuming mid-epoch);
    `boundaries` enables length bucketing (see train_plan). `plan`: this epoch's train_plan, when the caller
    already holds it (building one takes a pass over the epoch: hold one).
    """
    if plan is None:
        plan = train_plan(split, batch_size, max_seq_length, seed=seed, epoch=epoch, boundaries=boundaries)
    return _batches(split, plan[start_batch:], batch_size, keep, shard_index, shard_count)


def eval_batches(split: EncodedSplit, batch_size: int, max_seq_length: int, *, keep: str = "first",
                 shard_index: int = 0, shard_count: int = 1, boundaries: Sequence[int] = (),
                 plan: Plan | None = None) -> Iterator[dict[str, np.ndarray]]:
    """All examples once (file order, or bucket by bucket); the last partial batch of each is padded.
    `plan`: the eval_plan, when the caller already holds it."""
    if plan is None:
        plan = eval_plan(split, batch_size, max_seq_length, boundaries)
    return _batches(split, plan, batch_size, keep, shard_index, shard_count)
