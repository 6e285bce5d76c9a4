"""Embedding tables and row-sparse lookups: gather the rows a batch touches, differentiate w.r.t. them.

A step looks up, per table, the ids of the batch (targets and the real history positions), reduces
them to unique ids (fixed size, padded with an out-of-range id; see unique_ids), gathers those rows,
and builds the model's embedded inputs from them. Gradients are then taken w.r.t. the gathered rows
(duplicates summed by the gather's transpose), and only those rows of the table and of its optimizer
slots are updated and scattered back - O(batch), not O(vocabulary), per step.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from din_jax.model import BLOCKS, SECOND_ROW, TABLES, TableSpec, history_layout, history_positions, lookup_columns

Array = jax.Array


class RowLookup(NamedTuple):
    """One table's touched rows: `ids` [N] unique (padded with the table size), `inverse` per lookup."""

    ids: Array
    inverse: Array


def touched_ids(batch: Mapping[str, Array], column: str, table_size: int) -> Array:
    """The ids a column really looks up, flattened (history: per position, see model.history_positions);
    padding rows, masked and padding positions -> table_size."""
    real_rows = jnp.asarray(batch["weight"]) > 0
    if column.startswith("hist_"):
        flat, segment = history_positions(batch)
        ids = jnp.asarray(batch[column]).reshape(-1).at[flat].get(mode="fill", fill_value=table_size)
        real = (flat < batch[column].size) & jnp.asarray(real_rows).at[segment].get(mode="fill", fill_value=False)
        return jnp.where(real, ids, table_size)
    return jnp.where(real_rows, batch[column], table_size)


# Batch columns (after a table name) that carry a table's RowLookup computed on the host (host_row_lookups).
LOOKUP_IDS, LOOKUP_INVERSE = "_lookup_ids", "_lookup_inverse"


