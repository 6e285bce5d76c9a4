"""Tables split over two processes (config.shard_embeddings): training, resume and evaluation equal one process.

Its own module so that pytest-xdist (which hands out whole modules) runs it beside the other multi-process tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_parallel import MIXED_TABLES, assert_same_training, launch, restored_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_ROWS = 100
ROUTED = (f"--config.shard_min_rows={MIN_ROWS}",)  # the tiny data's uid and mid tables routed, its 20 categories replicated


# Slow (CI runs it): test_sharded_tables trains routed tables on 2 and 4 devices against one, test_parallel launches,
# resumes and compares 2 processes, and test_incremental round-trips tables split over 2 processes' checkpoints.
@pytest.mark.slow
def test_two_processes_with_sharded_tables_train_resume_and_evaluate_as_one_replicated_process(tmp_path):
    one = launch(1, tmp_path / "one", "--config.steps=6")
    assert one.returncode == 0, one.stdout[-3000:]
    first = launch(2, tmp_path / "two", "--config.steps=3", "--config.no_eval=True", "--config.shard_embeddings=True",
                   *ROUTED)
    assert first.returncode == 0, first.stdout[-3000:]
    # Each process restores the table rows it owns.
    resumed = launch(2, tmp_path / "two", "--config.steps=6", "--config.shard_embeddings=True",
                   *ROUTED)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert resumed.stdout.count("Resumed from checkpoint at step 3") == 2
    assert (tmp_path / "two" / "plots" / "attention.png").is_file()  # its rows gathered from both processes
    assert_same_training(tmp_path / "one", tmp_path / "two", 6, routed_min_rows=MIN_ROWS)
    assert_same_exports(tmp_path / "one", tmp_path / "two")


def assert_same_exports(one, two) -> None:
    """Both runs exported (tables split over devices come back whole) score the test split alike."""
    scores = []
    for workdir in (one, two):
        for command in (["din_jax.export", "--workdir", str(workdir), "--out", str(workdir / "export")],
                        ["din_jax.predict", "--model", str(workdir / "export"), "--input",
                         str(one / "data" / "local_test_splitByUser"), "--output", str(workdir / "scores.txt")]):
            done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        scores.append(np.loadtxt(workdir / "scores.txt")[:, 0])
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5, atol=1e-6)


# Slow (CI runs it): test_owned_ids trains the three raw-id kinds split over 4 devices against one replicated mapping,
# and round-trips the per-device checkpoint item; this launches 2 processes and resumes them.
@pytest.mark.slow
def test_two_processes_mapping_the_ids_they_own_resume_and_evaluate_as_one_process(tmp_path):
    one = launch(1, tmp_path / "one", "--config.steps=8", *MIXED_TABLES)
    assert one.returncode == 0, one.stdout[-3000:]
    split = ("--config.shard_embeddings=True", *MIXED_TABLES)
    first = launch(2, tmp_path / "two", "--config.steps=4", "--config.no_eval=True", *split)
    assert first.returncode == 0, first.stdout[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "4" / "per_device").is_dir()  # each device's id mappings
    resumed = launch(2, tmp_path / "two", "--config.steps=8", *split)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert resumed.stdout.count("Resumed from checkpoint at step 4") == 2
    metrics = [json.loads((w / "eval_metrics.json").read_text()) for w in (tmp_path / "one", tmp_path / "two")]
    for name in ("auc", "gauc", "accuracy", "logloss"):
        assert metrics[1][name] == pytest.approx(metrics[0][name], rel=1e-6), name
    # Rows sit elsewhere (each id with its owner), the dense parameters are the same.
    params = [restored_state(w / "checkpoints" / "8" / "default")["params"]
              for w in (tmp_path / "one", tmp_path / "two")]
    for p in params:
        p["attention_unit"]["att_out"].pop("bias")  # softmax-invariant: float noise Adam scales (test_parallel)
    dense = [{k: v for k, v in p.items() if not k.endswith("_table")} for p in params]
    for (path, left), right in zip(jax.tree_util.tree_flatten_with_path(dense[0])[0], jax.tree.leaves(dense[1])):
        np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert_same_exports(tmp_path / "one", tmp_path / "two")  # each device's id mappings merged into one per table
