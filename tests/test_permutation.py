"""input_pipeline.permutation: the keyed permutation large splits shuffle with, and its plans."""

from __future__ import annotations

import numpy as np
import pytest

from input_pipeline import batches, permutation
from tests.test_batches import make_split, real_uids


@pytest.mark.parametrize("n", [1, 2, 3, 255, 256, 1_000, 65_537])
def test_a_keyed_permutation_is_a_bijection_of_its_range(n):
    values = permutation.KeyedPermutation(n, (7, 0))(np.arange(n))
    np.testing.assert_array_equal(np.sort(values), np.arange(n))


def test_the_order_depends_on_the_seed_and_looks_shuffled():
    n = 100_000
    first, again, other = (permutation.KeyedPermutation(n, seed)(np.arange(n)) for seed in [(1, 0), (1, 0), (1, 1)])
    np.testing.assert_array_equal(first, again)
    assert np.mean(first == other) < 1e-3
    assert abs(np.corrcoef(np.arange(n), first)[0, 1]) < 0.02  # no trace of the input order
    assert 0.45 < np.mean(first[1:] > first[:-1]) < 0.55  # rises and falls like a random order


def test_large_splits_train_on_a_shuffled_plan_that_covers_the_epoch_once(monkeypatch):
    """Past LARGEST_PERMUTATION examples train_plan is a ShuffledPlan: every example once per epoch, fixed by
    (seed, epoch), and resuming at a batch gives the rest of the same epoch."""
    monkeypatch.setattr(batches, "LARGEST_PERMUTATION", 100)
    monkeypatch.setattr(permutation, "ITER_BATCHES", 3)  # iteration evaluates 3 batches at a time
    split = make_split([2, 0, 5, 1] * 77)  # 308 examples
    plan = batches.train_plan(split, 32, 4, seed=5, epoch=0)
    assert isinstance(plan, permutation.ShuffledPlan) and len(plan) == 10
    epoch = list(batches.train_batches(split, 32, 4, seed=5, epoch=0))
    assert sorted(real_uids(epoch)) == list(range(1, 309))
    assert real_uids(epoch) == real_uids(batches.train_batches(split, 32, 4, seed=5, epoch=0))
    assert real_uids(epoch) != real_uids(batches.train_batches(split, 32, 4, seed=5, epoch=1))
    assert real_uids(batches.train_batches(split, 32, 4, seed=5, epoch=0, start_batch=7)) == real_uids(epoch[7:])
    assert [plan[i][0].tolist() for i in range(len(plan))] == [indices.tolist() for indices, _ in plan]