def touched_ids_host(batch: Mapping[str, np.ndarray], column: str, table_size: int) -> np.ndarray:
    """touched_ids of a numpy batch on the host: the same ids in the same order, int32."""
    real_rows = np.asarray(batch["weight"]) > 0
    values = np.asarray(batch[column])
    if not column.startswith("hist_"):
        return np.where(real_rows, values, table_size).astype(np.int32)
    seq_len = values.shape[1]
    if "hist_index" in batch:  # packed: real positions, padded with B*T
        flat = np.asarray(batch["hist_index"])
        inside = flat < values.size
        flat = np.where(inside, flat, 0)
        real = inside & real_rows[flat // seq_len]
        return np.where(real, values.reshape(-1)[flat], table_size).astype(np.int32)
    real = (np.asarray(batch["hist_mask"]) != 0) & real_rows[:, None]
    return np.where(real, values, table_size).reshape(-1).astype(np.int32)


def table_ids_host(batch: Mapping[str, np.ndarray], table: str, table_size: int,
                   spec: TableSpec | None = None) -> np.ndarray:
    """Every lookup of `table` in a numpy batch, column after column (padding and masked ones -> table_size)."""
    return np.concatenate([touched_ids_host(batch, c, table_size) for c in lookup_columns(table, spec)])


def host_row_lookups(batch: Mapping[str, np.ndarray], table_sizes: Mapping[str, int],
                     specs: Mapping[str, TableSpec] | None = None) -> dict[str, np.ndarray]:
    """row_lookups computed on the host, as batch columns (LOOKUP_IDS, LOOKUP_INVERSE after each table's name).

    A single-device step takes them instead of finding its unique ids itself: np.unique costs the prefetch thread
    ~1 ms for 23k lookups, off the step's critical path, where XLA:CPU's sort or presence map took 2-3 ms.
    """
    out = {}
    for table in TABLES:
        ids = table_ids_host(batch, table, table_sizes[table], (specs or {}).get(table))
        size = min(ids.size, table_sizes[table] + 1)
        unique, inverse = unique_host(ids, table_sizes[table])
        out[table + LOOKUP_IDS] = np.pad(unique, (0, size - unique.size), constant_values=table_sizes[table])
        out[table + LOOKUP_INVERSE] = inverse
    return out


def unique_host(ids: np.ndarray, table_size: int) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(ids, return_inverse=True) for int32 ids in [0, table_size], as int32; like unique_ids, a presence map
    over the rows where the table is at most HOST_PRESENCE_MAP_ROWS_PER_LOOKUP times the lookups."""
    if table_size + 1 > HOST_PRESENCE_MAP_ROWS_PER_LOOKUP * ids.size:
        unique, inverse = np.unique(ids, return_inverse=True)
        return unique, inverse.reshape(-1).astype(np.int32)
    present = np.zeros(table_size + 1, np.bool_)
    present[ids] = True
    unique = np.flatnonzero(present).astype(np.int32)
    rank = np.empty(table_size + 1, np.int32)  # only present ids' entries are written and read
    rank[unique] = np.arange(unique.size, dtype=np.int32)
    return unique, rank[ids]


def pop_host_lookups(batch: Mapping[str, Array]) -> tuple[dict[str, Array], dict[str, RowLookup] | None]:
    """(the batch without host_row_lookups' columns, the lookups they carry or None when there are none)."""
    if not any(key.endswith(LOOKUP_IDS) for key in batch):
        return dict(batch), None
    rest = {k: v for k, v in batch.items() if not k.endswith((LOOKUP_IDS, LOOKUP_INVERSE))}
    return rest, {table: RowLookup(batch[table + LOOKUP_IDS], batch[table + LOOKUP_INVERSE]) for table in TABLES}


# A table at most this many times the lookups finds its unique ids with a presence map over its rows, O(rows +
# lookups), rather than a sort of the lookups, which XLA:CPU runs at ~190 ns per element (~4.5 ns per row for the map).
PRESENCE_MAP_ROWS_PER_LOOKUP = 32
# numpy's sort is faster than XLA's: its presence map wins up to ~128x the lookups (measured: 368k rows, 8.7k lookups
# 0.16 vs 0.32 ms; 4M rows, 23k lookups 1.1 ms either way; 1.6k rows, 23k lookups 0.13 vs 1.0 ms).
HOST_PRESENCE_MAP_ROWS_PER_LOOKUP = 128


def unique_ids(ids: Array, table_size: int, size: int) -> tuple[Array, Array]:
    """jnp.unique(ids, size=size, fill_value=table_size, return_inverse=True) for ids in [0, table_size]: sorted
    unique ids padded with table_size, and each id's index among them."""
    if table_size + 1 > PRESENCE_MAP_ROWS_PER_LOOKUP * ids.shape[0]:
        unique, inverse = jnp.unique(ids, size=size, fill_value=table_size, return_inverse=True)
        return unique, inverse.reshape(-1)
    present = jnp.zeros(table_size + 1, jnp.bool_).at[ids].set(True)
    rank = jnp.cumsum(present, dtype=jnp.int32) - 1                       # a present id's index among them
    unique = jnp.full(size, table_size, ids.dtype).at[jnp.where(present, rank, size)].set(
        jnp.arange(table_size + 1, dtype=ids.dtype), mode="drop")
    return unique, rank[ids]


def row_lookups(batch: Mapping[str, Array], table_sizes: Mapping[str, int],
                specs: Mapping[str, TableSpec] | None = None) -> dict[str, RowLookup]:
    """Unique touched ids and the inverse index of every lookup, per table (fixed shapes under jit)."""
    lookups = {}
    for table in TABLES:
        columns = lookup_columns(table, (specs or {}).get(table))
        ids = jnp.concatenate([touched_ids(batch, c, table_sizes[table]) for c in columns])
        size = min(ids.shape[0], table_sizes[table] + 1)  # the padding id (table size) is one of the values
        lookups[table] = RowLookup(*unique_ids(ids, table_sizes[table], size))
    return lookups


def gather_rows(table: Array, ids: Array) -> Array:
    """table[ids] with out-of-range (padding) ids reading zeros."""
    return table.at[ids].get(mode="fill", fill_value=0)


def scatter_rows(table: Array, ids: Array, rows: Array) -> Array:
    """table with rows[i] written at ids[i]; out-of-range (padding) ids are dropped."""
    return table.at[ids].set(rows.astype(table.dtype), mode="drop", unique_indices=True)


def embedded_from_rows(rows: Mapping[str, Array], lookups: Mapping[str, RowLookup],
                       batch: Mapping[str, Array], specs: Mapping[str, TableSpec] | None = None) -> dict[str, Array]:
    """The model's embedded inputs (uid [B, E], item [B, D], keys [P, D], history layout) from gathered rows."""
    flat, _ = history_positions(batch)
    looked_up = {}
    for table in TABLES:
        spec = (specs or {}).get(table) or TableSpec(0, 0)
        columns = lookup_columns(table, spec)
        pieces = jnp.split(rows[table][lookups[table].inverse],
                           np.cumsum([_lookups_in(batch, c) for c in columns])[:-1].tolist())
        by_column = dict(zip(columns, pieces))
        for column in TABLES[table]:
            looked_up[column] = spec.combine(by_column[column], by_column.get(column + SECOND_ROW),
                                             lookup_blocks(batch, column, flat) if spec.block_size else None)
    return {"uid": looked_up["uid"], "item": jnp.concatenate([looked_up["mid"], looked_up["cat"]], -1),
            "keys": jnp.concatenate([looked_up["hist_mids"], looked_up["hist_cats"]], -1), **history_layout(batch)}


def _lookups_in(batch: Mapping[str, Array], column: str) -> int:
    """How many lookups a column makes in touched_ids order: B for a target column, P for a history column."""
    if column.startswith("hist_"):
        return history_positions(batch)[0].shape[0]
    return batch[column].shape[0]


def lookup_blocks(batch: Mapping[str, Array], column: str, flat: Array) -> Array:
    """The live dimension blocks of each lookup of `column` (dynamic dimension): [B], or [P] for a history."""
    blocks = jnp.asarray(batch[column + BLOCKS])
    if column.startswith("hist_"):
        return blocks.reshape(-1).at[flat].get(mode="fill", fill_value=0)
    return blocks


def initialise_rows(table: Array, slots: Array, sources: Array, defaults: Array) -> Array:
    """`table` with rows `slots` set from `sources`: >= 0 that row of the table, s < 0 row -s-1 of `defaults`.

    Slots out of range (padding) are dropped. Runs before a step's lookups (EmbeddingVariable admissions,
    adaptive promotions).
    """
    from_table = table.at[sources].get(mode="fill", fill_value=0)
    from_defaults = defaults.at[-sources - 1].get(mode="fill", fill_value=0).astype(table.dtype)
    return table.at[slots].set(jnp.where((sources >= 0)[:, None], from_table, from_defaults), mode="drop")


def split_tables(params: Mapping[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
    """(embedding tables, everything else) of a DIN params dict."""
    tables = {name: params[name] for name in TABLES}
    dense = {name: value for name, value in params.items() if name not in TABLES}
    return tables, dense
