"""Training DIN: the train state, jitted train and eval steps, and the train-and-evaluate loop."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterator, NamedTuple

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter

from din_jax import checkpoint as checkpoint_lib
from din_jax import config_check, jsonfile, parallel, plots
from din_jax import incremental as incremental_lib
from din_jax.metrics import StreamingMetrics
from din_jax import sharded_tables
from din_jax.embedding import (LOOKUP_IDS, RowLookup, embedded_from_rows, gather_rows, host_row_lookups,
                               initialise_rows, pop_host_lookups, row_lookups, scatter_rows, split_tables,
                               touched_ids, unique_ids)
from din_jax.feed import QUEUE_DONE, WorkQueueFeed
from din_jax import ev
from din_jax.host_embeddings import (INIT_SLOTS, INIT_SOURCES, RAW_ID_KINDS, HostEmbeddings, create_mappings,
                                     owned_tables, table_kinds, uses_raw_ids)
from din_jax.model import DIN, TABLES, TableSpec, lookup_columns
from din_jax.optim import Optimizer, clip_tensor, create_optimizer
from din_jax.packing import pack_history, packed_size
from din_jax.prefetch import Prefetcher
from din_jax.progress import progress_bar
from input_pipeline import batches as batches_lib
from input_pipeline import datasets, dien, mapped
from input_pipeline.synthetic import SyntheticSpec

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Data:
    """The prepared data of a run: the vocabularies' sizes and the encoded train and test splits.

    The token -> id dictionaries themselves are not kept (0.6 GB at Taobao's 4M items); whatever needs them
    (export, predict) reads them with dien.load_vocabularies(data_dir).
    """

    data_dir: str
    vocab_sizes: dict[str, int]
    train: dien.EncodedSplit
    test: dien.EncodedSplit
    # Raw-id embedding kinds (config.ev ...): the splits encode every distinct token (dien.open_vocabularies);
    # raw_ids[feature] is the 64-bit hash of each encoded token, id_sizes the encoded ids per feature.
    raw_ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    id_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


# precision -> (the top MLP's compute dtype, the embedding tables' dtype); see model.DIN. mixed_bf16 is DeepRec's
# --bf16; bf16 stores the tables (99.9% of the parameters) in bf16 and computes in fp32.
PRECISIONS = {"fp32": (jnp.float32, jnp.float32), "mixed_bf16": (jnp.bfloat16, jnp.float32),
              "bf16": (jnp.float32, jnp.bfloat16)}


def build_model(config: ml_collections.ConfigDict, vocab_sizes: dict[str, int],
                table_specs: dict[str, TableSpec] | None = None) -> DIN:
    """The DIN module for `config.model`, `config.precision`, the tables' row counts and their embedding kinds."""
    m = config.model
    dtype, table_dtype = PRECISIONS[config.precision]
    return DIN(vocab_sizes=dict(vocab_sizes), embedding_dim=m.embedding_dim,
               attention_hidden=tuple(m.attention_hidden), mlp_hidden=tuple(m.mlp_hidden), mlp_out=m.mlp_out,
               batch_norm=m.batch_norm, activation=m.activation, attention=m.attention, dtype=dtype,
               table_dtype=table_dtype, table_specs=tuple(sorted((table_specs or {}).items())))


def dummy_batch(batch_size: int, max_seq_length: int) -> Batch:
    """A batch of zeros with the real shapes and dtypes, for initialisation and compilation."""
    ids = np.zeros([batch_size], np.int32)
    history = np.zeros([batch_size, max_seq_length], np.int32)
    return {"uid": ids, "mid": ids, "cat": ids, "hist_mids": history, "hist_cats": history,
            "hist_mask": history.astype(bool), "label": ids.astype(np.float32),
            "weight": np.ones([batch_size], np.float32), "user": ids}


def create_train_state(config: ml_collections.ConfigDict, model: DIN, optimizer: Optimizer,
                       routed: tuple[str, ...] = (), shards: int = 1,
                       initial_rows: dict[str, tuple[Any, Any, Any]] | None = None) -> TrainState:
    """Parameters initialised as the seed's TF1 graph does, from `config.seed`, and fresh optimizer slots.

    routed: tables split over `shards` devices, laid out owner-major (sharded_tables.to_physical).
    initial_rows: per table (slots, sources, default matrix) to set at creation (embedding.initialise_rows).
    """
    # Initialise in fp32 and cast, so every precision starts from the same numbers.
    # Routed tables are created in their owner-major layout: under init_state's sharded jit each device builds
    # only its own rows, so a table larger than one process's memory can be created.
    fp32_model = model.clone(dtype=jnp.float32, table_dtype=jnp.float32,
                             table_shards=tuple((name, shards) for name in routed))
    variables = fp32_model.init(jax.random.PRNGKey(config.seed), dummy_batch(2, config.max_seq_length))
    params = {name: p.astype(model.table_dtype) if name in TABLES else p for name, p in variables["params"].items()}
    for name, (slots, sources, defaults) in (initial_rows or {}).items():
        params[name] = initialise_rows(params[name], jnp.asarray(slots), jnp.asarray(sources), jnp.asarray(defaults))
    if config.sparse_embeddings:
        tables, dense = split_tables(params)
        slots = {name: optimizer.rows[name].init(table) for name, table in tables.items()}
        opt_state = {"dense": optimizer.dense.init(dense), "rows": {k: v[0] for k, v in slots.items()},
                     "tables": {k: v[1] for k, v in slots.items()}}
    else:
        opt_state = {"dense": optimizer.dense.init(params)}
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=opt_state)


def weighted_sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                                   total_weight: jax.Array | None = None) -> jax.Array:
    """Sigmoid cross-entropy summed over real rows (weight 1) / total_weight (default: their count)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    if total_weight is None:
        total_weight = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(losses * weights) / total_weight


def _split_micro(tree: Any, n: int) -> Any:
    """[B, ...] leaves -> [n, B/n, ...]: the micro-batches of a batch, for lax.scan (packed index: [1, P])."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), tree)


def _micro_inverses(lookups: dict[str, RowLookup], batch: Batch, n: int,
                    specs: dict[str, TableSpec]) -> dict[str, jax.Array]:
    """Each table's inverse index cut into n micro-batches: [n, lookups per micro-batch].

    With n > 1 batches are not packed, so a history column holds B * T lookups.
    """
    if n == 1:
        return {table: lookup.inverse[None] for table, lookup in lookups.items()}
    out = {}
    for table, lookup in lookups.items():
        parts, offset = [], 0
        for column in lookup_columns(table, specs.get(table)):
            size = batch[column].size  # B for a target column, B * T for a history column
            parts.append(lookup.inverse[offset:offset + size].reshape(n, -1))
            offset += size
        out[table] = jnp.concatenate(parts, axis=1)
    return out


def global_row_lookups(batch: Batch, table_sizes: dict[str, int], axis_name: str,
                       specs: dict[str, TableSpec]) -> dict[str, RowLookup]:
    """Per table, the rows the whole global batch touches and this shard's inverse index into them.

    Inside shard_map over `axis_name`, `batch` is one shard: its touched ids are gathered from every
    shard, so the unique ids (sorted, padded with the table size) are the same on every device and
    equal the single-process ones; each shard keeps the inverse index of its own lookups.
    """
    lookups = {}
    for table in TABLES:
        columns = lookup_columns(table, specs.get(table))
        ids = jnp.concatenate([touched_ids(batch, c, table_sizes[table]) for c in columns])    # [L]
        every = jax.lax.all_gather(ids, axis_name, tiled=True)                                  # [n * L]
        # At most table size + 1 distinct values (the padding id is the table size): small tables stay small.
        size = min(every.shape[0], table_sizes[table] + 1)
        unique, inverse = unique_ids(every, table_sizes[table], size)
        mine = jax.lax.dynamic_slice_in_dim(inverse.reshape(-1), jax.lax.axis_index(axis_name) * ids.shape[0],
                                            ids.shape[0])
        lookups[table] = RowLookup(unique, mine)
    return lookups


