"""The background batch preparation keeps order, surfaces errors, and stops cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from din_jax.prefetch import Prefetcher


def numbered(n):
    return ({"x": np.full(3, i)} for i in range(n))


def test_prefetcher_yields_prepared_batches_in_order():
    got = list(Prefetcher(numbered(7), lambda b: {"x": b["x"] * 2}, depth=2))
    assert [int(b["x"][0]) for b, _ in got] == list(range(7))
    assert [int(d["x"][0]) for _, d in got] == [2 * i for i in range(7)]


def test_prefetcher_reraises_input_errors_in_the_consumer():
    def broken():
        yield {"x": np.zeros(1)}
        raise ValueError("bad line 7")

    it = Prefetcher(broken(), lambda b: b)
    next(it)
    with pytest.raises(ValueError, match="bad line 7"):
        next(it)


def test_close_stops_a_producer_blocked_on_a_full_queue():
    it = Prefetcher(numbered(1000), lambda b: b, depth=1)
    next(it)
    it.close()
    assert not it._thread.is_alive()
