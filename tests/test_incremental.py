"""Incremental checkpoints: the full checkpoint plus its chain of increments restores exactly the trained state."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default
from din_jax import parallel, steps, train
from din_jax import trainer as trainer_lib
from din_jax.checkpoint import Checkpointer
from din_jax.incremental import IncrementalCheckpointer, IncrementalCheckpointError, state_bytes
from launch.local import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = {"uid": 50_000, "mid": 100_000, "cat": 1_000}
B, T = 32, 10
BASE, STEPS = 3, 8
SAVES = (4, 5, 7, 8)  # increments after these steps; step 6's rows go into the increment of step 7


def random_batches(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batches of random ids with random history lengths; the last two rows are padding (weight 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        mask = np.arange(T)[None] < rng.integers(0, T + 1, B)[:, None]
        out.append({"uid": rng.integers(0, VOCAB["uid"], B).astype(np.int32),
                    "mid": rng.integers(0, VOCAB["mid"], B).astype(np.int32),
                    "cat": rng.integers(0, VOCAB["cat"], B).astype(np.int32),
                    "hist_mids": np.where(mask, rng.integers(0, VOCAB["mid"], (B, T)), 0).astype(np.int32),
                    "hist_cats": np.where(mask, rng.integers(0, VOCAB["cat"], (B, T)), 0).astype(np.int32),
                    "hist_mask": mask, "label": rng.integers(0, 2, B).astype(np.float32),
                    "weight": np.r_[np.ones(B - 2), np.zeros(2)].astype(np.float32), "user": np.zeros(B, np.int32)})
    return out


def touched_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows a batch looks up: targets and real history positions of the rows with weight > 0."""
    real = batch["weight"] > 0
    history = batch["hist_mask"] & real[:, None]
    return {"uid_table": batch["uid"][real], "mid_table": np.r_[batch["mid"][real], batch["hist_mids"][history]],
            "cat_table": np.r_[batch["cat"][real], batch["hist_cats"][history]]}


def joined(*touched: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([t[name] for t in touched]) for name in touched[0]}


def config_for(optimizer: str) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.update(dict(max_seq_length=T, optimizer=optimizer, learning_rate=0.05))
    config.model.update(dict(attention_hidden=(16, 8), mlp_hidden=(32, 16)))  # tables dominate, as in DeepRec's DIN
    return config


class Run(NamedTuple):
    """A trained run: the orbax checkpoint of BASE and the increments of SAVES in `directory`."""

    directory: str
    trainer: trainer_lib.Trainer
    config: ml_collections.ConfigDict
    states: dict[int, Any]                   # step -> the train state after it, as numpy
    touched: dict[int, dict[str, np.ndarray]]  # save step -> the rows touched since the previous save
    sizes: dict[int, int]                    # save step -> bytes of its increment


def train_with_increments(optimizer: str, directory: str) -> Run:
    config = config_for(optimizer)
    trainer = train.create_trainer(config, VOCAB)
    state = trainer.init_state(config)
    full, increments = Checkpointer(directory, 0, 1), IncrementalCheckpointer(directory)
    states, touched, sizes, pending = {}, {}, {}, []
    for step, batch in enumerate(random_batches(STEPS), start=1):
        state, _ = trainer.train_step(state, batch)
        states[step] = jax.tree.map(np.asarray, state)
        if step == BASE:
            full.save(step, state, force=True)
        elif step > BASE:
            pending.append(touched_rows(batch))
            if step in SAVES:
                touched[step] = joined(*pending)
                sizes[step] = increments.save(step, BASE, state, touched[step], extra={"seen": np.array([step])})
                pending = []
    full.close()
    return Run(directory, trainer, config, states, touched, sizes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """optimizer -> its Run, trained once per module."""
    cache: dict[str, Run] = {}

    def run(optimizer: str) -> Run:
        if optimizer not in cache:
            cache[optimizer] = train_with_increments(optimizer, str(tmp_path_factory.mktemp(optimizer)))
        return cache[optimizer]

    return run


def copy_of(run: Run, tmp_path) -> str:
    return shutil.copytree(run.directory, tmp_path / "checkpoints")


def restore(run: Run, directory: str) -> tuple[Any, dict[str, np.ndarray] | None, int]:
    """The latest full checkpoint in `directory` restored into a fresh state, then its increments applied."""
    full = Checkpointer(directory, 0, 1)
    state = full.restore_latest(run.trainer.init_state(run.config))
    base_step = full.latest_step()
    full.close()
    return IncrementalCheckpointer(directory).restore(state, base_step)


def assert_states_equal(actual: Any, expected: Any) -> None:
    actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in actual_leaves] == [p for p, _ in expected_leaves]
    for (path, a), (_, b) in zip(actual_leaves, expected_leaves):
        assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_full_checkpoint_plus_increments_restores_the_trained_state_exactly(runs, optimizer):
    run = runs(optimizer)
    state, extra, step = restore(run, run.directory)
    assert step == STEPS and extra == {"seen": np.array([STEPS])}
    assert_states_equal(state, run.states[STEPS])
    assert int(state.step) == STEPS


