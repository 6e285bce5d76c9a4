"""The host side of DeepRec's embedding kinds: per table a din_jax.ev mapping from ids to rows, in step order.

config picks a kind per feature (seed flags --ev, --ev_filter, --ev_elimination, --adaptive_emb,
--multihash, --dynamic_ev, or config.embeddings.<feature>). Before a train step, every process maps
the ids of the whole global batch (so every process's mapping stays identical), keeps its own rows'
share, and passes the rows to (re)initialise; the device step then works on rows exactly as with
plain vocabulary tables. With config.shard_embeddings on several devices, raw-id tables are split over the
devices with their mappings instead, and each process maps its own share of the batch through the ids'
owners (din_jax.owned_ids). Raw-id kinds (ev, adaptive, dynamic) see each token's 64-bit hash: a token
absent from the vocabulary files is still its own id. Eviction runs when a checkpoint is saved.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from din_jax import ev, owned_ids
from din_jax.model import BLOCKS, SECOND_ROW, TABLES, TableSpec

Batch = dict[str, Any]
INIT_SLOTS, INIT_SOURCES = "_init_slots", "_init_sources"  # batch column suffixes after a table name
RAW_ID_KINDS = ("ev", "adaptive", "dynamic")                # keyed by raw ids: need no vocabulary
KIND_CHOICES = ("", "dense") + tuple(k for k in ev.KINDS if k != "dense")


def table_kinds(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The embedding kind of each table: config.embeddings.<feature>, else from the seed's flags as DeepRec's DIN
    combines them.

    --dynamic_ev and --ev make every feature an EmbeddingVariable (dynamic dimension first); they win over
    --adaptive_emb (DeepRec's DIN builds the uid from EV when --ev is set) and --multihash. --adaptive_emb
    applies to the user feature (hash_bucket_size 100000 for uid), --multihash to item and category only; a
    multi-hash uid is the explicit choice config.embeddings.uid='multihash'.
    """
    kinds = {}
    for table in TABLES:
        feature = table.removesuffix("_table")
        chosen = config.embeddings[feature]
        if not chosen:
            chosen = ("dynamic" if config.dynamic_ev else "ev" if config.ev
                      else "adaptive" if config.adaptive_emb and feature == "uid"
                      else "multihash" if config.multihash and feature != "uid" else "dense")
        kinds[table] = chosen
    return kinds


def uses_raw_ids(config: ml_collections.ConfigDict) -> bool:
    """Whether some table is keyed by raw ids (the loader must keep every token distinct)."""
    return any(kind in RAW_ID_KINDS for kind in table_kinds(config).values())


def create_mappings(config: ml_collections.ConfigDict, vocab_sizes: Mapping[str, int],
                    id_sizes: Mapping[str, int], exclude: Collection[str] = ()) -> dict[str, ev.IdMapping]:
    """The mapping of every table for `config` but those in `exclude`: vocabulary kinds sized by `vocab_sizes`;
    raw-id kinds hold up to config.ev_capacity rows (0: as many as the data's distinct ids, `id_sizes`)."""
    return {table: _mapping(config, table, kind, vocab_sizes,
                            config.ev_capacity or id_sizes[table.removesuffix("_table")])
            for table, kind in table_kinds(config).items() if table not in exclude}


def owned_tables(config: ml_collections.ConfigDict, raw_ids: Mapping[str, np.ndarray | None],
                 id_sizes: Mapping[str, int], mesh: Mesh) -> dict[str, owned_ids.OwnedTable]:
    """With config.shard_embeddings on several devices, the raw-id tables split over them with their mappings
    (din_jax.owned_ids): this process's devices' shards. Empty otherwise."""
    shards = mesh.size
    if not config.shard_embeddings or shards == 1:
        return {}
    devices = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    tables = {}
    for table, kind in table_kinds(config).items():
        if kind not in RAW_ID_KINDS:
            continue
        feature = table.removesuffix("_table")
        raw = raw_ids.get(feature)
        raw = np.arange(id_sizes[feature], dtype=np.int64) if raw is None else np.asarray(raw, np.int64)
        owner_of = owned_ids.owners(raw, shards, config.adaptive_hash_bucket_size if kind == "adaptive" else 0)
        rows = owned_ids.rows_per_device(owner_of, shards, config.ev_capacity)
        mappings = [_mapping(config, table, kind, {}, rows, shard=(d, shards)) for d in devices]
        tables[table] = owned_ids.OwnedTable(table, mappings, devices, shards, raw, owner_of,
                                             config.ev_capacity or id_sizes[feature])
    return tables


