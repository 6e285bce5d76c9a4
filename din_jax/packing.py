"""Packing a batch's history: only the real positions go to the device, padded to a few sizes.

A Books-like batch of 512 examples padded to T = 50 holds ~25.6k history positions of which ~7k are
real. The model works on a list of positions with segment ids (see model.history_positions), so the
host passes `hist_index`: the flat [B*T] indices of the real positions, padded with B*T up to a
multiple of `granularity` - a handful of distinct shapes, each compiled once. Batches stay exactly
as sampled (no length grouping), and the math per example is unchanged.
"""

from __future__ import annotations

import numpy as np


def packed_size(num_positions: int, granularity: int, capacity: int) -> int:
    """num_positions rounded up to a multiple of granularity, at most capacity (= B * T)."""
    return min(max(-(-num_positions // granularity), 1) * granularity, capacity)


def pack_history(batch: dict[str, np.ndarray], granularity: int, floor: int = 0) -> dict[str, np.ndarray]:
    """`batch` plus 'hist_index' int32 [P]: flat indices of its real history positions, padded with B*T; and
    'hist_segment' int32 [P]: each position's example, B for padding.

    P is at least `floor`: a training loop passes the largest size its epoch needs, so that every
    batch has the same shape and the step compiles once. The segments are the indices // T, sent rather than
    divided on the device, where XLA:CPU fused that integer division into every elementwise op over the positions.
    """
    batch_size, seq_len = batch["hist_mask"].shape
    mask = batch["hist_mask"].reshape(-1)
    positions = np.flatnonzero(mask)
    size = min(max(packed_size(len(positions), granularity, mask.size), floor), mask.size)
    index = np.full(size, mask.size, np.int32)
    index[:len(positions)] = positions
    segment = np.full(size, batch_size, np.int32)
    segment[:len(positions)] = positions // seq_len
    return {**batch, "hist_index": index, "hist_segment": segment}


def epoch_pack_size(plan_lengths: list[np.ndarray], granularity: int, capacity: int) -> int:
    """The packed size that fits every batch of an epoch, given each batch's history lengths."""
    largest = max((int(lengths.sum()) for lengths in plan_lengths), default=0)
    return packed_size(largest, granularity, capacity)
