"""A run's latest checkpoint read back on one host with every table whole, however many devices split it (export).

With config.shard_embeddings a run saves its large tables owner-major over its N devices
(din_jax.sharded_tables), and ev / adaptive / dynamic tables with one id mapping per device
(din_jax.owned_ids). Export needs one table and one mapping per feature. This restores the split arrays on
this host's device, moves every row (and its optimizer rows) to where a whole table has it, merges the
devices' mappings (owned_ids.merged_state), and returns the single-device Trainer whose model and mappings
fit them. A checkpoint of whole tables is restored as it is.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from din_jax import checkpoint as checkpoint_lib
from din_jax import ev, owned_ids, parallel, sharded_tables
from din_jax.steps import TrainState
from din_jax.trainer import Trainer, create_trainer
from din_jax.host_embeddings import table_kinds
from din_jax.model import TABLES


def restore_whole(config: ml_collections.ConfigDict, vocab_sizes: Mapping[str, int], id_sizes: Mapping[str, int],
                  checkpoint_dir: str) -> tuple[Trainer, tuple[TrainState, dict[str, np.ndarray]] | None]:
    """(a single-device Trainer for `config`, (state, host-side arrays) of the newest checkpoint in
    `checkpoint_dir` with whole tables, or None when there is none); raises checkpoint_lib.CheckpointError."""
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, 0, config.keep_checkpoint_max)
    try:
        extra = checkpointer.latest_extra()
        layout = dict(zip(TABLES, (int(n) for n in extra.get(checkpoint_lib.TABLE_LAYOUT, [1] * len(TABLES)))))
        if max(layout.values()) == 1:
            trainer = create_trainer(config, dict(vocab_sizes), id_sizes=dict(id_sizes))
            return trainer, checkpointer.restore_latest_with_extra(trainer.init_state(config))
        mesh = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
        per_device = checkpointer.restore_per_device(mesh, extra)
        whole_config, sizes = ml_collections.ConfigDict(config.to_dict()), dict(id_sizes)
        whole_config.shard_embeddings = False
        kinds, merged, physical, split_rows = table_kinds(config), {}, {}, {}
        for table, shards in layout.items():
            if shards == 1:
                continue
            feature = table.removesuffix("_table")
            states = [ev.table_state(device, table) for device in per_device]
            if states and states[0]:  # owned: its devices' mappings become one
                merged[table], sizes[feature], physical[table] = owned_ids.merged_state(
                    kinds[table], states, config.adaptive_hash_bucket_size)
                split_rows[table] = shards * states[0]["row_step"].size
                whole_config.ev_capacity = 0  # each owned table's capacity: its devices' rows together (`sizes`)
            else:
                rows = vocab_sizes[feature]
                physical[table] = sharded_tables.physical_ids(np.arange(rows), rows, shards)
                split_rows[table] = shards * sharded_tables.rows_per_shard(rows, shards)
        trainer = create_trainer(whole_config, dict(vocab_sizes), id_sizes=sizes)
        restored = checkpointer.restore_latest_with_extra(_with_rows(trainer.init_state(whole_config), split_rows))
    finally:
        checkpointer.close()
    if restored is None:
        return trainer, None
    state, extra = restored
    state = _with_rows(state, {table: jnp.asarray(rows) for table, rows in physical.items()})
    for table, mapping_state in merged.items():
        for key, value in trainer.host.mappings[table].state_dict().items():  # a fresh filter's counters, if any
            mapping_state.setdefault(key, value)
        extra.update({f"embedding/{table}/{key}": value for key, value in mapping_state.items()})
    return trainer, (state, extra)


def _with_rows(state: TrainState, rows: Mapping[str, Any]) -> TrainState:
    """`state` with these tables' rows (and optimizer rows) replaced: an int -> that many zero rows (a restore
    target of the split shape), an index array -> the rows it picks."""
    def pick(leaf: jax.Array, table: str) -> jax.Array:
        if isinstance(rows[table], int):
            return jnp.zeros((rows[table], *leaf.shape[1:]), leaf.dtype)
        return leaf[rows[table]]

    params = {**state.params, **{t: pick(state.params[t], t) for t in rows}}
    row_slots = {**state.opt_state["rows"],
                 **{t: {k: pick(v, t) for k, v in state.opt_state["rows"][t].items()} for t in rows}}
    return state.replace(params=params, opt_state={**state.opt_state, "rows": row_slots})