def state_specs(state: TrainState, axis_name: str, routed: tuple[str, ...]) -> Any:
    """The PartitionSpec of every leaf of `state`: the `routed` tables and their row slots split over `axis_name`
    by rows, everything else replicated."""
    specs = jax.tree.map(lambda _: P(), state)
    if not routed:
        return specs
    rows = P(axis_name)
    params = {**specs.params, **{name: rows for name in routed}}
    opt_state = {**specs.opt_state, "rows": {**specs.opt_state["rows"], **{
        name: jax.tree.map(lambda _: rows, state.opt_state["rows"][name]) for name in routed}}}
    return specs.replace(params=params, opt_state=opt_state)


def _table_stand_ins(model: DIN, tables: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Unread (compiled away) arrays of the model's table shapes, for applying DIN.from_embedded without the tables."""
    return {name: jnp.broadcast_to(jnp.zeros([], t.dtype), (model.vocab_sizes[name.removesuffix("_table")],
                                                             t.shape[1])) for name, t in tables.items()}


def train_step(model: DIN, optimizer: Optimizer, sparse: bool, micro_batch: int, axis_name: str,
               routed: tuple[str, ...] | None, defaults: dict[str, Any], state: TrainState, batch: Batch
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch, gradients accumulated over `micro_batch` slices; returns state and loss.

    Runs inside shard_map over the mesh's `axis_name`: `batch` is this device's shard, and the state
    is replicated. Each device differentiates its shard's share of the global mean loss; the
    gradients are summed over the axis (the data-parallel all-reduce), so every device applies the
    same update, equal to one device's update on the whole batch.
    sparse: gradients w.r.t. the gathered embedding rows, and only those rows (and their optimizer
    slots) updated; else gradients w.r.t. whole tables (the O(vocabulary) reference path).
    routed: None when tables are replicated (each device looks up the rows the whole global batch touches, and
    their gradients are all-reduced); else (sparse only, config.shard_embeddings) the tables split over the
    devices, whose lookups go to the rows' owners (din_jax.sharded_tables), the other tables replicated with
    their gradients all-reduced as dense buffers.
    defaults: per table, the default matrix rows newly admitted ids start from (din_jax.host_embeddings).
    """
    n = max(micro_batch, 1)
    specs = dict(model.table_specs)
    batch, host_lookups = pop_host_lookups(batch)
    batch, state = _initialise_admitted_rows(optimizer, defaults, batch, state)
    # The loss is the mean over the whole global batch.
    examples = jax.lax.psum(jnp.sum(batch["weight"]), axis_name)
    total_weight = jnp.maximum(examples, 1.0)
    tables, dense = split_tables(state.params)

    if sparse and routed is not None:
        batch, lookups, rows, routes = _sharded_lookups(model, tables, batch, routed, axis_name, host_lookups)
        table_params = _table_stand_ins(model, tables)
    elif sparse:
        lookups = host_lookups or global_row_lookups(batch, {k: v.shape[0] for k, v in tables.items()}, axis_name,
                                                     specs)
        rows = {k: gather_rows(tables[k], lookups[k].ids) for k in tables}
        table_params = tables
    if sparse:
        # Differentiated in fp32 whatever the tables' dtype: bf16 tables store rows, the gradients stay exact.
        variables_in = (dense, {k: v.astype(jnp.float32) for k, v in rows.items()})
        micro_data = (_split_micro(batch, n), _micro_inverses(lookups, batch, n, specs))

        def forward(diff, data, batch_stats):
            dense_params, rows = diff
            micro, inverses = data
            embedded = embedded_from_rows(rows, {k: RowLookup(lookups[k].ids, inverses[k]) for k in rows}, micro,
                                          specs)
            variables = {"params": {**dense_params, **table_params}, "batch_stats": batch_stats}
            return model.apply(variables, embedded, micro["weight"], True, method=DIN.from_embedded,
                               mutable=["batch_stats"])
    else:
        variables_in = state.params
        micro_data = _split_micro(batch, n)

        def forward(params, micro, batch_stats):
            return model.apply({"params": params, "batch_stats": batch_stats}, micro, train=True,
                               mutable=["batch_stats"])

    def loss_fn(diff, data, batch_stats):
        (logits, _), updates = forward(diff, data, batch_stats)
        micro = data[0] if sparse else data
        loss = weighted_sigmoid_cross_entropy(logits, micro["label"], micro["weight"], total_weight)
        return loss, updates.get("batch_stats", batch_stats)

    def accumulate(carry, data):
        grads, loss, batch_stats = carry
        (micro_loss, batch_stats), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(variables_in, data,
                                                                                           batch_stats)
        return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss, batch_stats), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), variables_in)
    (grads, loss, batch_stats), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros([], jnp.float32), state.batch_stats),
                                                 micro_data)
    if sparse and routed is not None:
        new_params, opt_state, loss = _sharded_update(optimizer, state, grads, loss, lookups, routes, routed,
                                                      axis_name)
    elif sparse:
        new_params, opt_state, loss = _replicated_update(optimizer, state, grads, loss, variables_in, lookups,
                                                         axis_name)
    else:
        grads, loss = _psum_as_one_buffer((grads, loss), axis_name)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, variables_in)
        updates, dense_opt = optimizer.dense.update(grads, state.opt_state["dense"], state.params)
        new_params, opt_state = optax.apply_updates(state.params, updates), {"dense": dense_opt}
    new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=batch_stats, opt_state=opt_state)
    if QUEUE_DONE not in batch:
        return new_state, {"loss": loss}
    # Work queue: a step may hold no example at all (every process's share empty); it must change nothing.
    # Table rows are untouched then (no ids), so only the small leaves need the select.
    new_state = _unless_empty(examples > 0, new_state, state, sparse)
    return new_state, {"loss": loss, "examples": examples,
                       "queue_done": jax.lax.psum(batch[QUEUE_DONE][0], axis_name)}


def _replicated_update(optimizer: Optimizer, state: TrainState, grads: Any, loss: jax.Array, variables_in: Any,
                       lookups: dict[str, RowLookup], axis_name: str) -> tuple[dict[str, jax.Array], dict[str, Any],
                                                                               jax.Array]:
    """The update with replicated tables: dense and row gradients (the global batch's unique rows, the same on every
    device) and the loss all-reduced as one buffer, then every device applies the same update.
    Returns (params, opt_state, the global loss)."""
    grads, loss = _psum_as_one_buffer((grads, loss), axis_name)
    dense, rows = variables_in
    dense_grads, row_grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, variables_in)
    dense_updates, dense_opt = optimizer.dense.update(dense_grads, state.opt_state["dense"], dense)
    params = dict(optax.apply_updates(dense, dense_updates))
    row_slots, table_slots = {}, {}
    for name in rows:
        params[name], row_slots[name], table_slots[name] = _update_rows(
            optimizer, name, state, lookups[name].ids, rows[name], clip_tensor(row_grads[name], optimizer.clip_norm))
    return params, {"dense": dense_opt, "rows": row_slots, "tables": table_slots}, loss


def _update_rows(optimizer: Optimizer, name: str, state: TrainState, ids: jax.Array, rows: jax.Array,
                 grads: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Table `name` with its rows `ids` (out of range: padding, writes dropped) updated by its row rule from their
    current values `rows` and clipped gradients; returns (table, row slots, table slots)."""
    slots = state.opt_state["rows"][name]
    slot_rows = {k: v.at[ids].get(mode="clip") for k, v in slots.items()}
    rows, slot_rows, table_slots = optimizer.rows[name].update(rows, grads, slot_rows, state.opt_state["tables"][name],
                                                               state.step)
    return (scatter_rows(state.params[name], ids, rows), {k: scatter_rows(slots[k], ids, v) for k, v in slot_rows.items()},
            table_slots)


def _sharded_lookups(model: DIN, tables: dict[str, jax.Array], batch: Batch, routed: tuple[str, ...], axis_name: str,
                     host_lookups: dict[str, RowLookup] | None = None
                     ) -> tuple[Batch, dict[str, RowLookup], dict[str, jax.Array], dict[str, Any]]:
    """This device's own lookups (unique ids of its shard) and their rows: routed tables' from the rows' owners
    (sharded_tables.gather_routed, the capacity read from the batch), replicated tables' from the local copy.
    host_lookups: the lookups found on the host (Trainer._host_routes; the batch then carries the routes too).
    Returns (batch without the capacity placeholders and host routes, lookups, rows, routes of the routed tables)."""
    capacities = {name: sharded_tables.capacity_of(batch, name) for name in routed}
    route_columns = (sharded_tables.ROUTE_OWNER, sharded_tables.ROUTE_SLOT, sharded_tables.ROUTE_SEND)
    host_routes = {name: {c: batch[name + c] for c in route_columns} for name in routed
                   if name + route_columns[0] in batch}
    batch = {k: v for k, v in sharded_tables.without_capacities(batch).items() if not k.endswith(route_columns)}
    batch, host_lookups = (batch, host_lookups) if host_lookups is not None else pop_host_lookups(batch)
    sizes = {name: model.vocab_sizes[name.removesuffix("_table")] for name in TABLES}
    lookups = host_lookups or row_lookups(batch, sizes, dict(model.table_specs))
    rows, routes = {}, {}
    for name, table in tables.items():
        if name in routed:
            rows[name], routes[name] = sharded_tables.gather_routed(table, lookups[name].ids, sizes[name],
                                                                    capacities[name], axis_name, host_routes.get(name))
        else:
            rows[name] = gather_rows(table, lookups[name].ids)
    return batch, lookups, rows, routes


def _sharded_update(optimizer: Optimizer, state: TrainState, grads: Any, loss: jax.Array,
                    lookups: dict[str, RowLookup], routes: dict[str, Any], routed: tuple[str, ...], axis_name: str
                    ) -> tuple[dict[str, jax.Array], dict[str, Any], jax.Array]:
    """The update with routed tables: the dense gradients, the loss and the replicated tables' dense row gradients
    all-reduced as one buffer; each routed table's row gradients sent to the rows' owners, which update them.
    Returns (params, opt_state, the global loss)."""
    tables, dense = split_tables(state.params)
    dense_grads, row_grads = grads
    replicated = {name: sharded_tables.dense_gradient(row_grads[name], lookups[name].ids, tables[name].shape[0])
                  for name in tables if name not in routed}
    dense_grads, loss, replicated = _psum_as_one_buffer((dense_grads, loss, replicated), axis_name)
    dense_grads = jax.tree.map(lambda g, p: g.astype(p.dtype), dense_grads, dense)
    dense_updates, dense_opt = optimizer.dense.update(dense_grads, state.opt_state["dense"], dense)
    params = dict(optax.apply_updates(dense, dense_updates))
    row_slots, table_slots = {}, {}
    for name, (full, touched) in replicated.items():  # every row of a small table; untouched ones are not written
        ids = jnp.where(touched > 0, jnp.arange(touched.shape[0]), touched.shape[0])
        params[name], row_slots[name], table_slots[name] = _update_rows(
            optimizer, name, state, ids, tables[name].astype(jnp.float32), clip_tensor(full, optimizer.clip_norm))
    for name in routed:  # the owner's half: its rows `local` (Q: padding), their gradients summed over the devices
        local, summed = sharded_tables.owner_gradients(row_grads[name], routes[name], tables[name].shape[0], axis_name)
        params[name], row_slots[name], table_slots[name] = _update_rows(
            optimizer, name, state, local, gather_rows(tables[name], local).astype(jnp.float32),
            clip_tensor(summed, optimizer.clip_norm, axis_name))
    return params, {"dense": dense_opt, "rows": row_slots, "tables": table_slots}, loss


def _psum_as_one_buffer(tree: Any, axis_name: str) -> Any:
    """psum of a pytree of float32 leaves as one flat array.

    XLA:CPU runs an all-reduce of many arrays as one collective call per array, each a point where every
    process must meet; one buffer made a 2-process step 2.3-3.4x faster (benchmarks/multiprocess.py). On one
    device the psum is a no-op, and the concatenation is skipped.
    """
    if jax.lax.axis_size(axis_name) == 1:
        return tree
    flat, unravel = jax.flatten_util.ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axis_name))


