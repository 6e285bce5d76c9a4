"""Multi-process data parallelism: who is who from flags or the environment, and N processes = one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from din_jax import parallel, sharded_tables
from din_jax.parallel import Cluster, ParallelError, resolve_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.synthetic.num_users=400", "--config.synthetic.num_items=300", "--config.synthetic.num_categories=20",
        "--config.synthetic.mean_reviews=6", "--config.synthetic.max_reviews=20", "--config.batch_size=64",
        "--config.eval_batch_size=32", "--config.progress_bar=False"]


def test_single_process_needs_no_cluster():
    assert resolve_cluster(env={}) is None
    assert resolve_cluster(env={parallel.ENV_NUM_PROCESSES: "1"}) is None
    assert resolve_cluster(env={parallel.ENV_SLURM_PROCID: "0", parallel.ENV_SLURM_NTASKS: "1"}) is None


def test_flags_win_over_the_environment():
    env = {parallel.ENV_COORDINATOR_ADDRESS: "envhost:1", parallel.ENV_NUM_PROCESSES: "8", parallel.ENV_PROCESS_ID: "7"}
    assert resolve_cluster("flaghost:2", 4, 3, env=env) == Cluster("flaghost:2", 4, 3)
    assert resolve_cluster(env=env) == Cluster("envhost:1", 8, 7)


def test_kubernetes_indexed_job_gives_the_process_id():
    env = {parallel.ENV_COORDINATOR_ADDRESS: "din-0.din:1234", parallel.ENV_NUM_PROCESSES: "4",
           parallel.ENV_JOB_COMPLETION_INDEX: "2"}
    assert resolve_cluster(env=env) == Cluster("din-0.din:1234", 4, 2)


def test_slurm_tasks_and_first_node_give_the_cluster():
    env = {parallel.ENV_SLURM_PROCID: "5", parallel.ENV_SLURM_NTASKS: "6",
           parallel.ENV_SLURM_NODELIST: "node[003-005,9],gpu1"}
    assert resolve_cluster(env=env) == Cluster(f"node003:{parallel.DEFAULT_SLURM_PORT}", 6, 5)
    assert resolve_cluster(env={**env, parallel.ENV_COORDINATOR_PORT: "999"}).coordinator_address == "node003:999"
    assert parallel.first_host("a1,b2") == "a1"


@pytest.mark.parametrize("env, named", [
    ({parallel.ENV_NUM_PROCESSES: "2", parallel.ENV_PROCESS_ID: "0"}, "--coordinator_address"),
    ({parallel.ENV_NUM_PROCESSES: "2", parallel.ENV_COORDINATOR_ADDRESS: "h:1"}, "--process_id"),
    ({parallel.ENV_NUM_PROCESSES: "2", parallel.ENV_COORDINATOR_ADDRESS: "h:1", parallel.ENV_PROCESS_ID: "2"},
     "distinct --process_id"),
    ({parallel.ENV_NUM_PROCESSES: "two"}, "DIN_NUM_PROCESSES='two'"),
])
def test_incomplete_cluster_is_one_sentence_naming_what_to_set(env, named):
    with pytest.raises(ParallelError, match=named):
        resolve_cluster(env=env)


def test_single_process_mesh_has_one_data_shard():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == len(jax.devices())
    batch = parallel.global_batch({"x": np.arange(4 * mesh.size)}, mesh)
    assert batch["x"].sharding == parallel.batch_sharding(mesh)
    assert parallel.global_batch(batch, mesh)["x"] is batch["x"]  # already global: unchanged
    np.testing.assert_array_equal(parallel.gather(batch)["x"], np.arange(4 * mesh.size))


def launch(num_processes: int, workdir, *flags: str) -> subprocess.CompletedProcess:
    """The installed launcher, run from outside the checkout with the config file named relative to there."""
    cwd = workdir.parent
    config = os.path.relpath(os.path.join(ROOT, "configs", "default.py"), cwd)
    command = [sys.executable, "-m", "launch.local", "--num_processes", str(num_processes), "--",
               "--config", config, "--workdir", str(workdir), *TINY, *flags]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)


def restored_state(directory) -> dict:
    """A checkpoint's train state as numpy, whatever mesh wrote it."""
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(directory)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return jax.tree.map(np.asarray, checkpointer.restore(directory, target))