def _mapping(config: ml_collections.ConfigDict, table: str, kind: str, vocab_sizes: Mapping[str, int],
             capacity: int, shard: tuple[int, int] = (0, 1)) -> ev.IdMapping:
    """Table `table`'s mapping of `kind` (raw-id kinds: `capacity` own rows; `shard`: which of how many devices'
    share of an adaptive table's hashed rows it holds)."""
    e = config.model.embedding_dim
    feature = table.removesuffix("_table")
    filters = dict(filter=config.ev_filter or None, filter_freq=config.ev_filter_freq,
                   cbf_false_positive=config.ev_cbf_false_positive)
    # Each table gets its own default matrix, initialised as its dense table would be (uid: truncated normal).
    keyed = dict(dim=e, seed=config.seed + list(TABLES).index(table), name=feature,
                 initializer="truncated_normal" if feature == "uid" else "glorot_uniform")
    if kind == "dense":
        return ev.DenseVocabulary(vocab_sizes[feature], name=feature)
    if kind == "multihash":
        return ev.MultiHash(vocab_sizes[feature], e, combiner=config.multihash_combiner, name=feature)
    if kind == "ev":
        return ev.EmbeddingVariable(capacity, capacity_field="config.ev_capacity", **keyed, **filters)
    if kind == "dynamic":
        return ev.DynamicDimension(capacity, block_size=config.dynamic_block_size,
                                   thresholds=tuple(config.dynamic_thresholds), decay=config.dynamic_decay,
                                   capacity_field="config.ev_capacity", **keyed, **filters)
    if kind == "adaptive":
        return ev.AdaptiveEmbedding(capacity, config.adaptive_hash_bucket_size,
                                    promote_freq=config.adaptive_promote_freq, shard=shard, **keyed)
    raise ValueError(f"config.embeddings.{feature}={kind!r} is not one of {KIND_CHOICES}")


def table_spec(mapping: ev.IdMapping | owned_ids.OwnedTable, embedding_dim: int) -> TableSpec:
    """How the device builds embeddings from this mapping's rows."""
    if isinstance(mapping, owned_ids.OwnedTable):
        return dataclasses.replace(table_spec(mapping.mappings[0], embedding_dim), rows=mapping.num_rows)
    if isinstance(mapping, ev.MultiHash):
        return TableSpec(mapping.num_rows, mapping.row_dim, combiner=mapping.combiner)
    if isinstance(mapping, ev.DynamicDimension):
        return TableSpec(mapping.num_rows, embedding_dim, block_size=mapping.block_size)
    return TableSpec(mapping.num_rows, embedding_dim)