def _initialise_admitted_rows(optimizer: Optimizer, defaults: dict[str, Any], batch: Batch,
                              state: TrainState) -> tuple[Batch, TrainState]:
    """Takes the rows to initialise (host_embeddings' init columns: the same list on every device) out of the
    batch and sets them, and fresh optimizer slots for them, before the step looks anything up."""
    tables = [t for t in TABLES if t + INIT_SLOTS in batch]
    if not tables:
        return batch, state
    batch = dict(batch)
    params, row_slots = dict(state.params), dict(state.opt_state["rows"])
    for table in tables:
        slots, sources = batch.pop(table + INIT_SLOTS), batch.pop(table + INIT_SOURCES)
        params[table] = initialise_rows(params[table], slots, sources, jnp.asarray(defaults[table]))
        fresh = optimizer.rows[table].init(jnp.zeros((1, params[table].shape[1]), params[table].dtype))[0]
        row_slots[table] = {k: v.at[slots].set(jnp.broadcast_to(fresh[k][0], (slots.shape[0], *v.shape[1:])),
                                               mode="drop")
                            for k, v in row_slots[table].items()}
    return batch, state.replace(params=params, opt_state={**state.opt_state, "rows": row_slots})


def _unless_empty(active: jax.Array, new: TrainState, old: TrainState, sparse: bool) -> TrainState:
    """`new` where the step had examples, else `old`, selecting every leaf but embedding tables and their row slots."""
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(active, x, y), a, b)  # noqa: E731
    if not sparse:
        return pick(new, old)
    new_tables, new_dense = split_tables(new.params)
    _, old_dense = split_tables(old.params)
    opt_state = {**pick({k: v for k, v in new.opt_state.items() if k != "rows"},
                        {k: v for k, v in old.opt_state.items() if k != "rows"}),
                 "rows": new.opt_state["rows"]}
    return new.replace(step=pick(new.step, old.step), params={**pick(new_dense, old_dense), **new_tables},
                       batch_stats=pick(new.batch_stats, old.batch_stats), opt_state=opt_state)


def eval_step(model: DIN, state: TrainState, batch: Batch) -> jax.Array:
    """Click probabilities [B] for `batch` (fp32)."""
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch)
    return jax.nn.sigmoid(logits)


def sharded_eval_step(model: DIN, axis_name: str, routed: tuple[str, ...], state: TrainState, batch: Batch
                      ) -> jax.Array:
    """eval_step inside shard_map with the `routed` tables split over `axis_name`: each device's lookups are
    routed to their rows' owners (sharded_tables)."""
    tables, dense = split_tables(state.params)
    batch, lookups, rows, _ = _sharded_lookups(model, tables, batch, routed, axis_name)
    variables = {"params": {**dense, **_table_stand_ins(model, tables)}, "batch_stats": state.batch_stats}
    logits, _ = model.apply(variables, embedded_from_rows(rows, lookups, batch, dict(model.table_specs)),
                            batch["weight"], method=DIN.from_embedded)
    return jax.nn.sigmoid(logits)


