"""This process's share of each train step under config.workqueue (the seed's --workqueue).

A background thread claims units of the epoch from the run's shared work queue
(input_pipeline.workqueue), builds and prepares their batches; each step takes the next ready one.
A process whose batch is not ready within `wait_seconds` contributes an empty share (weight-0 rows)
instead of holding every process up, so a slow reader trains fewer units and the others more. Each
contribution says whether this process has finished the epoch; the step sums these flags, and the
epoch ends after the step in which every device reported done. Every unit is trained exactly once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from din_jax import parallel
from din_jax.packing import packed_size
from din_jax.prefetch import Prefetcher
from input_pipeline import batches as batches_lib
from input_pipeline import dien
from input_pipeline.workqueue import WorkQueue, epoch_units

QUEUE_DONE = "queue_done"  # batch column: 1 on every row of a process that has no unit left this epoch


class Contribution(NamedTuple):
    """This process's share of one step."""

    batch: dict[str, np.ndarray]  # numpy, as built
    examples: int                 # real examples in it
    unit: int                     # the unit it holds, -1 for an empty share


class WorkQueueFeed:
    """One epoch of contributions: next() -> (Contribution, prepared batch) until the loop sees the epoch done."""

    def __init__(self, split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Any, *, epoch: int,
                 name: str, done_units: np.ndarray | None = None, wait_seconds: float = 0.1):
        self.epoch, self.wait_seconds = epoch, wait_seconds
        self._split, self._config, self._trainer = split, config, trainer
        self.unit_size = config.batch_size // jax.process_count()
        self.units = epoch_units(len(split), self.unit_size, seed=config.seed, epoch=epoch)
        self.trained = np.zeros(len(self.units), bool) if done_units is None else np.array(done_units, bool)
        queue = WorkQueue(parallel.shared_counter(), name, len(self.units), self.trained)
        self.pack_size = self._epoch_pack_size()
        self._prefetcher = Prefetcher(self._contributions(queue), self._prepare, config.prefetch_depth)
        self._empty = self._build(np.zeros(0, np.int64), -1)
        self._empty_prepared = self._prepare(self._empty)  # every empty share is this one

    def _epoch_pack_size(self) -> int:
        """The packed history size that fits every device shard of every unit (the same in every process)."""
        if not self._trainer.pack_granularity:
            return 0
        devices = parallel.local_shards(self._trainer.mesh)
        t = self._config.max_seq_length
        lengths = np.zeros(len(self.units) * self.unit_size, np.int64)
        order = np.concatenate(self.units) if self.units else np.zeros(0, np.int64)
        lengths[:len(order)] = np.minimum(self._split.hist_lengths[order], t)
        fullest = int(lengths.reshape(-1, self.unit_size // devices).sum(axis=1).max(initial=0))
        return packed_size(fullest, self._trainer.pack_granularity, self.unit_size // devices * t)

    def _build(self, indices: np.ndarray, unit: int) -> Contribution:
        batch = batches_lib.make_batch(self._split, indices, self._config.max_seq_length, self._config.history_keep,
                                       batch_size=self.unit_size)
        return Contribution({**batch, QUEUE_DONE: np.zeros(self.unit_size, np.float32)}, len(indices), unit)

    def _contributions(self, queue: WorkQueue):
        for unit in queue.claims():
            yield self._build(self.units[unit], unit)

    def _prepare(self, contribution: Contribution) -> dict:
        return self._trainer.prepare(contribution.batch, self.pack_size, train=True)

    def next(self) -> tuple[Contribution, Any]:
        """This process's share of the next step: a claimed unit, or an empty share (not ready yet / none left)."""
        try:
            ready = self._prefetcher.next_within(self.wait_seconds)
        except StopIteration:
            ready = None
        if ready is not None and not self._prefetcher.at_end():
            return ready
        contribution, prepared = ready if ready is not None else (self._empty, self._empty_prepared)
        if self._prefetcher.at_end():  # nothing left after this share: say so in it
            done = {QUEUE_DONE: np.ones(self.unit_size, np.float32)}
            contribution = contribution._replace(batch={**contribution.batch, **done})
            prepared = {**prepared, **done}
        return contribution, prepared

    def trained_units(self) -> np.ndarray:
        """Units of this epoch trained by any process so far (needs every process to call it at the same step)."""
        return parallel.gather_host(self.trained).any(axis=0)

    def record(self, contribution: Contribution) -> None:
        """Marks the contribution's unit as trained (after its step ran)."""
        if contribution.unit >= 0:
            self.trained[contribution.unit] = True

    def close(self) -> None:
        self._prefetcher.close()
