"""An epoch's shuffle in O(1) memory: a keyed pseudo-random permutation of [0, n), evaluated batch by batch.

A split of 177M samples would need 0.7 GB for its index permutation (4 bytes a sample) for the whole epoch;
KeyedPermutation instead computes where any position of the shuffled order comes from. It is a 4-round
Feistel network over 2h-bit integers (2^2h >= n) whose round function mixes a half with a round key drawn
from the seed (the splitmix64 finaliser), restricted to [0, n) by cycle walking: a value that lands past n
is permuted again until it lands inside, which keeps the map a bijection of [0, n) (the domain is at most 4n,
so a value walks ~1.3 times on average). Luby and Rackoff: four rounds of a pseudo-random function give a
pseudo-random permutation - every order is as shuffled as numpy's for training, and each epoch's differs.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

ROUNDS = 4
ITER_BATCHES = 4096  # batches evaluated together when a plan is iterated
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


class KeyedPermutation:
    """A bijection of [0, n) fixed by `seed` (anything np.random.default_rng takes)."""

    def __init__(self, n: int, seed) -> None:
        bits = max(2, (max(n, 2) - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**63, ROUNDS, dtype=np.uint64)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted values of `positions` (ints in [0, n)), int64."""
        out = self._feistel(np.asarray(positions, np.uint64))
        outside = out >= self.n
        while outside.any():  # cycle walking
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    return z ^ (z >> np.uint64(31))


class ShuffledPlan(Sequence):
    """A train plan (batches.Plan: (example indices, history width) per global batch) over a KeyedPermutation:
    batch i holds the examples at shuffled positions [i * batch_size, (i + 1) * batch_size), computed when asked."""

    def __init__(self, permutation: KeyedPermutation, batch_size: int, width: int, batches: range | None = None):
        self.permutation, self.batch_size, self.width = permutation, batch_size, width
        self.batches = range(-(-permutation.n // batch_size)) if batches is None else batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ShuffledPlan(self.permutation, self.batch_size, self.width, self.batches[index])
        start = self.batches[index] * self.batch_size
        stop = min(start + self.batch_size, self.permutation.n)
        return self.permutation(np.arange(start, stop, dtype=np.uint64)), self.width

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """The batches in order, evaluated ITER_BATCHES at a time (numpy's per-call overhead dominates one batch's
        ~0.4 ms; a whole pass over 177M samples takes ~25 s this way)."""
        for first in range(0, len(self.batches), ITER_BATCHES):
            batches = self.batches[first:first + ITER_BATCHES]
            start = batches[0] * self.batch_size
            stop = min((batches[-1] + 1) * self.batch_size, self.permutation.n)
            values = self.permutation(np.arange(start, stop, dtype=np.uint64))
            for offset in range(0, len(values), self.batch_size):
                yield values[offset:offset + self.batch_size], self.width


def shuffled_plan(n: int, batch_size: int, width: int, seed) -> Sequence[tuple[np.ndarray, int]]:
    """The plan of `n` examples in a KeyedPermutation's order, cut into batches of `batch_size`."""
    return ShuffledPlan(KeyedPermutation(n, seed), batch_size, width)