def load_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Prepares (built-in data) or locates (dien) the data directory and encodes both splits."""
    if config.dataset == "synthetic":
        spec_fields = {k: v for k, v in config.synthetic.to_dict().items() if k != "seed"}
        spec_fields["interests_per_user"] = tuple(spec_fields["interests_per_user"])
        data_dir = datasets.builtin_data_dir(config.data_dir or os.path.join(workdir, "data"),
                                             SyntheticSpec(**spec_fields), config.synthetic.seed, config.prepare_seed)
    else:
        data_dir = datasets.require_prepared(config.data_dir)
    if config.history_keep == "auto":  # resolved here, so config.json and exports record the value used
        config.history_keep = dien.default_history_keep(data_dir)
    vocabs = dien.load_vocabularies(data_dir)
    encoding, raw_ids = vocabs, {}
    if uses_raw_ids(config):
        encoding = dien.open_vocabularies(data_dir, vocabs)
        raw_ids = {table.removesuffix("_table"): ev.hash_tokens(dien.tokens_by_id(
                   getattr(encoding, table.removesuffix("_table"))))
                   for table, kind in table_kinds(config).items() if kind in RAW_ID_KINDS}
    train_split, test_split = dien.load_split(data_dir, "train", encoding), dien.load_split(data_dir, "test", encoding)
    return Data(data_dir, vocabs.sizes, train_split, test_split, raw_ids, encoding.sizes)


class _Item(NamedTuple):
    """One global batch as this process sees it."""

    batch: Batch    # this process's contiguous share of the global batch (numpy)
    pack_size: int  # the packed history size of every batch shard (0: not packed)
    examples: int   # real examples in the whole global batch


def _items(split: dien.EncodedSplit, plan: batches_lib.Plan, local: Iterator[Batch], trainer: Trainer,
           batch_size: int) -> Iterator[_Item]:
    """This process's batches of `plan`, each with what every process must agree on for it."""
    for batch, (indices, width) in zip(local, plan):
        yield _Item(batch, trainer.pack_size(mapped.take(split.hist_lengths, indices), batch_size, width), len(indices))


def evaluate(trainer: Trainer, state: TrainState, split: dien.EncodedSplit,
             config: ml_collections.ConfigDict) -> dict[str, float]:
    """Every metric over the whole split, each example exactly once; every process gets the same numbers.

    Each process evaluates its share of every eval batch; probabilities, labels, users and weights
    of the whole batch are then gathered to every process in the single-process row order.
    """
    boundaries = tuple(config.bucket_boundaries)
    plan = batches_lib.eval_plan(split, config.eval_batch_size, config.max_seq_length, boundaries)
    local = functools.partial(batches_lib.eval_batches, split, config.eval_batch_size, config.max_seq_length,
                              keep=config.history_keep, shard_index=jax.process_index(),
                              shard_count=jax.process_count(), plan=plan)
    capacities = trainer.plan_capacities(local())
    metrics = StreamingMetrics()
    for item in _items(split, plan, local(), trainer, config.eval_batch_size):
        batch = trainer.with_capacities(item.batch, capacities)  # owned tables' exchange reads them too
        batch = trainer.host.map_batch(batch, 0, train=False) if trainer.host.active else batch
        device_batch = trainer.device_batch(trainer.prepare(batch, item.pack_size))
        columns = parallel.gather({"prob": trainer.jit_eval_step(state, device_batch),
                                   **{k: device_batch[k] for k in ("label", "user", "weight")}})
        metrics.update(columns["label"], columns["prob"], columns["user"], columns["weight"])
    return metrics.compute()


def _train_items(split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer,
                 start_step: int, whole: bool = False) -> Iterator[_Item]:
    """Endless train batches (this process's share of each, or `whole` global batches), epoch after epoch,
    from global step `start_step`."""
    boundaries = tuple(config.bucket_boundaries)
    per_epoch = batches_lib.num_train_batches(split, config.batch_size, config.max_seq_length, boundaries)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        plan = batches_lib.train_plan(split, config.batch_size, config.max_seq_length, seed=config.seed, epoch=epoch,
                                      boundaries=boundaries)
        local = functools.partial(batches_lib.train_batches, split, config.batch_size, config.max_seq_length,
                                  seed=config.seed, epoch=epoch, keep=config.history_keep,
                                  shard_index=0 if whole else jax.process_index(),
                                  shard_count=1 if whole else jax.process_count(), plan=plan)
        capacities = trainer.plan_capacities(local())  # routed tables: the whole epoch's, so one compiled shape
        for item in _items(split, plan[skip:], local(start_batch=skip), trainer, config.batch_size):
            yield item._replace(batch=trainer.with_capacities(item.batch, capacities)) if capacities else item
        epoch, skip = epoch + 1, 0


def _pack_floor(split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer) -> int:
    """The packed history size that fits every batch shard of the first epoch (one compiled train shape).

    The lengths are read once in order into a copy clipped to the width (1 byte a sample), not at random batch by
    batch: on a memory-mapped every-event split that would leave the whole column resident (input_pipeline.mapped).
    """
    plan = batches_lib.train_plan(split, config.batch_size, config.max_seq_length, seed=config.seed, epoch=0,
                                  boundaries=tuple(config.bucket_boundaries))
    widest = config.max_seq_length
    dtype = np.uint8 if widest <= np.iinfo(np.uint8).max else np.int32
    clipped = np.concatenate([np.zeros(0, dtype)] + [np.minimum(part, widest).astype(dtype)
                                                     for part in mapped.chunks(split.hist_lengths)])
    return max((trainer.pack_size(clipped[indices], config.batch_size, width) for indices, width in plan), default=0)


class _PlanSource:
    """Each step's input from the epoch plans: this process's fixed share of every global batch (deterministic)."""

    finished = False  # the loop's step count ends the run

    def __init__(self, split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer,
                 first_step: int):
        # Embedding kinds with state (din_jax.host_embeddings) map ids on this thread, step by step, from the
        # whole global batch (so every process's mapping stays the same); then the batch is cut and packed.
        self._trainer, self._step = trainer, first_step
        self._map = trainer.host.active
        self._ahead: tuple[_Item, Batch, Any] | None = None  # owned tables: the next batch, its ids already sent
        self._whole = trainer.host.stateful or bool(config.incremental_ckpt)
        items = _train_items(split, config, trainer, first_step, whole=self._whole)
        prepare = ((lambda item: item.batch) if self._map  # noqa: E731
                   else (lambda item: trainer.prepare(item.batch, item.pack_size, train=True)))
        self._batches: Iterator[tuple[_Item, Batch]] = (
            Prefetcher(items, prepare, config.prefetch_depth, transfer=not self._map) if config.smartstaged
            else ((item, prepare(item)) for item in items))

    def _fetch(self) -> tuple[_Item, Batch, Any]:
        """The next batch, its ids sent to their owners already when tables map them there (HostEmbeddings.request)."""
        item, prepared = next(self._batches)
        return item, prepared, self._trainer.host.request(prepared) if self._map else None

    def next(self) -> tuple[int, Batch]:
        """(examples in the whole global batch, this process's prepared share).

        With owned tables (din_jax.owned_ids) the next batch's ids go to their owners before this one is mapped, so
        that exchange runs ahead of this step's train step and the owners' mapping of the next batch waits for
        nothing but it: the host maps while the device trains."""
        item, prepared, requests = self._ahead or self._fetch()
        self._ahead = self._fetch() if self._trainer.host.owned else None
        if self._map:
            mapped = self._trainer.host.map_batch(prepared, self._step, train=True, requests=requests)
            prepared = self._trainer.prepare(self._trainer.local_share(mapped) if self._whole else mapped,
                                             item.pack_size, train=True)
        self._step += 1
        return item.examples, prepared

    def after_step(self, step_metrics: dict[str, jax.Array], examples: int) -> tuple[int, bool]:
        """(examples the step trained, whether it counted as a step)."""
        return examples, True

    def checkpoint_extra(self) -> dict[str, np.ndarray]:
        return {}  # the position is the step itself

    def close(self) -> None:
        if isinstance(self._batches, Prefetcher):
            self._batches.close()