def test_increments_are_a_small_fraction_of_the_full_checkpoint(runs):
    run = runs("adam")
    full_bytes = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(os.path.join(run.directory, str(BASE))) for f in files)
    state_size = state_bytes(jax.tree.map(jnp.asarray, run.states[BASE]))
    print(f"\nfull state {state_size} bytes, orbax checkpoint {full_bytes} bytes; increments: "
          + ", ".join(f"step {s}: {n} bytes ({100 * n / full_bytes:.2f}%)" for s, n in run.sizes.items()))
    for step, size in run.sizes.items():
        assert size == os.path.getsize(os.path.join(run.directory, "incremental", str(BASE), f"{step}.npz"))
        assert size < 0.05 * min(full_bytes, state_size), (step, size, full_bytes)


def test_missing_increment_breaks_the_chain_with_an_error_naming_the_file(runs, tmp_path):
    run = runs("adam")
    directory = copy_of(run, tmp_path)
    os.remove(os.path.join(directory, "incremental", str(BASE), "5.npz"))
    with pytest.raises(IncrementalCheckpointError, match=r"7\.npz .* does not continue the chain at step 4: an "
                                                         r"increment is missing .* delete it .* resume from step 4"):
        restore(run, directory)


def test_unreadable_increment_before_the_newest_is_an_error_naming_it(runs, tmp_path):
    run = runs("adam")
    directory = copy_of(run, tmp_path)
    truncate(os.path.join(directory, "incremental", str(BASE), "5.npz"))
    with pytest.raises(IncrementalCheckpointError, match=r"5\.npz is unreadable .* resume from step 4"):
        restore(run, directory)


def test_truncated_newest_increment_is_ignored_and_the_chain_goes_on_from_the_one_before(runs, tmp_path):
    run = runs("adam")
    directory = copy_of(run, tmp_path)
    newest = os.path.join(directory, "incremental", str(BASE), f"{STEPS}.npz")
    truncate(newest)
    full = Checkpointer(directory, 0, 1)
    increments = IncrementalCheckpointer(directory)
    state, extra, step = increments.restore(full.restore_latest(run.trainer.init_state(run.config)), BASE)
    full.close()
    assert step == 7 and extra == {"seen": np.array([7])}
    assert_states_equal(state, run.states[7])
    assert not os.path.exists(newest) and os.path.exists(newest + ".unreadable")
    # Training on from step 7 saves step 8 again, after step 7 in the chain.
    increments.save(STEPS, BASE, jax.tree.map(jnp.asarray, run.states[STEPS]), run.touched[STEPS])
    state, _, step = restore(run, directory)
    assert step == STEPS
    assert_states_equal(state, run.states[STEPS])


def test_prune_deletes_the_increments_of_older_full_checkpoints(runs, tmp_path):
    run = runs("adam")
    directory = copy_of(run, tmp_path)
    increments = IncrementalCheckpointer(directory)
    increments.prune(BASE)
    assert increments.latest_step(BASE) == STEPS
    increments.prune(BASE + 1)
    assert increments.latest_step(BASE) is None
    assert sorted(os.listdir(directory)) == [str(BASE), "incremental"]  # the full checkpoint stays


def test_due_every_n_seconds_by_an_injected_clock_and_restarted_by_a_save(tmp_path):
    now = [100.0]
    increments = IncrementalCheckpointer(str(tmp_path), every_seconds=60, clock=lambda: now[0])
    assert not increments.due()
    now[0] = 159.5
    assert not increments.due() and increments.due(160.0)
    now[0] = 160.0
    assert increments.due()
    state = toy_state(parallel.data_mesh(), shard=False)
    increments.save(1, 0, toy_step(state, {"mid_table": [1]}), {"mid_table": np.array([1])})
    assert not increments.due() and increments.due(220.0)
    assert not IncrementalCheckpointer(str(tmp_path), every_seconds=0, clock=lambda: now[0]).due(1e9)


def test_save_skips_a_saved_step_and_refuses_earlier_steps_negative_ids_and_whole_table_slots(tmp_path):
    increments = IncrementalCheckpointer(str(tmp_path))
    one = toy_step(toy_state(parallel.data_mesh(), shard=False), {"uid_table": [2]})
    two = toy_step(one, {})
    assert increments.save(2, 0, two, {"uid_table": np.array([2])}) > 0
    assert increments.save(2, 0, two, {}) == 0  # already saved: nothing written
    with pytest.raises(IncrementalCheckpointError, match=r"step 1 would follow step 2 .* restore the increments"):
        increments.save(1, 0, one, {})
    with pytest.raises(ValueError, match=r"touched\['uid_table'\] holds the negative row id -1"):
        increments.save(3, 0, toy_step(two, {}), {"uid_table": np.array([-1, 2])})
    dense = toy_step(two, {}).replace(opt_state={"dense": two.opt_state["dense"]})
    with pytest.raises(IncrementalCheckpointError, match=r"need config.sparse_embeddings=True"):
        increments.save(3, 0, dense, {})