class HostEmbeddings:
    """Every table's mapping, and the raw id of each encoded token for raw-id kinds.

    raw_ids[feature]: int64 [vocabulary size] hash of the token with that index (None: the kind takes
    vocabulary indices). Stateful: map training batches once each, in step order, on every process.
    """

    def __init__(self, config: ml_collections.ConfigDict, mappings: dict[str, ev.IdMapping | owned_ids.OwnedTable],
                 raw_ids: Mapping[str, np.ndarray | None], vocab_sizes: Mapping[str, int], mesh: Mesh | None = None):
        self.config, self.mappings, self.raw_ids = config, mappings, dict(raw_ids)
        # Tables split over the devices with their mappings (din_jax.owned_ids): mapped by their owners, on `mesh`.
        self.owned = {t: m for t, m in mappings.items() if isinstance(m, owned_ids.OwnedTable)}
        self.mesh = mesh
        self.vocab_sizes = dict(vocab_sizes)  # vocabulary kinds: encoded ids past the vocabulary are unknown (0)
        self.specs = {table: table_spec(m, config.model.embedding_dim) for table, m in mappings.items()}
        self.defaults = {table: self._default_matrix(table, m) for table, m in mappings.items()}

    def _default_matrix(self, table: str, mapping: ev.IdMapping) -> np.ndarray:
        """The fixed [4096, E] matrix newly admitted rows start from (row hash(id) mod 4096).

        Its spread is that of the table's dense initialiser: truncated normal 1/sqrt(E) for users (as the uid
        table), and for items and categories the variance glorot-uniform gives a table of `capacity` rows
        (2 / (capacity + E)) - a glorot matrix of 4096 rows would start small tables' rows several times smaller.
        """
        e = self.config.model.embedding_dim
        capacity = getattr(mapping, "capacity", 0)
        if not capacity:
            return np.zeros((ev.DEFAULT_ROWS, self.specs[table].width), np.float32)  # never read
        stddev = e**-0.5 if table == "uid_table" else (2.0 / (capacity + e)) ** 0.5
        return ev.default_matrix(self.config.seed + list(TABLES).index(table), e, "truncated_normal", stddev)

    @property
    def active(self) -> bool:
        """Whether batches go through the mappings: some table is not a plain vocabulary table, or incremental
        checkpoints need the rows each step touches (otherwise batches pass through unchanged)."""
        return bool(self.config.incremental_ckpt) or any(not isinstance(m, ev.DenseVocabulary)
                                                         for m in self.mappings.values())

    @property
    def stateful(self) -> bool:
        """Whether mapping a training batch changes state (every process must see every global batch)."""
        return any(not isinstance(m, (ev.DenseVocabulary, ev.MultiHash, owned_ids.OwnedTable))
                   for m in self.mappings.values())

    def table_rows(self) -> dict[str, int]:
        """Rows of each device table, by feature name (the model's vocab_sizes)."""
        return {table.removesuffix("_table"): m.num_rows for table, m in self.mappings.items()}

    def request(self, batch: Batch) -> owned_ids.Requests | None:
        """Sends this process's share of a batch's ids to their owners ahead of map_batch (None: no owned tables).
        Every process must request the same batches in the same order, and map them in that order."""
        return owned_ids.request_owned(list(self.owned.values()), batch, self.mesh) if self.owned else None

    def map_batch(self, batch: Batch, step: int, train: bool, requests: owned_ids.Requests | None = None) -> Batch:
        """`batch` with every id column replaced by rows (plus second rows / live blocks and, when training,
        the rows to initialise before the step). Padding rows and masked history positions look nothing up.
        requests: what request(batch) sent ahead (owned tables; else they are sent now)."""
        out = dict(batch)
        real_rows = np.asarray(batch["weight"]) > 0
        for table, mapping in self.mappings.items():
            if table in self.owned:
                continue
            columns = TABLES[table]
            feature = table.removesuffix("_table")
            raw = self.raw_ids.get(feature)
            pieces, indices = [], []
            for column in columns:
                ids = np.asarray(batch[column]).astype(np.int64)
                real = real_rows if ids.ndim == 1 else real_rows[:, None] & np.asarray(batch["hist_mask"])
                if raw is not None:  # vocabulary index -> raw id; the index is the id's alias (ev.IdMapping.map)
                    indices.append(ids.reshape(-1))
                    ids = raw[ids]
                else:
                    ids = np.where(ids < self.vocab_sizes[feature], ids, 0)
                pieces.append(np.where(real, ids, -1).reshape(-1))
            lookup = mapping.map(np.concatenate(pieces), step, train,
                                 aliases=np.concatenate(indices) if raw is not None else None)
            if lookup.num_rows != mapping.num_rows or lookup.num_rows != self.specs[table].rows:
                raise ev.CapacityError(f"embedding '{feature}' is full ({self.specs[table].rows} rows); raise "
                                       "config.ev_capacity (tables cannot grow during a run)")
            offset = 0
            for column in columns:
                size = np.asarray(batch[column]).size
                shape = np.shape(batch[column])
                out[column] = lookup.slots[offset:offset + size].reshape(shape)
                if lookup.slots_r is not None:
                    out[column + SECOND_ROW] = lookup.slots_r[offset:offset + size].reshape(shape)
                if lookup.blocks is not None:
                    out[column + BLOCKS] = lookup.blocks[offset:offset + size].reshape(shape).astype(np.int32)
                offset += size
            if train:  # padded to the batch's lookups of this table (the most it can admit): one shape per run
                size = offset
                slots = np.full(size, mapping.num_rows, np.int32)
                sources = np.zeros(size, np.int32)
                slots[:len(lookup.init_slots)] = lookup.init_slots
                sources[:len(lookup.init_sources)] = lookup.init_sources
                out[table + INIT_SLOTS], out[table + INIT_SOURCES] = slots, sources
        if self.owned:  # each local device's rows to initialise are its own (the column is split over devices)
            tables = list(self.owned.values())
            requests = requests or self.request(batch)
            columns, init = owned_ids.answer_owned(tables, requests, step, train, self.mesh)
            out.update(columns)
            for table, (slots, sources) in init.items():
                out[table + INIT_SLOTS], out[table + INIT_SOURCES] = slots, sources
        return out

    def evict(self, step: int, row_weights: Callable[[str], Any]) -> dict[str, int]:
        """Applies config.ev_elimination (when a checkpoint is saved); returns evicted rows per feature (owned
        tables: of this process's devices).

        row_weights(table) -> DeepRec's l2 measure 0.5 * |row|^2 of every row of that device table; for an owned
        table a list, one array per local device's shard.
        """
        policy, evicted = self.config.ev_elimination, {}
        for table, mapping in self.mappings.items():
            if not policy or not hasattr(mapping, "evict_stale"):
                continue
            if policy == "gstep":
                result = mapping.evict_stale(step, self.config.ev_steps_to_live)
            else:
                result = mapping.evict_small(row_weights(table), self.config.ev_l2_threshold)
            evicted[table.removesuffix("_table")] = len(result.slots)
        return evicted

    def initial_rows(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(slots, sources) of each table to initialise when the state is created (adaptive shared rows); owned
        tables' as rows of their owner-major global arrays."""
        return {table: m.physical_initial_rows() if table in self.owned else m.initial_rows()
                for table, m in self.mappings.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every replicated mapping's state, as flat named arrays (saved in checkpoints next to the train state);
        owned tables' state is per device (device_state_dicts)."""
        return {f"embedding/{table}/{name}": value for table, m in self.mappings.items() if table not in self.owned
                for name, value in m.state_dict().items()}

    def device_state_dicts(self) -> list[dict[str, np.ndarray]]:
        """Per local device, its shard of every owned table's mapping state (none: an empty list)."""
        return owned_ids.device_states(self.owned) if self.owned else []

    def load_device_state_dicts(self, states: list[dict[str, np.ndarray]]) -> None:
        """Restores what device_state_dicts saved."""
        owned_ids.load_device_states(self.owned, states)

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restores what state_dict saved (a checkpoint without it leaves the mappings fresh)."""
        for table, mapping in self.mappings.items():
            if table in self.owned:
                continue
            state = ev.table_state(arrays, table)
            if state:
                mapping.load_state_dict(state)

    def stats(self) -> dict[str, dict]:
        """Each table's mapping stats; `rows_touched` only where the mappings saw the batches (not `active`: plain
        vocabulary tables whose batches bypass them, so they cannot know)."""
        out = {table.removesuffix("_table"): m.stats() for table, m in self.mappings.items()}
        if not self.active:
            for stats in out.values():
                stats.pop("rows_touched", None)
        return out
