"""Background preparation of the next batches while the current step runs (the seed's --smartstaged).

A daemon thread pulls numpy batches from the input iterator, applies the trainer's host-side
preparation (history packing) and copies them to the device, keeping `depth` batches ready.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import jax

_DONE = object()


class Prefetcher:
    """Iterates over prepared, device-resident batches produced by a background thread."""

    def __init__(self, batches: Iterator[dict], prepare: Callable[[dict], dict], depth: int = 2,
                 transfer: bool = True):
        """transfer=False keeps prepared batches in host memory (the consumer still changes them)."""
        self._transfer = transfer
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._fill, args=(batches, prepare), daemon=True,
                                        name="din_jax-prefetch")
        self._thread.start()

    def _fill(self, batches: Iterator[dict], prepare: Callable[[dict], dict]) -> None:
        try:
            for batch in batches:
                prepared = prepare(batch)
                item = (batch, jax.device_put(prepared) if self._transfer else prepared)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as error:  # re-raised in the consumer's thread
            self._queue.put(error)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[dict, Any]:
        """(the numpy batch, its prepared device copy)."""
        item = self.next_within(None)
        assert item is not None
        return item

    def next_within(self, timeout: float | None) -> tuple[dict, Any] | None:
        """The next item if one is ready within `timeout` seconds (None: wait), else None; StopIteration at the end."""
        if self._ended:
            raise StopIteration
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _DONE:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def at_end(self) -> bool:
        """Whether the input has ended and every item has been taken."""
        with self._queue.mutex:
            return self._ended or (len(self._queue.queue) > 0 and self._queue.queue[0] is _DONE)

    def close(self) -> None:
        """Stops the thread (it may be blocked on a full queue)."""
        self._stop.set()
        self._thread.join(timeout=5)