# ---------------------------------------------------------------- row-sharded tables, several processes
TOY_ROWS = {"uid_table": 6, "mid_table": 10, "cat_table": 4}
TOY_TOUCHED = [  # per step, the rows each of the two processes touches
    [{"mid_table": [1, 7], "uid_table": [5]}, {"mid_table": [7, 9], "cat_table": [3]}],
    [{"cat_table": [0, 2]}, {"mid_table": [0, 4], "uid_table": [0, 5]}],
]


def toy_state(mesh, shard: bool) -> steps.TrainState:
    """A small train state of the real layout (bf16 and int row slots included), tables split by rows when `shard`."""

    def create():
        params = {name: jnp.arange(rows * 3).reshape(rows, 3).astype(jnp.bfloat16 if name == "cat_table" else
                                                                     jnp.float32) for name, rows in TOY_ROWS.items()}
        params["fc"] = {"kernel": jnp.zeros([3, 2])}
        opt_state = {"dense": {"fc": {"kernel": jnp.zeros([3, 2])}},
                     "rows": {name: {"acc": jnp.ones([rows, 3]), "power": jnp.zeros([rows], jnp.int32)}
                              for name, rows in TOY_ROWS.items()},
                     "tables": {name: {"beta1_power": jnp.ones([])} for name in TOY_ROWS}}
        return steps.TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={}, opt_state=opt_state)

    specs = steps.state_specs(jax.eval_shape(create), parallel.DATA_AXIS, tuple(TOY_ROWS) if shard else ())
    return jax.jit(create, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), specs))()


def toy_step(state: steps.TrainState, touched: dict[str, Any]) -> steps.TrainState:
    """Changes the touched rows and every non-row leaf, as a train step does; shardings kept."""

    def step(state):
        params, rows = dict(state.params), dict(state.opt_state["rows"])
        for name, ids in touched.items():
            ids = np.asarray(ids, np.int32)
            params[name] = params[name].at[ids].add(1)
            rows[name] = {"acc": rows[name]["acc"].at[ids].mul(2), "power": rows[name]["power"].at[ids].add(1)}
        params["fc"] = jax.tree.map(lambda x: x + 1, params["fc"])
        tables = jax.tree.map(lambda x: x * 0.5, state.opt_state["tables"])
        return state.replace(step=state.step + 1, params=params,
                             opt_state={**state.opt_state, "rows": rows, "tables": tables})

    return jax.jit(step, out_shardings=jax.tree.map(lambda a: a.sharding, state))(state)


def toy_rows(touched: dict[str, list[int]]) -> dict[str, np.ndarray]:
    return {name: np.array(touched.get(name, []), np.int64) for name in TOY_ROWS}


def toy_round_trip(directory: str) -> None:
    """In each of two processes: trains the toy state with tables split by rows over both, saving an increment after
    each step (each process passing the rows it touched); then restores the base plus the increments."""
    state = base = toy_state(parallel.data_mesh(), shard=True)
    increments = IncrementalCheckpointer(directory)
    for step, by_process in enumerate(TOY_TOUCHED, start=1):
        state = toy_step(state, joined(*map(toy_rows, by_process)))
        increments.save(step, 0, state, toy_rows(by_process[jax.process_index()]))
    # The processes' clocks differ: all follow process 0's.
    timer = IncrementalCheckpointer(directory, every_seconds=10, clock=lambda: 0.0)
    assert timer.due(now=100.0 if parallel.is_primary() else 0.0)
    parallel.barrier("saved")
    restored, _, step = IncrementalCheckpointer(directory).restore(base, 0)
    assert step == len(TOY_TOUCHED)
    assert jax.tree.map(lambda a: a.sharding, restored) == jax.tree.map(lambda a: a.sharding, state)
    assert restored.params["mid_table"].sharding.spec == P(parallel.DATA_AXIS)
    assert_states_equal(parallel.gather(restored), parallel.gather(state))
    print("round trip ok")


def test_tables_split_over_two_processes_round_trip_with_each_process_passing_its_own_rows(tmp_path):
    code = ("import sys; from din_jax import parallel; "
            f"parallel.initialize(parallel.Cluster('localhost:{free_port()}', 2, int(sys.argv[1]))); "
            f"from tests.test_incremental import toy_round_trip; toy_round_trip({str(tmp_path)!r})")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT,
                                  env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()  # only one still running (its peer failed)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0 and "round trip ok" in output, output[-3000:]
    assert sorted(os.listdir(tmp_path / "incremental" / "0")) == ["1.npz", "2.npz"]