class _WorkQueueSource:
    """Each step's input from the run's work queue (config.workqueue): units go to whichever process asks first.

    A checkpoint records the epoch and which of its units have been trained, so a resumed run hands
    out only the others.
    """

    def __init__(self, split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer,
                 first_step: int, extra: dict[str, np.ndarray]):
        self._split, self._config, self._trainer, self._first_step = split, config, trainer, first_step
        self.finished = False
        self._feed = self._open(int(extra.get("workqueue_epoch", 0)), extra.get("workqueue_trained"))
        self._contribution = None

    def _open(self, epoch: int, trained: np.ndarray | None = None) -> WorkQueueFeed:
        # Queue names are unique within the run (its first step and the epoch): every process uses the same.
        return WorkQueueFeed(self._split, self._config, self._trainer, epoch=epoch, name=f"{self._first_step}/{epoch}",
                             done_units=trained, wait_seconds=self._config.workqueue_wait_ms / 1000)

    def next(self) -> tuple[int, Batch]:
        self._contribution, prepared = self._feed.next()
        return self._contribution.examples, prepared

    def after_step(self, step_metrics: dict[str, jax.Array], examples: int) -> tuple[int, bool]:
        """Reads the step's example count and done flags (waits for the step); opens the next epoch's queue."""
        examples = int(step_metrics["examples"])
        self._feed.record(self._contribution)
        if int(step_metrics["queue_done"]) == self._trainer.mesh.size:  # every process has finished the epoch
            if self._config.steps:
                self._feed.close()
                self._feed = self._open(self._feed.epoch + 1)
            else:
                self.finished = True
        return examples, examples > 0

    def checkpoint_extra(self) -> dict[str, np.ndarray]:
        """The epoch and its trained units (gathered from every process: all must call this at the same step)."""
        return {"workqueue_epoch": np.array(self._feed.epoch), "workqueue_trained": self._feed.trained_units()}

    def close(self) -> None:
        self._feed.close()


class _Profiler:
    """jax.profiler trace of `num_steps` steps after the first (compiled) one: the seed's --timeline."""

    def __init__(self, num_steps: int, directory: str, first_step: int):
        self.num_steps, self.directory = num_steps, directory
        self.start, self.stop = first_step + 1, first_step + 1 + num_steps
        self.active = False

    def before(self, step: int) -> None:
        if self.num_steps > 0 and step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, sync: Any) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("Wrote a %d-step profile to %s", self.num_steps, self.directory)




