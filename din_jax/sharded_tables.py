"""Embedding tables split over the devices by rows, each lookup routed to its row's owner with all-to-all.

Placement (config.shard_embeddings): table row i lives on device i mod N, as its local row i // N. Mod
placement, because vocabularies are sorted by frequency (DIEN's and ours: id 1 is the most frequent token),
so range placement would hand the hottest rows to device 0; `python benchmarks/multiprocess.py --placement`
measures both. A table's global array is owner-major, [N * Q, D] with Q = ceil(rows / N): device d's block
holds rows d, d + N, d + 2N, ...; `physical_ids` and `logical_table` translate. Tables with fewer than
config.shard_min_rows rows (the category table) stay replicated.

A step on every device (inside shard_map over the data axis):
  1. its own lookups, deduplicated (embedding.row_lookups: U unique ids);
  2. forward: the unique ids bucketed by owner into [N, C] (C: the capacity), all_to_all sends each bucket
     to its owner, which gathers the rows and sends them back (a second all_to_all);
  3. backward: the row gradients go back to their owners the same way (a third all_to_all); each owner sums
     what every requester sent for a row and applies the row rule (optim.RowRule, exact Adam's catch-up
     included) to its rows, with the per-table clip norm taken over all owners (a scalar psum);
  4. replicated small tables: the gradient is all-reduced as a dense [rows, D] buffer, in the one all-reduce
     of the dense parameters' gradients.
Per device and step that is N * C * (4 + 2 * 4 * D) bytes per routed table, and N * C is about the
device's own unique ids: flat in the number of devices, where the replicated path's all-gather of ids and
all-reduce of the global batch's rows grow with it.

Capacity: XLA needs static shapes, and an id must never be dropped. The input plan is a function of the
seed, so before an epoch each process builds the unique ids of its own batch shards for every step and
counts them per owner; one cross-process max (a few integers) gives the epoch's capacity per table, rounded
up to CAPACITY_GRANULE. That is exact (every bucket of every step fits), costs each process its own share of
the epoch (flat in N), and gives an epoch one compiled shape. The capacity travels to the step as the shape
of a placeholder batch column, so the jitted step needs no static argument. The work queue hands batches out
at run time, so it cannot be planned and is refused with sharded tables.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from din_jax import parallel
from din_jax.embedding import gather_rows, table_ids_host, unique_ids
from din_jax.model import TABLES

Array = jax.Array

CAPACITY = "/capacity"   # batch column suffix: a placeholder [C] per device whose length is the table's capacity
CAPACITY_GRANULE = 8


def rows_per_shard(rows: int, shards: int) -> int:
    """Q: each device's rows of a table of `rows` rows split over `shards` devices (the last ones padded)."""
    return -(-rows // shards)


def physical_ids(ids, rows: int, shards: int):
    """Logical row ids -> rows of the owner-major global array (numpy or jax); ids >= rows stay out of range."""
    q = rows_per_shard(rows, shards)
    xp = np if isinstance(ids, np.ndarray) else jnp
    return xp.where(ids < rows, (ids % shards) * q + ids // shards, shards * q)


def to_physical(table: Array, shards: int) -> Array:
    """A whole logical table [rows, D] -> owner-major [N * Q, D] (zero rows pad it to N * Q)."""
    q = rows_per_shard(table.shape[0], shards)
    padded = jnp.pad(table, ((0, shards * q - table.shape[0]), (0, 0)))
    return padded.reshape(q, shards, -1).transpose(1, 0, 2).reshape(shards * q, -1)


def logical_table(table, rows: int, shards: int):
    """An owner-major [N * Q, D] table (numpy or jax) -> the logical [rows, D] one."""
    width = table.shape[1]
    return table.reshape(shards, -1, width).transpose(1, 0, 2).reshape(-1, width)[:rows]


def routed_tables(vocab_sizes: Mapping[str, int], min_rows: int) -> tuple[str, ...]:
    """The tables split over the devices: those with at least `min_rows` rows (the others stay replicated);
    vocab_sizes by feature, as DIN.vocab_sizes."""
    return tuple(name for name in TABLES if vocab_sizes[name.removesuffix("_table")] >= min_rows)


class Route(NamedTuple):
    """Where this device's unique ids went: owner [U] (N for padding), slot [U] in the owner's bucket, and
    `requested` [N, C]: the local rows each device asked of this one (Q: nothing)."""

    owner: Array
    slot: Array
    requested: Array


def _buckets(ids: Array, rows: int, shards: int, capacity: int) -> tuple[Array, Array, Array]:
    """(owner, slot, send [N, C]) of sorted unique ids padded with `rows`: each real id's owner and its place
    among that owner's ids; send holds the owners' local rows (Q where empty)."""
    q = rows_per_shard(rows, shards)
    real = ids < rows
    owner = jnp.where(real, ids % shards, shards)
    order = jnp.argsort(owner, stable=True)
    counts = jnp.zeros(shards + 1, jnp.int32).at[owner].add(1)
    starts = jnp.cumsum(counts) - counts
    slot = jnp.zeros_like(ids).at[order].set(jnp.arange(ids.shape[0]) - starts[owner[order]])
    send = jnp.full((shards, capacity), q, ids.dtype).at[owner, slot].set(ids // shards, mode="drop")
    return owner, slot, send


# Batch columns (after a routed table's name) that carry its Route's requester half computed on the host
# (host_routes): each unique lookup's owner and slot, and the [N * C] local rows sent to the owners.
ROUTE_OWNER, ROUTE_SLOT, ROUTE_SEND = "_route_owner", "_route_slot", "_route_send"


def owner_slots(owner: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each entry's place among the entries of its owner, in order (counts: entries per owner, bincount(owner))."""
    order = np.argsort(owner, kind="stable")
    slot = np.empty_like(owner)
    slot[order] = np.arange(owner.size) - (np.cumsum(counts) - counts)[owner[order]]
    return slot


def host_routes(ids: np.ndarray, rows: int, shards: int, capacity: int) -> dict[str, np.ndarray]:
    """_buckets on the host: the route columns of sorted unique ids padded with `rows` (one device's shard)."""
    q = rows_per_shard(rows, shards)
    real = ids < rows
    owner = np.where(real, ids % shards, shards).astype(np.int32)
    slot = owner_slots(owner, np.bincount(owner, minlength=shards + 1))
    send = np.full((shards, capacity), q, np.int32)
    send[owner[real], slot[real]] = ids[real] // shards
    return {ROUTE_OWNER: owner, ROUTE_SLOT: slot, ROUTE_SEND: send.reshape(-1)}


def _all_to_all(x: Array, axis_name: str) -> Array:
    """[N, ...] -> [N, ...]: block p goes to device p; block p of the result came from device p."""
    return jax.lax.all_to_all(x, axis_name, 0, 0, tiled=True)


def gather_routed(shard: Array, ids: Array, rows: int, capacity: int, axis_name: str,
                  routes: Mapping[str, Array] | None = None) -> tuple[Array, Route]:
    """The rows [U, D] of this device's unique ids (sorted, padded with `rows`: zeros) from their owners; `routes`:
    host_routes' columns for them, when the host computed them (else bucketed here)."""
    shards = jax.lax.axis_size(axis_name)
    if routes is None:
        owner, slot, send = _buckets(ids, rows, shards, capacity)
    else:
        owner, slot = routes[ROUTE_OWNER], routes[ROUTE_SLOT]
        send = routes[ROUTE_SEND].reshape(shards, capacity)
    requested = _all_to_all(send, axis_name)                                             # [N, C]
    served = gather_rows(shard, requested.reshape(-1)).reshape(shards, capacity, -1)     # [N, C, D]
    received = _all_to_all(served, axis_name)
    return received.at[owner, slot].get(mode="fill", fill_value=0), Route(owner, slot, requested)


def owner_gradients(grads: Array, route: Route, rows_here: int, axis_name: str) -> tuple[Array, Array]:
    """Row gradients [U, D] of this device's unique ids -> (local rows [N * C] unique, padded with Q =
    `rows_here`; their gradients summed over every device that looked them up) on their owner."""
    shards, capacity = route.requested.shape
    send = jnp.zeros((shards, capacity, grads.shape[-1]), grads.dtype).at[route.owner, route.slot].set(
        grads, mode="drop")
    received = _all_to_all(send, axis_name).reshape(shards * capacity, -1)
    requested = route.requested.reshape(-1)
    local, inverse = unique_ids(requested, rows_here, requested.shape[0])  # a presence map when Q is small
    summed = jax.ops.segment_sum(received, inverse, requested.shape[0])
    return local, summed


def capacity_of(batch: Mapping[str, Array], table: str) -> int:
    """The routing capacity C the batch carries for `table` (the length of its placeholder column)."""
    return batch[table + CAPACITY].shape[0]


def without_capacities(batch: Mapping[str, Array]) -> dict[str, Array]:
    """`batch` without its capacity placeholders."""
    return {k: v for k, v in batch.items() if not k.endswith(CAPACITY)}


def bucket_counts(batch: Mapping[str, np.ndarray], tables: Iterable[str], table_rows: Mapping[str, int],
                  shards: int, local_shards: int, owners: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Per routed table, the fullest owner bucket of any of this process's `local_shards` batch shards.

    owners: for tables whose ids are vocabulary indices mapped by their owners (din_jax.owned_ids), the owner of
    each index; table_rows is then the number of indices. Otherwise row i's owner is i mod shards.
    """
    shares = parallel.device_shares(batch, local_shards)
    fullest = {}
    for table in tables:
        most = 0
        for shard in shares:
            ids = np.unique(table_ids_host(shard, table, table_rows[table]))
            ids = ids[ids < table_rows[table]]
            owner = owners[table][ids] if owners and table in owners else ids % shards
            most = max(most, int(np.bincount(owner, minlength=shards).max(initial=0)))
        fullest[table] = most
    return fullest


def plan_capacities(batches: Iterable[Mapping[str, np.ndarray]], tables: Sequence[str], table_rows: Mapping[str, int],
                    shards: int, local_shards: int, owners: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Each table's all-to-all capacity for a run of batches: the fullest owner bucket (bucket_counts) of any device
    in any of them, rounded up; this process counts its own batches, one cross-process max gives everyone's."""
    fullest = np.zeros(len(tables), np.int64)
    for batch in batches:
        counts = bucket_counts(batch, tables, table_rows, shards, local_shards, owners)
        fullest = np.maximum(fullest, [counts[table] for table in tables])
    fullest = parallel.gather_host(fullest).max(axis=0)
    return {table: round_capacity(int(c)) for table, c in zip(tables, fullest)}


def round_capacity(count: int) -> int:
    """A bucket count rounded up to CAPACITY_GRANULE (at least one granule)."""
    return max(-(-count // CAPACITY_GRANULE), 1) * CAPACITY_GRANULE


def capacity_columns(capacities: Mapping[str, int], local_shards: int) -> dict[str, np.ndarray]:
    """The placeholder columns that carry each table's capacity C to the step: [local_shards * C] int8 zeros."""
    return {table + CAPACITY: np.zeros(local_shards * c, np.int8) for table, c in capacities.items()}


def dense_gradient(grads: Array, ids: Array, rows: int) -> tuple[Array, Array]:
    """A replicated small table's row gradients [U, D] of unique ids -> ([rows, D] gradient, [rows] lookups > 0)
    over the whole table, to be all-reduced with the dense parameters' gradients."""
    full = jnp.zeros((rows, grads.shape[-1]), jnp.float32).at[ids].add(grads.astype(jnp.float32), mode="drop")
    touched = jnp.zeros(rows, jnp.float32).at[ids].add(1.0, mode="drop")
    return full, touched
