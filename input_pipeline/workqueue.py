"""The seed's --workqueue: an epoch's examples cut into units, each handed to whichever process asks next.

Without it, process p reads the p-th share of every global batch (fixed assignment). With it, the
epoch's shuffled examples are cut into units of one batch shard each, and a shared counter (the
coordinator's key-value store in a multi-process run) hands the next unit to whichever process asks:
a process that reads slowly claims fewer units, the others take more, and every unit - every example
- is claimed by exactly one process per epoch. Units a checkpoint recorded as trained are skipped
when a run resumes.
"""

from __future__ import annotations

import threading
from typing import Iterator, Protocol

import numpy as np

from input_pipeline import batches


class Counter(Protocol):
    """A counter shared by every process of a run."""

    def increment(self, key: str) -> int:
        """Adds 1 to counter `key` (new keys start at 0) atomically and returns its value before."""


class LocalCounter:
    """A Counter for the threads of one process (single-process runs, tests)."""

    def __init__(self):
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def increment(self, key: str) -> int:
        with self._lock:
            value = self._values.get(key, 0)
            self._values[key] = value + 1
            return value


def epoch_units(num_examples: int, unit_size: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's example indices, shuffled as batches.train_plan shuffles them (fixed by seed and epoch),
    cut into units of `unit_size` (the last one shorter)."""
    order = batches.epoch_order(num_examples, seed=seed, epoch=epoch)
    return [order[start:start + unit_size] for start in range(0, num_examples, unit_size)]


class WorkQueue:
    """Hands out the units of one epoch: claim() returns the next unit's index until none is left.

    name: identifies the queue among the run's counters; every process passes the same name, and a
    new name starts a new queue. done: units already trained (from a checkpoint), never handed out.
    """

    def __init__(self, counter: Counter, name: str, num_units: int, done: np.ndarray | None = None):
        self._counter, self._name = counter, name
        done = np.zeros(num_units, bool) if done is None else np.asarray(done, bool)
        if done.shape != (num_units,):
            raise ValueError(f"the checkpoint's work-queue record covers {done.size} units, this epoch has "
                             f"{num_units}; resume with the batch size and process count it was written with")
        self._remaining = np.flatnonzero(~done)

    def claim(self) -> int | None:
        """The index of the next unclaimed unit, or None when every unit of the epoch has been claimed."""
        position = self._counter.increment(self._name)
        return int(self._remaining[position]) if position < len(self._remaining) else None

    def claims(self) -> Iterator[int]:
        """claim() until the queue is empty."""
        while (unit := self.claim()) is not None:
            yield unit
