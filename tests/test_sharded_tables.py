"""Tables split over devices with lookups routed to their owners (din_jax.sharded_tables): layout, buckets, and
training on 4 devices equal to one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from din_jax import model, sharded_tables
from tests.test_sparse import skewed_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_owner_major_layout_round_trips_and_puts_row_i_on_device_i_mod_n():
    table = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)  # 10 rows over 4 devices: Q = 3, 2 padding rows
    physical = np.asarray(sharded_tables.to_physical(jnp.asarray(table), 4))
    assert physical.shape == (12, 2)
    ids = np.arange(10)
    np.testing.assert_array_equal(physical[sharded_tables.physical_ids(ids, 10, 4)], table)
    np.testing.assert_array_equal(physical[3:6, 0], table[[1, 5, 9], 0])  # device 1's block: rows 1, 5, 9 (+ pad)
    np.testing.assert_array_equal(sharded_tables.logical_table(physical, 10, 4), table)
    assert sharded_tables.physical_ids(np.array([10, 99]), 10, 4).tolist() == [12, 12]  # out of range stays so


@pytest.mark.parametrize("rows", [7, 401])
def test_tables_created_owner_major_hold_the_whole_tables_values_reordered(rows):
    """Each device can generate its own rows: the same numbers as the flax/TF1 initialisers of the whole table."""
    key = jax.random.PRNGKey(5)
    glorot = model.table_glorot_uniform(rows, 18)
    np.testing.assert_array_equal(glorot(key, (rows, 18)), nn.initializers.glorot_uniform()(key, (rows, 18)))
    for init in (glorot, model.tf1_truncated_normal(18**-0.5)):
        for shards in (1, 2, 3, 4):
            want = sharded_tables.to_physical(init(key, (rows, 18)), shards)
            np.testing.assert_array_equal(model.owner_major(init, rows, shards)(key, want.shape), want)


def test_buckets_send_each_unique_id_to_its_owner_once():
    ids = jnp.array([0, 1, 2, 5, 6, 9, 10, 10], jnp.int32)  # sorted unique, padded with the table size 10
    owner, slot, send = sharded_tables._buckets(ids, 10, 4, capacity=3)
    assert owner.tolist() == [0, 1, 2, 1, 2, 1, 4, 4]
    assert slot.tolist()[:6] == [0, 0, 0, 1, 1, 2]
    # Local rows i // 4 per owner; Q = 3 marks an empty place.
    assert np.asarray(send).tolist() == [[0, 3, 3], [0, 1, 2], [0, 1, 3], [3, 3, 3]]


def test_host_routes_are_the_steps_own_buckets():
    rng = np.random.default_rng(0)
    for rows, shards in ((10, 4), (1000, 3), (7, 2)):
        ids = np.unique(rng.integers(0, rows + 1, 40)).astype(np.int32)  # sorted unique, maybe padding (= rows)
        owner, slot, send = sharded_tables._buckets(jnp.asarray(ids), rows, shards, capacity=16)
        host = sharded_tables.host_routes(ids, rows, shards, capacity=16)
        np.testing.assert_array_equal(host[sharded_tables.ROUTE_OWNER], owner)
        real = ids < rows  # padding ids' slots are never read
        np.testing.assert_array_equal(host[sharded_tables.ROUTE_SLOT][real], np.asarray(slot)[real])
        np.testing.assert_array_equal(host[sharded_tables.ROUTE_SEND], np.asarray(send).reshape(-1))


def test_bucket_counts_count_unique_real_lookups_per_owner_and_device():
    batch = {"weight": np.array([1, 1, 1, 0], np.float32), "uid": np.array([1, 1, 2, 3]),
             "mid": np.array([4, 5, 6, 7]), "hist_mids": np.array([[4, 8], [0, 0], [9, 1], [7, 7]]),
             "hist_mask": np.array([[True, True], [False, False], [True, False], [True, True]])}
    # Two local devices, rows 0-1 and 2-3. mid lookups: device 0 {4, 5, 8}, device 1 {6, 9} (row 3 is padding).
    counts = sharded_tables.bucket_counts(batch, ("mid_table", "uid_table"), {"mid_table": 100, "uid_table": 100},
                                          shards=2, local_shards=2)
    assert counts == {"mid_table": 2, "uid_table": 1}  # owner 0 of device 0: {4, 8}; uid: {1} / {2}
    assert sharded_tables.round_capacity(0) == sharded_tables.round_capacity(8) == 8
    assert sharded_tables.round_capacity(9) == 16


# Run in a child process: the parent's JAX has one CPU device, the child four.
_DEVICES_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
from din_jax import train
from tests.test_sparse import VOCAB, config_for, skewed_batches

stream = skewed_batches(4, seed=5)
out = {}
for devices in (1, 4):  # 2 devices: tests/test_sharded_processes.py (slow) trains 2 processes
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    config = config_for(shard_embeddings=devices > 1, shard_min_rows=VOCAB["uid"], optimizer=sys.argv[1],
                        learning_rate=0.001,  # DeepRec's: Adam turns float noise into steps of about lr
                        micro_batch=2)  # gradients of two slices accumulated before the routed update
    trainer = train.create_trainer(config, VOCAB, mesh=mesh)
    state = trainer.init_state(config)
    capacities = trainer.plan_capacities(iter(stream))  # as the loop plans an epoch: routes found on the host
    for batch in stream:
        planned = trainer.prepare(trainer.with_capacities(batch, capacities), train=True) if capacities else batch
        state, metrics = trainer.train_step(state, planned, prepared=bool(capacities))
        jax.block_until_ready(metrics)
    readable = trainer.readable(state)
    probs = np.asarray(trainer.eval_step(readable, stream[0]))
    params = trainer.logical_params(readable)
    out[devices] = {"probs": probs.tolist(), "loss": float(metrics["loss"]),
                    "params": {jax.tree_util.keystr(p): np.asarray(v).tolist()
                               for p, v in jax.tree_util.tree_leaves_with_path(params)},
                    "spec": str(state.params["mid_table"].sharding.spec)}
print("RESULT" + json.dumps(out))
"""