def assert_same_training(one, two, steps: int, routed_min_rows: int | None = None, shards: int = 2) -> None:
    """Same eval metrics and final parameters (float32 summation order aside). With `routed_min_rows`, `two`
    trained with the tables of at least that many rows split over `shards` devices (owner-major layout)."""
    metrics = [json.loads((w / "eval_metrics.json").read_text()) for w in (one, two)]
    assert metrics[0]["step"] == metrics[1]["step"] == steps
    assert metrics[0]["num_examples"] == metrics[1]["num_examples"]  # the whole test set, once
    for name in ("auc", "gauc", "accuracy", "logloss"):
        assert metrics[1][name] == pytest.approx(metrics[0][name], rel=1e-6), name
    params = [restored_state(w / "checkpoints" / str(steps) / "default")["params"] for w in (one, two)]
    # The attention output bias cannot change a softmax: its gradient is float noise that Adam scales up
    # to +-lr (see test_sparse); every other parameter, embedding rows included, must agree.
    for p in params:
        p["attention_unit"]["att_out"].pop("bias")
    for name in ("uid_table", "mid_table", "cat_table"):
        rows = len(params[0][name])
        if routed_min_rows is not None and rows >= routed_min_rows:
            params[1][name] = sharded_tables.logical_table(params[1][name], rows, shards)
    for (path, left), right in zip(jax.tree_util.tree_flatten_with_path(params[0])[0], jax.tree.leaves(params[1])):
        np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# One run covers the three kinds of replicated tables: plain (cat), EmbeddingVariable with a counter filter (mid)
# and adaptive (uid), whose id -> row mappings every process keeps alike without communicating.
MIXED_TABLES = ("--config.embeddings.uid=adaptive", "--config.adaptive_hash_bucket_size=50",
                "--config.embeddings.mid=ev", "--config.ev_filter=counter")


@pytest.mark.parametrize("resume", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_train_resume_and_evaluate_as_one_process(tmp_path, resume):
    """Slow with a resume (one more 2-process launch): test_train and test_embedding_kinds resume single processes
    exactly, id mappings included; the fast case trains the 2 processes straight through."""
    one = launch(1, tmp_path / "one", "--config.steps=8", *MIXED_TABLES)
    assert one.returncode == 0, one.stdout[-3000:]
    if resume:
        first = launch(2, tmp_path / "two", "--config.steps=4", "--config.no_eval=True", *MIXED_TABLES)
        assert first.returncode == 0, first.stdout[-3000:]
    # Resuming, both processes restore the checkpoint of step 4, with the id mappings it holds.
    two = launch(2, tmp_path / "two", "--config.steps=8", *MIXED_TABLES)
    assert two.returncode == 0, two.stdout[-3000:]
    assert two.stdout.count("Resumed from checkpoint at step 4") == (2 if resume else 0)
    assert "[0] din_jax results" in two.stdout and "[1] din_jax results" not in two.stdout  # process 0 reports
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    # The same ids admitted to the same rows: the mappings' counts agree with the single process's.
    assert summary["embeddings"] == json.loads((tmp_path / "one" / "train_summary.json").read_text())["embeddings"]
    assert [summary["embeddings"][f]["kind"] for f in ("uid", "mid", "cat")] == ["adaptive", "ev", "dense"]
    assert (tmp_path / "two" / "plots" / "attention.png").is_file()
    assert_same_training(tmp_path / "one", tmp_path / "two", 8)


def test_intra_confines_the_process_to_its_first_cores():
    script = ("import os; from din_jax import parallel; parallel.limit_cpus(1); "
              "print(sorted(os.sched_getaffinity(0)) == sorted(os.sched_getaffinity(0))[:1], len(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "1"]
    with pytest.raises(ParallelError, match="config.intra=100000 asks for more cores"):
        parallel.limit_cpus(100_000)
