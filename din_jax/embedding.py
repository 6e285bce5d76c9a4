"""Embedding tables and row-sparse lookups: gather the rows a batch touches, differentiate w.r.t. them.

A step looks up, per table, the ids of the batch (targets and the real history positions), reduces
them to unique ids (a fixed-size jnp.unique, padded with an out-of-range id), gathers those rows,
and builds the model's embedded inputs from them. Gradients are then taken w.r.t. the gathered rows
(duplicates summed by the gather's transpose), and only those rows of the table and of its optimizer
slots are updated and scattered back - O(batch), not O(vocabulary), per step.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from din_jax.model import history_positions

Array = jax.Array

# Table parameter name -> the batch columns that look it up.
TABLES: dict[str, tuple[str, ...]] = {"uid_table": ("uid",), "mid_table": ("mid", "hist_mids"),
                                      "cat_table": ("cat", "hist_cats")}


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


def row_lookups(batch: Mapping[str, Array], table_sizes: Mapping[str, int]) -> dict[str, RowLookup]:
    """Unique touched ids and the inverse index of every lookup, per table (fixed shapes under jit)."""
    lookups = {}
    for table, columns in TABLES.items():
        ids = jnp.concatenate([touched_ids(batch, c, table_sizes[table]) for c in columns])
        unique, inverse = jnp.unique(ids, size=ids.shape[0], fill_value=table_sizes[table], return_inverse=True)
        lookups[table] = RowLookup(unique, inverse.reshape(-1))
    return lookups


def gather_rows(table: Array, ids: Array) -> Array:
    """table[ids] with out-of-range (padding) ids reading zeros."""
    return table.at[ids].get(mode="fill", fill_value=0)


def scatter_rows(table: Array, ids: Array, rows: Array) -> Array:
    """table with rows[i] written at ids[i]; out-of-range (padding) ids are dropped."""
    return table.at[ids].set(rows.astype(table.dtype), mode="drop", unique_indices=True)


def owned_ids(ids: Array, rows_per_shard: int, axis_name: str) -> Array:
    """Global row ids -> indices into this shard's rows of a table split over `axis_name` (others: out of range)."""
    local = ids - jax.lax.axis_index(axis_name) * rows_per_shard
    return jnp.where((local >= 0) & (local < rows_per_shard), local, rows_per_shard)


def gather_sharded_rows(shard: Array, ids: Array, axis_name: str) -> Array:
    """table[ids] of a table split by rows over `axis_name`: each shard reads the rows it owns, a psum joins them."""
    return jax.lax.psum(gather_rows(shard, owned_ids(ids, shard.shape[0], axis_name)), axis_name)


def embedded_from_rows(rows: Mapping[str, Array], lookups: Mapping[str, RowLookup],
                       batch: Mapping[str, Array]) -> dict[str, Array]:
    """The model's embedded inputs (uid [B, E], item [B, D], keys [P, D], segment [P]) from gathered rows."""
    batch_size = batch["weight"].shape[0]

    def pieces(table):
        looked_up = rows[table][lookups[table].inverse]
        return looked_up[:batch_size], looked_up[batch_size:]

    mid, hist_mid = pieces("mid_table")
    cat, hist_cat = pieces("cat_table")
    uid = rows["uid_table"][lookups["uid_table"].inverse]
    _, segment = history_positions(batch)
    return {"uid": uid, "item": jnp.concatenate([mid, cat], -1), "keys": jnp.concatenate([hist_mid, hist_cat], -1),
            "segment": segment}


def split_tables(params: Mapping[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
    """(embedding tables, everything else) of a DIN params dict."""
    tables = {name: params[name] for name in TABLES}
    dense = {name: value for name, value in params.items() if name not in TABLES}
    return tables, dense
