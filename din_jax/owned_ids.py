"""Raw-id embedding tables (ev, adaptive, dynamic) split over the devices together with their id -> row mappings:
each device's host maps only the ids it owns (config.shard_embeddings).

Replicated, a raw-id table has one din_jax.ev mapping that every process feeds the whole global batch, so each
process's host work grows with the number of processes. Split, the table is N shards: device d owns the ids
with owner(id) = d, holds their rows as its Q local rows, and keeps a mapping of its own (`OwnedTable`). Local
row r of device d is the table's logical row r * N + d, which is where din_jax.sharded_tables' mod placement
routes it, so the train step is that of any routed table.

Owner of a raw id (`owners`): hash64(id, OWNER_SEED) mod N for ev and dynamic; for adaptive, (hash64(id) mod B)
mod N with B its hash buckets, so the ids that share a hashed row share its owner (device d holds buckets d,
d + N, ...). Every process knows every token's raw id (train.Data.raw_ids), so the owner of each vocabulary
index is one array lookup.

Mapping a batch (`request_owned`, then `answer_owned`), on every process, step after step:
  1. requests: each local device's share of the batch, its unique vocabulary indices and how often each is
     looked up, bucketed by owner into [N, C] (C: the capacity planned for the epoch, as for routed tables);
  2. one all_to_all (`exchange`, a jitted shard_map) takes every bucket to its owner, as int32 pairs;
  3. each owner maps what it received, requester after requester, every id repeated by its count: the
     lookups one process would have mapped, so admission counts, filters, frequencies and row steps are the
     same. Out come its local rows (and live blocks) and its rows to initialise before the step;
  4. a second all_to_all returns the rows; the requester writes logical rows into its batch.
Per device and step that is 2 * N * C * 8 bytes with N * C about the device's own unique ids, and each owner
maps about 1/N of the global batch's lookups: both flat in N. Training sends a batch's requests one step ahead
(before the previous train step is dispatched: train._PlanSource.next), so the owners map while the device trains.

Exactness: an id's row values depend on the id (its default row, its own updates), never on which slot holds
it, so N devices train the same embeddings as one (tests/test_owned_ids.py). Two options differ by design:
ev_filter='cbf' keeps one Bloom filter per device (other false positives), and config.ev_capacity > 0 gives
each device ceil(capacity / N) rows (with ev_capacity = 0 a device holds exactly the distinct ids it owns).

Checkpoints: each device's mapping state is one row of an [N, L] uint8 array split over the devices (orbax
writes each process's rows); a run restores it on the same device count only (checkpoint's layout check).
Export merges the devices' mappings into one per table (`merged_state`, din_jax.whole_tables).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from din_jax import ev, parallel, sharded_tables
from din_jax.embedding import unique_host, table_ids_host
from din_jax.model import BLOCKS, TABLES

Batch = dict[str, Any]
OWNER_SEED = 11  # hash64 seed of the owner function: independent of the hashes that place ids in tables and filters


def owners(raw_ids: np.ndarray, shards: int, hash_buckets: int = 0) -> np.ndarray:
    """The owning device (int32) of each raw id: with `hash_buckets` (adaptive), the owner of its hashed bucket."""
    raw = np.asarray(raw_ids, np.int64)
    if hash_buckets:
        return ((ev.hash64(raw) % np.uint64(hash_buckets)) % np.uint64(shards)).astype(np.int32)
    return (ev.hash64(raw, OWNER_SEED) % np.uint64(shards)).astype(np.int32)


def rows_per_device(owner_of: np.ndarray, shards: int, capacity: int) -> int:
    """Own rows of each device: ceil(capacity / N), or with capacity 0 the most distinct ids any device owns."""
    if capacity:
        return -(-capacity // shards)
    return max(int(np.bincount(owner_of, minlength=shards).max(initial=0)), 1)


class OwnedTable:
    """One raw-id table split over the mesh's N devices: this process's devices' mappings (`mappings[k]` is
    device `devices[k]`'s, every one with Q rows) and the raw id and owner of every vocabulary index."""

    def __init__(self, table: str, mappings: Sequence[ev.IdMapping], devices: Sequence[int], shards: int,
                 raw: np.ndarray, owner_of: np.ndarray, capacity: int):
        self.table, self.mappings, self.devices, self.shards = table, list(mappings), list(devices), shards
        self.raw, self.owner_of = raw, owner_of
        self.capacity = capacity  # the whole table's own rows (its default matrix's spread is that of one process)
        self.rows_per_shard = self.mappings[0].num_rows
        self.num_rows = shards * self.rows_per_shard  # logical rows; row r * N + d is device d's local row r
        self.kind = self.mappings[0].kind
        self.latest_step = -1  # the last training step mapped: dynamic dimension evaluates frequencies as of then

    # -- requests (every device) and what they become
    def requests(self, piece: Batch, capacity: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """([N, C, 2] (vocabulary index, lookups) per owner, padded with (-1, 0); (owner, slot, inverse)) of the
        real lookups of one device's share of a batch; inverse: each lookup's unique id (table_ids_host order),
        the last one (the index count) for padding and masked positions."""
        size = self.raw.size
        ids = table_ids_host(piece, self.table, size)
        unique, inverse = unique_host(ids, size)
        counts = np.bincount(inverse, minlength=unique.size)
        if unique.size and unique[-1] == size:  # padding and masked positions look nothing up
            unique, counts = unique[:-1], counts[:-1]
        owner = self.owner_of[unique]
        per_owner = np.bincount(owner, minlength=self.shards)
        if per_owner.max(initial=0) > capacity:
            raise ValueError(f"{self.table}: {per_owner.max()} ids for one owner exceed the planned capacity "
                             f"{capacity} (the capacity plan and the batch disagree)")
        slot = sharded_tables.owner_slots(owner, per_owner)
        send = np.zeros((self.shards, capacity, 2), np.int32)
        send[..., 0] = -1
        send[owner, slot] = np.stack([unique, counts], -1)
        return send, (owner, slot, inverse.reshape(-1))

    def serve(self, k: int, received: np.ndarray, step: int, train: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local device k maps what every requester sent it ([N, C, 2]); returns ([N, C, 2] (local row, live
        blocks) per request, rows to initialise, their sources), the last two padded to N * C."""
        ids, counts = received[..., 0].reshape(-1), received[..., 1].reshape(-1)
        real = np.flatnonzero(ids >= 0)
        mapping = self.mappings[k]
        now = step if train else max(step, self.latest_step)
        try:
            indices = np.repeat(ids[real], counts[real])  # vocabulary indices: the raw ids' aliases
            lookup = mapping.map(self.raw[indices], now, train, aliases=indices)
        except ev.CapacityError as e:
            raise ev.CapacityError(f"{e} (device {self.devices[k]} of {self.shards}: config.ev_capacity is split "
                                   "over the devices)") from None
        first = np.cumsum(counts[real]) - counts[real]
        reply = np.zeros((ids.size, 2), np.int32)
        reply[:, 0] = self.rows_per_shard
        reply[real, 0] = lookup.slots[first]
        if lookup.blocks is not None:
            reply[real, 1] = lookup.blocks[first]
        init_slots = np.full(ids.size, self.rows_per_shard, np.int32)
        init_sources = np.zeros(ids.size, np.int32)
        init_slots[:lookup.init_slots.size] = lookup.init_slots
        init_sources[:lookup.init_sources.size] = lookup.init_sources
        return reply.reshape(received.shape), init_slots, init_sources

    def columns(self, piece: Batch, request: tuple[np.ndarray, ...], reply: np.ndarray) -> Batch:
        """The table's id columns of one device's share as logical rows (N * Q: no row), with live blocks for
        dynamic dimension, from the owners' reply [N, C, 2] to `request` (requests' second value)."""
        owner, slot, inverse = request
        local, blocks = reply[owner, slot, 0], reply[owner, slot, 1]
        logical = np.where(local < self.rows_per_shard, local * self.shards + owner, self.num_rows)
        logical = np.append(logical, self.num_rows).astype(np.int32)[inverse]  # the last entry: no lookup
        blocks = np.append(blocks, 0)[inverse]
        out, offset = {}, 0
        for column in TABLES[self.table]:
            shape = np.shape(piece[column])
            size = int(np.prod(shape))
            out[column] = logical[offset:offset + size].reshape(shape)
            if self.kind == "dynamic":
                out[column + BLOCKS] = blocks[offset:offset + size].reshape(shape)
            offset += size
        return out

    # -- the rest of the mapping interface, over this process's devices
    def physical_initial_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, sources) to set when the table is created, as rows of the owner-major global array: every
        device's, whichever process holds it (adaptive: the shared rows)."""
        first = self.mappings[0]
        if not isinstance(first, ev.AdaptiveEmbedding):
            return ev._NO_INIT
        buckets = np.arange(first.hash_bucket_size)
        device, row = first.shared_rows(buckets, first.capacity, self.shards)
        return (device * self.rows_per_shard + row).astype(np.int32), (-ev.default_rows(buckets) - 1).astype(np.int32)

    def evict_stale(self, step: int, steps_to_live: int) -> ev.Eviction:
        return _joined([m.evict_stale(step, steps_to_live) for m in self.mappings])

    def evict_small(self, row_norms: Sequence[np.ndarray], threshold: float) -> ev.Eviction:
        """row_norms: one array per local device (its shard of the table), in `devices` order."""
        return _joined([m.evict_small(n, threshold) for m, n in zip(self.mappings, row_norms)])

    def stats(self) -> dict:
        """This process's devices' stats, counts summed (per process: each holds its own devices' shards)."""
        each = [m.stats() for m in self.mappings]
        out = {k: (sum(s[k] for s in each) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v)
               for k, v in each[0].items()}
        return {**out, "devices": self.devices, "num_rows": self.num_rows}


def _joined(evictions: Sequence[ev.Eviction]) -> ev.Eviction:
    return ev.Eviction(np.concatenate([e.slots for e in evictions]), np.concatenate([e.ids for e in evictions]))


@functools.cache
def _swap(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
    """A jitted all_to_all over the mesh's `data` axis: block p of each device's [N, ...] goes to device p."""
    swap = lambda x: jax.lax.all_to_all(x, parallel.DATA_AXIS, 0, 0, tiled=True)  # noqa: E731
    return jax.jit(jax.shard_map(swap, mesh=mesh, in_specs=P(parallel.DATA_AXIS), out_specs=P(parallel.DATA_AXIS),
                                 check_vma=False))


def exchange(blocks: np.ndarray, mesh: Mesh) -> np.ndarray:
    """This process's devices' [L * N, ...] int32 blocks (device-major) -> the blocks every device sent them."""
    return _arrived(_dispatched(blocks, mesh))


def _dispatched(blocks: np.ndarray, mesh: Mesh) -> np.ndarray | jax.Array:
    """exchange's all_to_all, started (jax dispatches it asynchronously) but not waited for."""
    return blocks if mesh.size == 1 else _swap(mesh)(parallel.global_batch({"x": blocks}, mesh)["x"])


def _arrived(swapped: np.ndarray | jax.Array) -> np.ndarray:
    """The result of a _dispatched exchange on this host (waits for it)."""
    if isinstance(swapped, np.ndarray):
        return swapped
    return np.concatenate(parallel.local_rows(swapped))


def capacities_for(tables: Sequence[OwnedTable], batch: Batch, local_shards: int) -> dict[str, int]:
    """Each table's exchange capacity for one batch: its planned one (the batch's routing placeholder), else the
    fullest owner bucket of any device (one cross-process max; every process must map its share of the batch)."""
    planned = {t.table: sharded_tables.capacity_of(batch, t.table) // local_shards for t in tables
               if t.table + sharded_tables.CAPACITY in batch}
    missing = [t for t in tables if t.table not in planned]
    if missing:
        planned.update(sharded_tables.plan_capacities(
            [batch], [t.table for t in missing], {t.table: t.raw.size for t in missing}, missing[0].shards,
            local_shards, {t.table: t.owner_of for t in missing}))
    return planned


class Requests(NamedTuple):
    """One batch's requests, sent to the owners (request_owned) and not yet answered (answer_owned)."""

    pieces: list[Batch]                        # each local device's share of the batch
    sent: list[list[tuple[np.ndarray, ...]]]   # per device and table: requests()' (owner, slot, inverse)
    edges: np.ndarray                          # where each table's buckets start in the exchanged blocks
    received: np.ndarray | jax.Array           # the exchange under way: what every device asked of this one's


def request_owned(tables: Sequence[OwnedTable], batch: Batch, mesh: Mesh) -> Requests:
    """Sends each local device's requests for this process's share of a batch to the owners (module docstring,
    steps 1-2). The exchange runs asynchronously: a batch's requests can go out before the previous train step."""
    local_shards = len(tables[0].devices)
    capacities = capacities_for(tables, batch, local_shards)
    pieces = parallel.device_shares(batch, local_shards)
    sent = [[t.requests(piece, capacities[t.table]) for t in tables] for piece in pieces]
    edges = np.cumsum([0] + [capacities[t.table] for t in tables])
    # One exchange for every table: their buckets side by side, [L * N, sum of capacities, 2].
    blocks = np.concatenate([np.concatenate([s[0] for s in row], axis=1) for row in sent])
    return Requests(pieces, [[s[1] for s in row] for row in sent], edges, _dispatched(blocks, mesh))


def answer_owned(tables: Sequence[OwnedTable], requests: Requests, step: int, train: bool, mesh: Mesh
                 ) -> tuple[Batch, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The owners map what they were sent (at `step`, in step order) and answer (module docstring, steps 3-4).
    Returns (the id columns of every owned table as logical rows, per table the (slots, sources) each local
    device initialises before a training step, device after device)."""
    local_shards, edges = len(tables[0].devices), requests.edges
    received = _arrived(requests.received).reshape(local_shards, tables[0].shards, -1, 2)
    replies, inits = [], {}
    for k in range(local_shards):
        row = []
        for i, t in enumerate(tables):
            reply, init_slots, init_sources = t.serve(k, received[k, :, edges[i]:edges[i + 1]], step, train)
            row.append(reply)
            inits.setdefault(t.table, []).append((init_slots, init_sources))
        replies.append(np.concatenate(row, axis=1))
    answered = exchange(np.concatenate(replies), mesh).reshape(local_shards, tables[0].shards, -1, 2)
    out: Batch = {}
    init: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, t in enumerate(tables):
        parts = [t.columns(requests.pieces[k], requests.sent[k][i], answered[k, :, edges[i]:edges[i + 1]])
                 for k in range(local_shards)]
        out.update({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})
        if train:
            t.latest_step = step
            init[t.table] = (np.concatenate([s for s, _ in inits[t.table]]),
                             np.concatenate([s for _, s in inits[t.table]]))
    return out, init


def device_states(tables: Mapping[str, OwnedTable]) -> list[dict[str, np.ndarray]]:
    """Per local device, the state of its shard of every owned table, as flat named arrays."""
    devices = len(next(iter(tables.values())).devices)
    return [{**{f"embedding/{name}/{key}": value for name, t in tables.items()
                for key, value in t.mappings[k].state_dict().items()},
             **{f"owned/{name}/latest_step": np.array(t.latest_step) for name, t in tables.items()}}
            for k in range(devices)]


def load_device_states(tables: Mapping[str, OwnedTable], states: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Restores what device_states saved (one dict per local device, in device order)."""
    for k, arrays in enumerate(states):
        for name, t in tables.items():
            state = ev.table_state(arrays, name)
            if state:
                t.mappings[k].load_state_dict(state)
            t.latest_step = int(arrays.get(f"owned/{name}/latest_step", t.latest_step))


def merged_state(kind: str, states: Sequence[Mapping[str, np.ndarray]], hash_buckets: int = 0
                 ) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """One mapping for a whole table from its N devices' mapping states (export: one table, one mapping).

    Returns (the state of a `kind` mapping of `capacity` own rows, capacity, and for each row of that mapping's
    table the row of the owner-major global array it comes from). Own row r of device d becomes row r * N + d;
    adaptive's bucket b (device b mod N's local bucket b // N) becomes row capacity + b. Counts of ids waiting for
    admission are kept (the devices' ids are disjoint); a Bloom filter's counters are not (per device, they do not
    add up to one filter): the state has none, and inference does not count.
    """
    shards, own = len(states), states[0]["slot_ids"].size
    rows_per_device = states[0]["row_step"].size
    capacity = shards * own
    interleave = lambda name, stop=None: np.stack([s[name][:stop] for s in states], axis=1).reshape(-1)  # noqa: E731
    owner, local = np.arange(capacity) % shards, np.arange(capacity) // shards
    physical = owner * rows_per_device + local
    row_step = interleave("row_step", own)
    if kind == "adaptive":
        device, row = ev.AdaptiveEmbedding.shared_rows(np.arange(hash_buckets), own, shards)
        physical = np.concatenate([physical, device * rows_per_device + row])
        row_step = np.concatenate([row_step, np.stack([s["row_step"] for s in states])[device, row]])
    state = {"slot_ids": interleave("slot_ids"), "row_step": row_step,
             "counters": np.sum([s["counters"] for s in states], axis=0)}
    if "freq" in states[0]:
        state["freq"] = interleave("freq")
    if "pending_ids" in states[0]:
        ids = np.concatenate([s["pending_ids"] for s in states])
        order = np.argsort(ids, kind="stable")
        for name in ("pending_ids", "pending_counts", "pending_steps"):
            state[name] = np.concatenate([s[name] for s in states])[order]
    return state, capacity, physical.astype(np.int64)