@dataclasses.dataclass(frozen=True)
class Trainer:
    """The model and its steps for one config: what the loop, benchmarks and notebooks drive.

    train_step(state, batch) -> (state, {'loss'}) donates `state`; eval_step(state, batch) -> probabilities.
    Both take the numpy batches of input_pipeline.batches (this process's share of a global batch; all
    of it in a single-process run) and pack their histories when configured. The jitted steps run on
    the global batch, split over the mesh's `data` axis, with the state replicated on every device.
    """

    model: DIN
    optimizer: Optimizer
    jit_train_step: Any
    jit_eval_step: Any
    pack_granularity: int  # 0: no packing
    mesh: Mesh
    pack_floor: int = 0    # smallest packed size: set by the loop so an epoch has one shape
    routed: tuple[str, ...] | None = None  # tables split over `data` (config.shard_embeddings); None: replicated
    host: HostEmbeddings | None = None  # ids -> table rows on the host (embedding kinds, din_jax.host_embeddings)
    jit_caught_up_tables: Any = None  # state -> its exact-Adam tables with every row up to date; None: none lag
    host_lookups: bool = False  # train batches carry their row lookups, found on the host (one device, row-sparse)

    def readable(self, state: TrainState) -> TrainState:
        """`state` as evaluation, plots and export read it: every table row as the whole-table rule has it.

        Exact Adam's untouched rows lag until touched (optim.exact_adam_rows). The live state and its
        checkpoints keep them so (each row with the step it is up to date through, which determines it
        exactly), so a run resumes bit for bit whatever its checkpoint schedule; readers get a caught-up copy.
        """
        if self.jit_caught_up_tables is None:
            return state
        return state.replace(params={**state.params, **self.jit_caught_up_tables(state)})

    def init_state(self, config: ml_collections.ConfigDict) -> TrainState:
        """A fresh train state from `config.seed`: replicated on every device, or with tables split by rows.

        Created by one jitted function straight into its shardings (no device holds a whole split table), which
        compiles once - and comes from the persistent compilation cache when one is set - instead of running the
        initialisers op by op.
        """
        initial = {table: (slots, sources, self.host.defaults[table])
                   for table, (slots, sources) in self.host.initial_rows().items() if len(slots)}
        create = functools.partial(create_train_state, config, self.model, self.optimizer, self.routed or (),
                                   self.mesh.size if self.routed else 1, initial_rows=initial)
        specs = state_specs(jax.eval_shape(create), parallel.DATA_AXIS, self.routed or ())
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs)
        return jax.jit(create, out_shardings=shardings)()

    def pack_size(self, lengths: np.ndarray, batch_size: int, width: int) -> int:
        """The packed history size of every shard of a global batch: its fullest shard's, at least pack_floor.

        lengths: the history lengths of the global batch's examples (fewer than batch_size in a padded
        last batch); width: its history width T. Every process computes the same size from the plan.
        """
        if not self.pack_granularity:
            return 0
        rows = np.zeros(batch_size, np.int64)
        rows[:len(lengths)] = np.minimum(lengths, width)
        fullest = int(rows.reshape(self.mesh.size, -1).sum(axis=1).max())
        return max(packed_size(fullest, self.pack_granularity, batch_size // self.mesh.size * width), self.pack_floor)

    def prepare(self, batch: Batch, pack_size: int = 0, train: bool = False) -> Batch:
        """The batch as the jitted steps take it, still numpy; cheap host work.

        With packing, each of this process's batch shards gets its own 'hist_index' (indices into the
        shard's own positions, as the device sees them), all padded to one size: at least `pack_size`,
        which every process must pass alike (Trainer.pack_size), and at least pack_floor.
        A `train` batch for a single-device row-sparse step also gets its row lookups (embedding.host_row_lookups).
        """
        if self.pack_granularity:
            masks = np.split(batch["hist_mask"], parallel.local_shards(self.mesh))
            size = max([pack_size, self.pack_floor] + [packed_size(int(m.sum()), self.pack_granularity, m.size)
                                                      for m in masks])
            packed = [pack_history({"hist_mask": m}, self.pack_granularity, size) for m in masks]
            batch = {**batch, **{k: np.concatenate([p[k] for p in packed]) for k in ("hist_index", "hist_segment")}}
        if train and self.host_lookups:
            sizes = {name: self.model.vocab_sizes[name.removesuffix("_table")] for name in TABLES}
            batch = {**batch, **host_row_lookups(batch, sizes, dict(self.model.table_specs))}
        if self.routed and any(key.endswith(sharded_tables.CAPACITY) for key in batch):
            batch = {**batch, **self._host_routes(batch)}
        return batch

    def _host_routes(self, batch: Batch) -> Batch:
        """Each local device's row lookups and the requester half of its routes (sharded_tables.host_routes), found
        by numpy on the host (the prefetch thread) instead of by XLA's sorts on the step's critical path."""
        sizes = {name: self.model.vocab_sizes[name.removesuffix("_table")] for name in TABLES}
        devices = parallel.local_shards(self.mesh)
        pieces = []
        for k in range(devices):
            piece = {c: v[k * v.shape[0] // devices:(k + 1) * v.shape[0] // devices] for c, v in batch.items()
                     if not c.endswith(sharded_tables.CAPACITY)}
            found = host_row_lookups(piece, sizes, dict(self.model.table_specs))
            for name in self.routed:
                capacity = batch[name + sharded_tables.CAPACITY].shape[0] // devices
                found.update({name + k: v for k, v in sharded_tables.host_routes(
                    found[name + LOOKUP_IDS], sizes[name], self.mesh.size, capacity).items()})
            pieces.append(found)
        return {c: np.concatenate([p[c] for p in pieces]) for c in pieces[0]}

    def plan_capacities(self, local_batches: Iterator[Batch]) -> dict[str, int]:
        """The routed tables' all-to-all capacities for a run of batches (an epoch, an evaluation): the fullest owner
        bucket of any device in any of them (this process counts its own batches; one cross-process max)."""
        if not self.routed:
            return {}
        fullest = np.zeros(len(self.routed), np.int64)
        rows = {name: self.model.vocab_sizes[name.removesuffix("_table")] for name in self.routed}
        owned = self.host.owned  # batches hold vocabulary indices of these, which their owners map (owned_ids)
        rows.update({name: table.raw.size for name, table in owned.items()})
        owners = {name: table.owner_of for name, table in owned.items()}
        for batch in local_batches:
            counts = sharded_tables.bucket_counts(batch, self.routed, rows, self.mesh.size,
                                                  parallel.local_shards(self.mesh), owners)
            fullest = np.maximum(fullest, [counts[name] for name in self.routed])
        fullest = parallel.gather_host(fullest).max(axis=0)
        return {name: sharded_tables.round_capacity(int(c)) for name, c in zip(self.routed, fullest)}

    def with_capacities(self, batch: Batch, capacities: dict[str, int]) -> Batch:
        """A prepared batch with the placeholder columns that carry the routed tables' capacities to the step."""
        return {**batch, **sharded_tables.capacity_columns(capacities, parallel.local_shards(self.mesh))}

    def physical_ids(self, batch: Batch) -> Batch:
        """A batch whose routed tables' ids index the owner-major global arrays (for whole-state model.apply)."""
        if not self.routed:
            return batch
        out = dict(batch)
        for name in self.routed:
            rows = self.model.vocab_sizes[name.removesuffix("_table")]
            for column in lookup_columns(name):
                out[column] = sharded_tables.physical_ids(np.asarray(batch[column]), rows, self.mesh.size)
        return out

    def table_layout(self) -> dict[str, int]:
        """Per table, the devices its rows are split over (1: the whole table on every device)."""
        return {name: self.mesh.size if self.routed and name in self.routed else 1 for name in TABLES}

    def logical_params(self, state: TrainState) -> dict[str, Any]:
        """state.params on the host with every table in id order and its vocabulary's rows (no sharding padding)."""
        params = dict(jax.device_get(state.params))
        for name in TABLES:
            rows = self.model.vocab_sizes[name.removesuffix("_table")]
            table = params[name]
            if self.routed and name in self.routed:
                table = sharded_tables.logical_table(table, rows, self.mesh.size)
            params[name] = table[:rows]
        return params

    def local_share(self, batch: Batch) -> Batch:
        """This process's contiguous rows of a whole global batch; the rows-to-initialise lists, which every
        device needs whole, repeated once per local device."""
        per_process = batch["weight"].shape[0] // jax.process_count()
        start, devices = jax.process_index() * per_process, parallel.local_shards(self.mesh)
        return {k: np.tile(v, devices) if k.endswith((INIT_SLOTS, INIT_SOURCES)) else v[start:start + per_process]
                for k, v in batch.items()}

    def device_batch(self, batch: Batch) -> Batch:
        """A prepared batch (numpy, or already on this process's device) as global arrays split over `data`."""
        return parallel.global_batch(batch, self.mesh)

    def train_step(self, state: TrainState, batch: Batch, prepared: bool = False
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (see the module-level train_step); `prepared` batches skip `prepare`."""
        batch = batch if prepared else self.prepare(batch, train=True)
        return self.jit_train_step(state, self.device_batch(self._routable(batch)))

    def eval_step(self, state: TrainState, batch: Batch) -> jax.Array:
        """Click probabilities [B] of the global batch, on every process; pass `readable(state)` (exact Adam)."""
        return self.jit_eval_step(state, self.device_batch(self._routable(self.prepare(batch))))

    def _routable(self, batch: Batch) -> Batch:
        """`batch` with routing capacities: the loop plans them per epoch; a batch given alone (notebooks,
        benchmarks, tests) gets its own, so each process must pass its share of the same global batch."""
        if not self.routed or any(key.endswith(sharded_tables.CAPACITY) for key in batch):
            return batch
        return self.with_capacities(batch, self.plan_capacities(iter([batch])))


def create_trainer(config: ml_collections.ConfigDict, vocab_sizes: dict[str, int], mesh: Mesh | None = None,
                   raw_ids: dict[str, np.ndarray] | None = None, id_sizes: dict[str, int] | None = None) -> Trainer:
    """Builds the model, the optimizer and the jitted train and eval steps for `config` on `mesh` (all devices).

    vocab_sizes: the vocabularies' sizes; raw_ids and id_sizes: Data's, for raw-id embedding kinds.
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    id_sizes = id_sizes or vocab_sizes
    mappings = {**create_mappings(config, vocab_sizes, id_sizes), **owned_tables(config, raw_ids or {}, id_sizes, mesh)}
    host = HostEmbeddings(config, mappings, raw_ids or {}, vocab_sizes, mesh)
    plain = {t: spec for t, spec in host.specs.items() if spec != TableSpec(spec.rows, config.model.embedding_dim)}
    model = build_model(config, host.table_rows(), plain)
    lazy = [table for table, kind in table_kinds(config).items() if kind in RAW_ID_KINDS]  # EmbeddingVariables
    optimizer = create_optimizer(config.optimizer, config.learning_rate, config.clip_norm,
                                 decay_step=config.adagrad_decay_step, decay_rate=config.adagrad_decay_rate,
                                 lazy_tables=lazy)
    axis = parallel.DATA_AXIS
    routed = (tuple(name for name in TABLES if name in host.owned or name in sharded_tables.routed_tables(
        model.vocab_sizes, config.shard_min_rows)) if config.shard_embeddings else None)  # owned tables: however small
    step = functools.partial(train_step, model, optimizer, config.sparse_embeddings, config.micro_batch, axis,
                             routed, host.defaults)
    probs = (functools.partial(sharded_eval_step, model, axis, routed) if routed is not None
             else functools.partial(eval_step, model))
    predict = lambda state, batch: jax.lax.all_gather(probs(state, batch), axis, tiled=True)  # noqa: E731
    # State replicated (P()) but for routed tables, batches split over `data`; every collective is explicit.
    specs = state_specs(jax.eval_shape(functools.partial(create_train_state, config, model, optimizer, routed or (),
                                                         mesh.size)), axis, routed) if routed else P()
    shard = functools.partial(jax.shard_map, mesh=mesh, in_specs=(specs, P(axis)), check_vma=False)
    jit_train_step = jax.jit(shard(step, out_specs=(specs, P())), donate_argnums=(0,))
    jit_eval_step = jax.jit(shard(predict, out_specs=P()))
    # Packing and micro-batches do not mix (micro-batches split examples, packing splits positions).
    granularity = config.pack_granularity if config.micro_batch <= 1 else 0
    caught_up = (jax.jit(functools.partial(caught_up_tables, optimizer))
                 if config.sparse_embeddings and optimizer.catches_up else None)
    return Trainer(model, optimizer, jit_train_step, jit_eval_step, granularity, mesh, routed=routed, host=host,
                   jit_caught_up_tables=caught_up,
                   host_lookups=config.sparse_embeddings and routed is None and mesh.size == 1)


def caught_up_tables(optimizer: Optimizer, state: TrainState) -> dict[str, jax.Array]:
    """Every table whose rule catches up (exact Adam), brought up to date through state.step; elementwise per row,
    so sharded tables stay sharded."""
    return {name: rule.catch_up(state.params[name], state.opt_state["rows"][name], state.step)[0]
            for name, rule in optimizer.rows.items() if rule.catch_up is not None}


class DivergedError(Exception):
    """The training loss or the parameters became NaN or Inf; the message names the step and the checkpoint kept."""


@jax.jit
def _first_non_finite(first: jax.Array, loss: jax.Array, step: int) -> jax.Array:
    """`step` if `loss` is the run's first NaN or Inf loss (`first` == 0), else `first`: a device scalar updated
    each step without a host sync; the loop reads it only at log, eval and save steps and at the end."""
    return jnp.where((first == 0) & ~jnp.isfinite(loss), step, first)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether no floating-point leaf of `tree` holds a NaN or Inf."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))


def _check_finite(first_bad: jax.Array, state: TrainState | None, checkpointer: checkpoint_lib.Checkpointer) -> None:
    """DivergedError if a step so far had a NaN or Inf loss or, given `state` (before saving it), a parameter is NaN
    or Inf: then nothing is saved, and the latest checkpoint stays the last good one."""
    step = int(first_bad)
    what = f"the training loss was NaN or Inf at step {step}"
    if not step and state is not None and not bool(_all_finite((state.params, state.batch_stats))):
        step = int(state.step)
        what = f"the parameters became NaN or Inf by step {step}"
    if not step:
        return
    last = checkpointer.latest_step()
    if last is None:
        raise DivergedError(f"{what}; training stopped before any checkpoint was written, so there is nothing to "
                            "resume from - lower --config.learning_rate (or check the data) and rerun the same "
                            "command: it starts again from step 0 (--config.save_steps=N keeps checkpoints on the way)")
    raise DivergedError(f"{what}; training stopped and checkpoint {checkpointer.directory}/{last} (step {last}) is the "
                        "last good one - lower --config.learning_rate (or check the data), then rerun to resume from it")


def _local_shards(array: jax.Array, whole: bool) -> Any:
    """A device array on the host: the whole of a replicated one, else this process's shards in device order."""
    if whole:
        return np.asarray(array.addressable_data(0))
    return [np.asarray(s.data) for s in sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)]


@jax.jit
def _row_l2_weights(table: jax.Array) -> jax.Array:
    """DeepRec's l2 eviction measure of every row, 0.5 * |row|^2 (computed where the table lives)."""
    return 0.5 * jnp.sum(jnp.square(table.astype(jnp.float32)), axis=1)


class _Saver:
    """Full checkpoints (after feature eviction, with the host-side state) and, between them, incremental ones.

    A full save first applies config.ev_elimination, then writes the train state with the work queue's and
    the embedding mappings' state; with config.incremental_ckpt, every that many seconds the rows written
    since the last save go to an increment on top of the latest full checkpoint (din_jax.incremental).
    """

    def __init__(self, config: ml_collections.ConfigDict, checkpointer: checkpoint_lib.Checkpointer,
                 trainer: Trainer, checkpoint_dir: str):
        self._checkpointer, self._host, self._mesh = checkpointer, trainer.host, trainer.mesh
        self._layout = np.array(list(trainer.table_layout().values()))  # saved with every full checkpoint
        self._increments = (incremental_lib.IncrementalCheckpointer(checkpoint_dir, config.incremental_ckpt)
                            if config.incremental_ckpt else None)
        self.base = checkpointer.latest_step()  # the full checkpoint increments build on
        self.last = self.base or 0               # the step of the last save of any kind

    def restore(self, state: TrainState, extra: dict[str, np.ndarray]) -> TrainState:
        """The embedding mappings from `extra` (and this process's devices' shards of owned tables' mappings), then
        the increments on top of the full checkpoint."""
        self._host.load_state_dict(extra)
        if self._host.owned:
            self._host.load_device_state_dicts(self._checkpointer.restore_per_device(self._mesh, extra))
        if self._increments is None or self.base is None:
            return state
        state, increment_extra, self.last = self._increments.restore(state, self.base)
        if increment_extra:
            self._host.load_state_dict(increment_extra)
        return state

    def full(self, step: int, state: TrainState, source: Any, force: bool = False) -> None:
        """A full checkpoint at `step` if it is a save step (or forced)."""
        if not self._checkpointer.is_save_step(step, force):
            return
        evicted = self._host.evict(step, lambda table: _local_shards(_row_l2_weights(state.params[table]),
                                                                     whole=table not in self._host.owned))
        if any(evicted.values()):
            logging.info("Feature eviction (%s) at step %d: %s rows freed", self._host.config.ev_elimination, step,
                         evicted)
        if self._checkpointer.save(step, state, force=force,
                                   extra={**source.checkpoint_extra(), **self._host.state_dict(),
                                          checkpoint_lib.TABLE_LAYOUT: self._layout},
                                   per_device=self._host.device_state_dicts(), mesh=self._mesh):
            self.base = self.last = step
            if self._increments is not None:
                self._increments.prune(step)

    def incremental(self, step: int, state: TrainState, source: Any) -> None:
        """An increment of the rows written since the last save, when config.incremental_ckpt seconds have passed."""
        if self._increments is None or step == self.last or not self._increments.due():
            return
        if self.base is None:  # increments need a full checkpoint to build on
            self.full(step, state, source, force=True)
            return
        touched = {table: mapping.touched_since(self.last) for table, mapping in self._host.mappings.items()}
        self._increments.save(step, self.base, state, touched, extra=self._host.state_dict())
        self.last = step


def _start_history(workdir: str, first_step: int) -> None:
    """WORKDIR/history.jsonl without records past `first_step` (left by a run killed after its last checkpoint)."""
    plots.drop_history(workdir, lambda record: record["step"] > first_step)


def _write_plots(workdir: str, trainer: Trainer, state: TrainState, data: Data,
                 config: ml_collections.ConfigDict) -> None:
    """WORKDIR/plots (process 0): learning curves, throughput, and the attention weights of the first test batch.

    Every process calls this and computes the weights alike: with tables split by rows, all of them take part
    in reading the rows the batch looks up (ids translated to the owner-major layout; XLA gathers on each
    table shard and sums; no device holds a table).
    """
    batch = next(batches_lib.eval_batches(data.test, config.eval_batch_size, config.max_seq_length,
                                          keep=config.history_keep))
    if trainer.host.active:
        batch = trainer.host.map_batch(batch, 0, train=False)
    batch = trainer.physical_ids(batch)
    # The tables' rows as the state holds them: split tables carry zero rows up to a multiple of the devices.
    model = trainer.model.clone(vocab_sizes={**trainer.model.vocab_sizes, **{
        name.removesuffix("_table"): state.params[name].shape[0] for name in TABLES}})
    attention = jax.jit(lambda variables, batch: model.apply(variables, batch)[1],
                        out_shardings=parallel.replicated(trainer.mesh))
    weights = attention({"params": state.params, "batch_stats": state.batch_stats}, batch)  # [B, T], every device
    if parallel.is_primary():
        paths = plots.write_run_plots(workdir, plots.read_history(workdir), np.asarray(weights.addressable_data(0)),
                                      batch["hist_mask"])
        logging.info("Wrote %d plots to %s", len(paths), os.path.join(workdir, "plots"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains for `config.steps` steps (0 = one epoch), evaluates, writes metrics and checkpoints.

    In a multi-process run (din_jax.parallel) every process calls this with the same arguments:
    each reads its share of every batch, and process 0 alone writes metrics and TensorBoard logs.
    Rerunning the same command resumes from the latest checkpoint and ends as an uninterrupted run (the
    input order is a function of the seed, the epoch and the step). In a single-process run SIGINT or
    SIGTERM saves a checkpoint of the step reached and raises checkpoint_lib.Interrupted; a NaN or Inf
    loss raises DivergedError without saving.
    """
    mesh = parallel.data_mesh()
    config_check.validate(config, num_shards=mesh.size)
    primary = parallel.is_primary()
    checkpoint_dir = config.checkpoint_dir or os.path.join(workdir, "checkpoints")
    checkpoint_lib.require_writable(workdir, "--workdir")  # checked before the data: fail in seconds, not minutes
    checkpoint_lib.require_writable(checkpoint_dir, "--config.checkpoint_dir", keep=False)
    wall_start = time.perf_counter()
    data = parallel.primary_first("load_data", lambda: load_data(config, workdir))
    trainer = create_trainer(config, data.vocab_sizes, mesh, data.raw_ids, data.id_sizes)
    state = trainer.init_state(config)
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, config.save_steps, config.keep_checkpoint_max)
    run_file = os.path.join(workdir, "config.json")
    restored = checkpointer.restore_latest_with_extra(state, checkpoint_lib.config_changes(run_file, config.to_dict()),
                                                      trainer.table_layout())
    extra: dict[str, np.ndarray] = {}
    saver = _Saver(config, checkpointer, trainer, checkpoint_dir)
    if restored is not None:
        state, extra = restored
        state = saver.restore(state, extra)
        logging.info("Resumed from checkpoint at step %d", int(state.step))
    if primary:  # once the checkpoint fits: what export and predict need to rebuild this model (config, vocabularies)
        jsonfile.write(run_file, {"config": config.to_dict(), "data_dir": data.data_dir})

    steps_per_epoch = batches_lib.num_train_batches(data.train, config.batch_size, config.max_seq_length,
                                                    tuple(config.bucket_boundaries))
    first_step = int(state.step)
    if trainer.pack_granularity and not config.workqueue:
        trainer = dataclasses.replace(trainer, pack_floor=_pack_floor(data.train, config, trainer))
    source = (_WorkQueueSource(data.train, config, trainer, first_step, extra) if config.workqueue
              else _PlanSource(data.train, config, trainer, first_step))
    total_steps = config.steps or (math.inf if config.workqueue else steps_per_epoch)
    # purge_step: TensorBoard hides what an interrupted run logged past the checkpoint this run resumes from.
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=first_step or None) if primary else None
    profiler = _Profiler(config.timeline if primary else 0, os.path.join(workdir, "profile"), first_step)
    logging.info("Data %s: %d train / %d test examples, vocabularies %s; %s of batch %d (%d steps per epoch) on "
                 "%d process(es), %d device(s)%s", data.data_dir, len(data.train), len(data.test), data.vocab_sizes,
                 "one epoch" if math.isinf(total_steps) else f"{total_steps} steps", config.batch_size, steps_per_epoch,
                 jax.process_count(), mesh.size, ", work queue" if config.workqueue else "")

    compile_seconds, timed_samples, timed_seconds, loss = 0.0, 0, 0.0, None  # loss: at the last log step
    eval_seconds = 0.0  # periodic evaluations, kept out of the training throughput
    trained_examples = 0
    eval_metrics: dict[str, Any] = {}
    progress = progress_bar(steps_per_epoch if math.isinf(total_steps) else total_steps, initial=first_step,
                            disable=not (config.progress_bar and primary))
    first_bad = jnp.zeros([], jnp.int32)  # on the device: the first step whose loss was NaN or Inf (0: none)
    # SIGINT / SIGTERM: checkpoint and stop. Several processes would have to agree on the step: there they kill.
    stop = checkpoint_lib.StopSignals(enabled=jax.process_count() == 1)
    if primary:
        _start_history(workdir, first_step)
    timer = time.perf_counter()
    interval_start, interval_samples = timer, 0  # the throughput since the previous log point (history.jsonl)
    step = first_step
    try:
        while step < total_steps and not source.finished and stop.received is None:
            examples, prepared = source.next()
            profiler.before(step)
            state, step_metrics = trainer.train_step(state, prepared, prepared=True)
            first_bad = _first_non_finite(first_bad, step_metrics["loss"], step + 1)
            profiler.after(step, state.step)
            examples, advanced = source.after_step(step_metrics, examples)
            trained_examples += examples
            if step == first_step:  # the first step compiles: time it apart from throughput
                jax.block_until_ready(state.step)
                compile_seconds = time.perf_counter() - timer
                timer = interval_start = time.perf_counter()
            else:
                timed_samples += examples
                interval_samples += examples
            if not advanced:
                continue  # an empty work-queue step changed nothing
            step += 1
            progress.update(1)
            last = step == total_steps or source.finished
            if step % config.log_every_steps == 0 or last:
                _check_finite(first_bad, None, checkpointer)
                loss = float(step_metrics["loss"])
                timed_seconds = time.perf_counter() - timer - eval_seconds
                rate = timed_samples / timed_seconds if timed_seconds > 0 else 0.0
                progress.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:,.0f}")
                if writer:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/samples_per_sec", rate, step)
                    now = time.perf_counter()
                    plots.append_history(workdir, {"step": step, "loss": loss, "samples_per_sec":
                                                   interval_samples / max(now - interval_start, 1e-9)})
                interval_start, interval_samples = time.perf_counter(), 0
            if not config.no_eval and config.eval_every_steps and step % config.eval_every_steps == 0 and not last:
                _check_finite(first_bad, None, checkpointer)
                started = time.perf_counter()
                _write_eval(writer, evaluate(trainer, trainer.readable(state), data.test, config), step, workdir)
                interval_start = time.perf_counter()  # evaluation time is not training throughput
                eval_seconds += interval_start - started
            if checkpointer.is_save_step(step):
                _check_finite(first_bad, state, checkpointer)
                saver.full(step, state, source)
            else:
                saver.incremental(step, state, source)
        jax.block_until_ready(state)
        timed_seconds = time.perf_counter() - timer - eval_seconds if step > first_step else 0.0
        progress.close()
        source.close()
        _check_finite(first_bad, state, checkpointer)
        saver.full(int(state.step), state, source, force=True)
    finally:  # also after an error: no input thread left running, the checkpoint manager and logs closed
        stop.restore()
        progress.close()
        source.close()
        checkpointer.close()
        if writer:
            writer.flush()
    if stop.received is not None:
        if writer:
            writer.close()
        raise stop.interrupted(int(state.step), checkpointer.directory)

    trained = int(state.step) > first_step  # else a rerun of a finished run: it only evaluates
    final = trainer.readable(state)
    if not config.no_eval:
        eval_metrics = evaluate(trainer, final, data.test, config)
        eval_metrics["step"] = int(state.step)
        if primary and not trained:  # the evaluation replaces the finished run's own: one record per step
            plots.drop_history(workdir, lambda record: "eval" in record and record["step"] == int(state.step))
        _write_eval(writer, eval_metrics, int(state.step), workdir)
        if primary:
            jsonfile.write(os.path.join(workdir, "eval_metrics.json"), eval_metrics)
    _write_plots(workdir, trainer, final, data, config)  # every process: the tables may be split over them
    if writer:
        writer.close()
    summary = {"steps": int(state.step), "steps_this_run": int(state.step) - first_step,
               "samples_per_sec": timed_samples / timed_seconds if timed_seconds > 0 else None,
               "wall_seconds": time.perf_counter() - wall_start, "compile_seconds": compile_seconds,
               "final_train_loss": loss, "processes": jax.process_count(), "devices": mesh.size,
               "trained_examples": trained_examples, "embeddings": trainer.host.stats(),
               "table_bytes": sum(int(state.params[table].nbytes) for table in TABLES)}  # tables only, not slots
    summary_file = os.path.join(workdir, "train_summary.json")
    if not trained:  # the training run's summary stays as it was; this run's report says it only evaluated
        summary = {**(_read_summary(summary_file) or summary), "evaluated_only": True,
                   "wall_seconds": summary["wall_seconds"]}
    if primary and (trained or not os.path.exists(summary_file)):
        jsonfile.write(summary_file, summary)
    return {"eval": eval_metrics, "train": summary}


def _read_summary(path: str) -> dict[str, Any] | None:
    """The train_summary.json a finished run wrote, or None if there is none (or it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _write_eval(writer: SummaryWriter | None, metrics: dict[str, Any], step: int, workdir: str) -> None:
    """Eval metrics to the log, and (process 0, which has the writer) to TensorBoard and history.jsonl."""
    if writer:
        plots.append_history(workdir, {"step": step, "eval": {k: v for k, v in metrics.items() if k != "step"}})
    for name, value in metrics.items():
        if writer and name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"eval/{name}", value, step)
    logging.info("eval at step %d: %s", step, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})


