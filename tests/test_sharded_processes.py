"""Tables split over two processes (config.shard_embeddings): training, resume and evaluation equal one process.

Its own module so that pytest-xdist (which hands out whole modules) runs it beside the other multi-process tests.
"""

from __future__ import annotations

import pytest

from tests.test_parallel import assert_same_training, launch

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
