"""The seed's --workqueue: units handed to whichever process asks, every example trained once per epoch."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from input_pipeline.workqueue import LocalCounter, WorkQueue, epoch_units
from tests.test_parallel import launch
from tests.test_train import small_config


def test_epoch_units_cover_the_shuffled_epoch_once_in_unit_sized_pieces():
    units = epoch_units(10, 4, seed=1, epoch=2)
    assert [len(u) for u in units] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(units), np.random.default_rng((1, 2)).permutation(10))


def test_epoch_units_follow_the_train_plans_order_for_large_splits_too(monkeypatch):
    from input_pipeline import batches
    monkeypatch.setattr(batches, "LARGEST_PERMUTATION", 8)  # 10 examples: the keyed permutation
    split = batches.EncodedSplit.from_offsets(np.zeros(11, np.int64), **{
        name: np.zeros(10, dtype) for name, dtype in [("label", np.float32), ("uid", np.int32), ("mid", np.int32),
                                                      ("cat", np.int32), ("hist_mids", np.int32),
                                                      ("hist_cats", np.int32), ("user", np.int32)]})
    plan = batches.train_plan(split, 4, 5, seed=1, epoch=2)
    np.testing.assert_array_equal(np.concatenate(epoch_units(10, 4, seed=1, epoch=2)),
                                  np.concatenate([indices for indices, _ in plan]))


def test_a_slow_process_claims_fewer_units_and_every_unit_goes_to_exactly_one():
    counter, claimed = LocalCounter(), {}

    def worker(name, seconds_per_unit):
        queue = WorkQueue(counter, "epoch0", 60)  # each process builds its own view of the shared queue
        claimed[name] = []
        for unit in queue.claims():
            claimed[name].append(unit)
            time.sleep(seconds_per_unit)

    threads = [threading.Thread(target=worker, args=(name, delay))
               for name, delay in (("fast_a", 0.001), ("fast_b", 0.001), ("slow", 0.02))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(sum(claimed.values(), []))
    assert every == list(range(60))  # each unit once, none lost
    assert len(claimed["slow"]) < len(claimed["fast_a"]) and len(claimed["slow"]) < len(claimed["fast_b"])


def test_units_a_checkpoint_recorded_as_trained_are_not_handed_out_again():
    done = np.zeros(6, bool)
    done[[0, 3, 4]] = True
    assert list(WorkQueue(LocalCounter(), "q", 6, done).claims()) == [1, 2, 5]
    with pytest.raises(ValueError, match="covers 6 units, this epoch has 7"):
        WorkQueue(LocalCounter(), "q", 7, done)


def test_single_process_work_queue_trains_as_the_fixed_plan(tmp_path):
    from din_jax import train
    data_dir = str(tmp_path / "data")
    planned = train.train_and_evaluate(small_config(data_dir, steps=6), str(tmp_path / "plan"))
    queued = train.train_and_evaluate(small_config(data_dir, steps=6, workqueue=True), str(tmp_path / "queue"))
    assert queued["train"]["trained_examples"] == planned["train"]["trained_examples"] == 6 * 128
    assert queued["eval"]["auc"] == planned["eval"]["auc"]


@pytest.mark.slow  # the fast tests above cover the queue's units, a slow reader, resumed units and one process
def test_two_processes_with_a_work_queue_train_every_example_once_across_a_resume(tmp_path):
    workdir = tmp_path / "run"
    first = launch(2, workdir, "--config.workqueue=True", "--config.steps=3", "--config.no_eval=True")
    assert first.returncode == 0, first.stdout[-3000:]
    trained_first = json.loads((workdir / "train_summary.json").read_text())["trained_examples"]
    assert trained_first == 3 * 64
    # The rest of the epoch: the checkpoint of step 3 says which units were trained.
    rest = launch(2, workdir, "--config.workqueue=True")
    assert rest.returncode == 0, rest.stdout[-3000:]
    assert rest.stdout.count("Resumed from checkpoint at step 3") == 2
    num_train = int(re.search(r"(\d+) train / \d+ test examples", rest.stdout).group(1))
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert trained_first + summary["trained_examples"] == num_train
    assert json.loads((workdir / "eval_metrics.json").read_text())["num_examples"] > 0
