"""The Trainer: for one config, the model, its optimizer, the jitted train and eval steps on the mesh, and the
host work that readies a batch for them (packing, row lookups, routes, capacities): what the loop,
benchmarks and notebooks drive."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from din_jax import parallel, sharded_tables
from din_jax.embedding import LOOKUP_IDS, host_row_lookups
from din_jax.host_embeddings import (INIT_SLOTS, INIT_SOURCES, RAW_ID_KINDS, HostEmbeddings, create_mappings,
                                     owned_tables, table_kinds)
from din_jax.model import DIN, TABLES, TableSpec, lookup_columns
from din_jax.optim import Optimizer, create_optimizer
from din_jax.packing import pack_history, packed_size
from din_jax.steps import (TrainState, caught_up_tables, create_train_state, eval_step, sharded_eval_step,
                           state_specs, train_step)

Batch = dict[str, Any]


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
        pieces = []
        for piece in parallel.device_shares(batch, parallel.local_shards(self.mesh)):
            found = host_row_lookups(piece, sizes, dict(self.model.table_specs))
            for name in self.routed:
                capacity = sharded_tables.capacity_of(piece, name)
                found.update({name + suffix: v for suffix, v in sharded_tables.host_routes(
                    found[name + LOOKUP_IDS], sizes[name], self.mesh.size, capacity).items()})
            pieces.append(found)
        return {c: np.concatenate([p[c] for p in pieces]) for c in pieces[0]}

    def plan_capacities(self, local_batches: Iterator[Batch]) -> dict[str, int]:
        """The routed tables' all-to-all capacities for a run of batches (an epoch, an evaluation): the fullest owner
        bucket of any device in any of them (this process counts its own batches; one cross-process max)."""
        if not self.routed:
            return {}
        rows = {name: self.model.vocab_sizes[name.removesuffix("_table")] for name in self.routed}
        owned = self.host.owned  # batches hold vocabulary indices of these, which their owners map (owned_ids)
        rows.update({name: table.raw.size for name, table in owned.items()})
        owners = {name: table.owner_of for name, table in owned.items()}
        return sharded_tables.plan_capacities(local_batches, self.routed, rows, self.mesh.size,
                                              parallel.local_shards(self.mesh), owners)

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
        """One optimizer step (steps.train_step); `prepared` batches skip `prepare`."""
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
    owned = owned_tables(config, raw_ids or {}, id_sizes, mesh)  # each process holds only its devices' shards
    mappings = {**create_mappings(config, vocab_sizes, id_sizes, exclude=owned), **owned}
    mappings = {table: mappings[table] for table in TABLES}  # in table order, whichever kind
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
