"""Raw-id tables split over the devices with their id mappings (din_jax.owned_ids): owners, adaptive buckets,
per-device checkpoints, and training on 4 devices equal to one process's replicated mapping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from din_jax import checkpoint as checkpoint_lib
from din_jax import ev, owned_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_owners_spread_ids_and_adaptive_ids_follow_their_hashed_bucket():
    raw = np.arange(10_000, dtype=np.int64) * 7919
    owner = owned_ids.owners(raw, 4)
    assert owner.dtype == np.int32 and set(owner.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(owner, owned_ids.owners(raw, 4))  # a pure function of the id
    assert np.bincount(owner).min() > 2_300  # balanced within a few percent of 2,500
    buckets = (ev.hash64(raw) % np.uint64(50)).astype(np.int64)
    np.testing.assert_array_equal(owned_ids.owners(raw, 4, hash_buckets=50), buckets % 4)
    assert owned_ids.rows_per_device(owner, 4, capacity=0) == np.bincount(owner).max()  # exactly the ids owned
    assert owned_ids.rows_per_device(owner, 4, capacity=1001) == 251


def test_adaptive_shards_hold_every_hashed_row_once_with_the_whole_tables_default_row():
    whole = ev.AdaptiveEmbedding(20, 10, 4)
    shards = [ev.AdaptiveEmbedding(5, 10, 4, shard=(d, 4)) for d in range(4)]
    assert {s.num_rows for s in shards} == {5 + 3}  # ceil(10 / 4) hashed rows each, the last ones partly unused
    whole_slots, whole_sources = whole.initial_rows()
    by_bucket = dict(zip(whole_slots - 20, whole_sources))
    seen = {}
    for d, shard in enumerate(shards):
        slots, sources = shard.initial_rows()
        for slot, source in zip(slots, sources):
            seen[(slot - 5) * 4 + d] = source  # local bucket j of device d is bucket j * 4 + d
    assert seen == by_bucket
    ids = np.arange(200, dtype=np.int64)
    bucket = whole.map(ids, 0, train=False).slots - 20
    for d, shard in enumerate(shards):
        mine = owned_ids.owners(ids, 4, hash_buckets=10) == d
        np.testing.assert_array_equal(shard.map(ids[mine], 0, train=False).slots - 5, bucket[mine] // 4)


def test_per_device_host_state_round_trips_through_a_checkpoint(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    states = [{"embedding/mid_table/slot_ids": np.array([3, -1, 7], np.int64), "empty": np.zeros(0, np.float32)}]
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_steps=0, keep_max=1)
    try:
        assert checkpointer.save(2, {"w": jax.numpy.ones(3)}, force=True, extra={"other": np.arange(2)},
                                 per_device=states, mesh=mesh)
        checkpointer.manager.wait_until_finished()
        _, extra = checkpointer.restore_latest_with_extra({"w": jax.numpy.zeros(3)})
        restored = checkpointer.restore_per_device(mesh, extra)
    finally:
        checkpointer.close()
    assert extra["other"].tolist() == [0, 1]
    assert len(restored) == 1 and restored[0].keys() == states[0].keys()
    np.testing.assert_array_equal(restored[0]["embedding/mid_table/slot_ids"], [3, -1, 7])
    assert restored[0]["empty"].shape == (0,)


def owned_config(shard_embeddings: bool = False):
    """uid adaptive and mid dynamic-dimension EV with a counter filter (owned when split), cat a plain vocabulary
    table (routed when split: shard_min_rows 1), exact Adam on it, gradients over two micro-batches."""
    from tests.test_sparse import config_for
    config = config_for(shard_embeddings=shard_embeddings, learning_rate=0.001, adaptive_hash_bucket_size=8,
                        adaptive_promote_freq=2, ev_filter="counter", ev_filter_freq=2, dynamic_block_size=6,
                        dynamic_thresholds=(2.0, 4.0), ev_elimination="l2", ev_l2_threshold=0.2, shard_min_rows=1,
                        micro_batch=2)
    config.embeddings.update(dict(uid="adaptive", mid="dynamic", cat="dense"))
    return config


# Run in a child process: the parent's JAX has one CPU device, the child four. One config (owned_config) on one
# device (one replicated mapping per table) and split over four (each device maps the ids it owns; the plain
# category table routed as any split vocabulary table).
_DEVICES_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
from din_jax import checkpoint as checkpoint_lib
from din_jax import owned_ids, train
from din_jax.model import TABLES
from tests.test_embedding_kinds import RAW_IDS
from tests.test_owned_ids import owned_config

RAW = {f: ids for f, ids in RAW_IDS.items() if f != "cat"}  # the raw-id kinds' features
from tests.test_sparse import VOCAB, skewed_batches

stream = skewed_batches(5, seed=3)
out = {}
for devices in (1, 4):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    config = owned_config(shard_embeddings=devices > 1)
    trainer = train.create_trainer(config, VOCAB, mesh=mesh, raw_ids=RAW, id_sizes=VOCAB)
    state = trainer.init_state(config)
    evicted = None
    for step, batch in enumerate(stream):
        state, metrics = trainer.train_step(state, trainer.host.map_batch(batch, step, train=True))
        if step == 2:  # l2 eviction as a checkpoint save runs it: weights of the rows where they live
            evicted = trainer.host.evict(step + 1, lambda t: train._local_shards(
                train._row_l2_weights(state.params[t]), whole=t not in trainer.host.owned))
    if devices == 4:  # a checkpoint as training saves it, for the parent to read back whole
        checkpointer = checkpoint_lib.Checkpointer(sys.argv[1], 0, 1)
        checkpointer.save(len(stream), state, force=True, mesh=mesh, per_device=trainer.host.device_state_dicts(),
                          extra={**trainer.host.state_dict(),
                                 checkpoint_lib.TABLE_LAYOUT: np.array(list(trainer.table_layout().values()))})
        checkpointer.close()
    readable = trainer.readable(state)
    mapped = trainer.host.map_batch(stream[0], 0, train=False)  # logical rows, as the steps take them
    looked_up = trainer.physical_ids(mapped)  # rows of the owner-major global arrays
    embeddings = {}
    for table, columns in TABLES.items():
        rows = np.asarray(jax.device_get(readable.params[table]))
        rows = np.concatenate([rows, np.zeros((1, rows.shape[1]), rows.dtype)])  # out of range: no row, zeros
        for column in columns:
            embeddings[column] = rows[np.minimum(looked_up[column], len(rows) - 1)].tolist()
            if column + "_blocks" in looked_up:
                embeddings[column + "_blocks"] = looked_up[column + "_blocks"].tolist()
    foreign = 0  # ids held by a device that does not own them
    for t in trainer.host.owned.values():
        for k, device in enumerate(t.devices):
            held = t.mappings[k].state_dict()["slot_ids"]
            held = held[held >= 0]
            buckets = config.adaptive_hash_bucket_size if t.kind == "adaptive" else 0
            foreign += int((owned_ids.owners(held, devices, buckets) != device).sum())
    out[devices] = {"loss": float(metrics["loss"]), "probs": np.asarray(trainer.eval_step(readable, mapped)).tolist(),
                    "embeddings": embeddings, "evicted": evicted, "owned": sorted(trainer.host.owned),
                    "foreign": foreign, "routed": len(trainer.routed or ()),
                    "rows_held": {t: m.stats().get("rows_held") for t, m in trainer.host.mappings.items()},
                    "dense": [np.asarray(v).tolist() for k, v in sorted(readable.params.items()) if k not in TABLES
                              for v in jax.tree.leaves(v)]}
print("RESULT" + json.dumps(out))
"""


