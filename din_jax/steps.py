"""The jitted steps of training: the train state, one optimizer step on a global batch (row-sparse, replicated
or routed tables; micro-batches), and the evaluation step. Pure functions of (state, batch), run inside
shard_map over the mesh's `data` axis (din_jax.trainer jits them)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from din_jax import sharded_tables
from din_jax.embedding import (RowLookup, embedded_from_rows, gather_rows, initialise_rows, pop_host_lookups,
                               row_lookups, scatter_rows, split_tables, touched_ids, unique_ids)
from din_jax.feed import QUEUE_DONE
from din_jax.host_embeddings import INIT_SLOTS, INIT_SOURCES
from din_jax.model import DIN, TABLES, TableSpec, lookup_columns
from din_jax.optim import Optimizer, clip_tensor

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


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


def caught_up_tables(optimizer: Optimizer, state: TrainState) -> dict[str, jax.Array]:
    """Every table whose rule catches up (exact Adam), brought up to date through state.step; elementwise per row,
    so sharded tables stay sharded."""
    return {name: rule.catch_up(state.params[name], state.opt_state["rows"][name], state.step)[0]
            for name, rule in optimizer.rows.items() if rule.catch_up is not None}