# Slow (CI runs it): tests/test_owned_ids trains 4 devices against one with a routed vocabulary table under exact
# Adam and micro-batches, beside the owned ones.
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "adagraddecay"])
def test_four_devices_with_routed_tables_train_as_one_device(optimizer):
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, optimizer], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    one = result["1"]
    assert one["spec"] == "P()" and result["4"]["spec"] == "P('data',)"
    for devices in ("4",):
        many = result[devices]
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-6)
        real = skewed_batches(4, seed=5)[0]["weight"] > 0  # padding rows' probabilities are not defined
        np.testing.assert_allclose(np.array(many["probs"])[real], np.array(one["probs"])[real], rtol=1e-5, atol=1e-6)
        for name, value in one["params"].items():
            if "att_out" in name and "bias" in name:
                continue  # softmax-invariant: its gradient is float noise Adam scales up (see test_parallel)
            np.testing.assert_allclose(many["params"][name], value, rtol=1e-5, atol=1e-6, err_msg=devices + name)


def test_a_checkpoint_split_over_other_devices_is_refused_in_one_line_naming_both_counts(tmp_path):
    from din_jax import checkpoint as checkpoint_lib
    state = {"w": jnp.zeros([4, 2])}
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_steps=0, keep_max=1)
    try:
        # Written by a 4-device run with the user and item tables split, the category table whole.
        assert checkpointer.save(5, state, force=True, extra={checkpoint_lib.TABLE_LAYOUT: np.array([4, 4, 1])})
        checkpointer.manager.wait_until_finished()
        same = {"uid_table": 4, "mid_table": 4, "cat_table": 1}
        restored, _ = checkpointer.restore_latest_with_extra(state, table_layout=same)
        np.testing.assert_array_equal(restored["w"], state["w"])
        with pytest.raises(checkpoint_lib.CheckpointError) as error:
            checkpointer.restore_latest_with_extra(state, table_layout={"uid_table": 1, "mid_table": 1, "cat_table": 1})
    finally:
        checkpointer.close()
    message = str(error.value)
    assert "\n" not in message
    assert "over 4 device(s) (uid_table over 4, mid_table over 4), this run over 1 (none)" in message