def test_four_devices_mapping_the_ids_they_own_train_as_one_replicated_mapping(tmp_path):
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(tmp_path / "checkpoints")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, four = (json.loads(done.stdout.split("RESULT", 1)[1])[k] for k in ("1", "4"))
    assert one["owned"] == [] and four["owned"] == ["mid_table", "uid_table"] and four["routed"] == 3
    assert four["foreign"] == 0
    assert four["rows_held"] == one["rows_held"]  # the same ids admitted or promoted, split over the devices
    assert four["evicted"] == one["evicted"] and sum(one["evicted"].values()) > 0
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-6)
    np.testing.assert_allclose(four["probs"], one["probs"], rtol=1e-5, atol=1e-6)
    for column, values in one["embeddings"].items():  # every id's embedding (and live blocks), wherever its row is
        np.testing.assert_allclose(four["embeddings"][column], values, rtol=1e-5, atol=1e-7, err_msg=column)
    for left, right in zip(one["dense"], four["dense"]):
        np.testing.assert_allclose(right, left, rtol=1e-4, atol=2e-5)  # att_out's bias: float noise Adam scales

    # Export's reading of that 4-device checkpoint on this 1-device process: whole tables, one mapping per feature
    # (whole_tables.restore_whole), predicting as the 1-device run.
    from din_jax import whole_tables
    from tests.test_embedding_kinds import RAW_IDS
    from tests.test_sparse import VOCAB, skewed_batches
    trainer, (state, extra) = whole_tables.restore_whole(owned_config(True), VOCAB, VOCAB,
                                                         str(tmp_path / "checkpoints"))
    trainer.host.load_state_dict(extra)
    # As train.load_data hashes the raw-id kinds' tokens (export's encoder keys them so too).
    trainer.host.raw_ids = {f: ids for f, ids in RAW_IDS.items() if f != "cat"}
    mapped = trainer.host.map_batch(skewed_batches(5, seed=3)[0], 0, train=False)
    np.testing.assert_allclose(trainer.eval_step(trainer.readable(state), mapped), one["probs"], rtol=1e-5, atol=1e-6)
