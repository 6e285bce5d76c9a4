"""Incremental checkpoints (DeepRec --incremental_ckpt): between full checkpoints, only the embedding rows that changed.

DeepRec saves, every `save_incremental_checkpoint_secs`, the sparse rows updated since the last save,
and restores the latest full checkpoint followed by the series of incremental checkpoints after it
(DeepRec docs/docs_en/Incremental-Checkpoint.md). Here an increment holds, per table, the touched row
ids and those rows of the table and of every per-row optimizer slot; and every other leaf of the train
state whole (dense parameters and optimizer state, per-table optimizer scalars, batch_stats, step):
they are small, and all of them change every step. Restoring the full checkpoint at `base_step` and
then each of its increments in order gives exactly the trained state.

Layout: <checkpoint_dir>/incremental/<base_step>/<step>.npz. An increment is one .npz file (numpy
only, one file per save, written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a real name); orbax would write a directory of many files per save and has no
use for row subsets. Each file records its step, its base step and the step of the increment before
it (the base step for the first), so a missing file is found, not silently skipped.

Rows are gathered under jit (only the touched rows leave the device, also for tables split by rows
over devices) and written back with a jitted scatter that keeps each array's sharding. In a
multi-process run every process calls save and restore alike (they run collectives); process 0 alone
writes files, and every process reads them (the checkpoint directory is shared).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import zipfile
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from din_jax import parallel
from din_jax.checkpoint import CheckpointError, _first_line
from din_jax.embedding import TABLES, gather_rows, scatter_rows
from input_pipeline.textio import atomic_write

SUBDIRECTORY = "incremental"
FORMAT_VERSION = 1
_INCREMENT_NAME = re.compile(r"^(\d+)\.npz$")
_MIN_BUCKET = 16  # row counts are padded to a power of two (>= this): a few compiled gather/scatter shapes
_STEP_KEY = ".step"  # the train state's step, as _leaves_by_path names it

Tree = Any
RowArrays = dict[str, dict[str, Any]]  # table -> {"params" | "slot/<name>": array [rows, ...]}


class IncrementalCheckpointError(CheckpointError):
    """An incremental checkpoint cannot be written or applied; the message names the file and what to do."""


class IncrementalCheckpointer:
    """Writes and applies the increments of <checkpoint_dir>/incremental; `due` is the every-N-seconds rule.

    every_seconds: config.incremental_ckpt (0 = never due); clock: seconds, injectable for tests.
    """

    def __init__(self, checkpoint_dir: str, every_seconds: float = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = os.path.join(os.path.abspath(checkpoint_dir), SUBDIRECTORY)
        self.every_seconds = every_seconds
        self.clock = clock
        self._saved_at = clock()
        self._last: dict[int, int] = {}  # base step -> step of the last increment written or restored

    def due(self, now: float | None = None) -> bool:
        """Whether `every_seconds` have passed since the last save (or since this was created).

        Every process gets process 0's answer, so all of them call save together.
        """
        if self.every_seconds <= 0:
            return False
        elapsed = (self.clock() if now is None else now) - self._saved_at
        due = np.bool_(elapsed >= self.every_seconds)
        return bool(multihost_utils.broadcast_one_to_all(due) if jax.process_count() > 1 else due)

    def save(self, step: int, base_step: int, state: Tree, touched: Mapping[str, np.ndarray],
             extra: Mapping[str, np.ndarray] | None = None) -> int:
        """Writes the increment of `step` on the full checkpoint of `base_step`; returns its size in bytes.

        touched: per table, the row ids this process's batches looked up since the previous save (or
        since the full checkpoint); they are joined over processes, ids >= the table size (padding)
        are dropped. extra: host-side arrays stored with the increment and returned by restore.
        Nothing is written when `step` is the step already saved (e.g. the full checkpoint's own).
        """
        previous = self._previous(base_step)
        if step == previous:
            return 0
        if step < previous:
            raise IncrementalCheckpointError(
                f"incremental checkpoint of step {step} would follow step {previous} in {self._base_dir(base_step)}; "
                "restore the increments (IncrementalCheckpointer.restore) before training on from the full checkpoint")
        row_arrays = _row_arrays(state)
        tables = {name: arrays["params"] for name, arrays in row_arrays.items()}
        ids = {name: _union_over_processes(_row_ids(name, touched.get(name, ()), table.shape[0]))
               for name, table in tables.items()}
        rows = parallel.gather(_gather(row_arrays, {name: _global_array(_padded(ids[name], table.shape[0]),
                                                                        _replicated_like(table))
                                                    for name, table in tables.items()}))
        leaves = _leaves_by_path(parallel.gather(_without_rows(state)))
        if int(leaves[_STEP_KEY]) != step:
            raise ValueError(f"save(step={step}) got a train state at step {int(leaves[_STEP_KEY])}")
        arrays = {f"leaf/{path}": value for path, value in leaves.items()}
        for name in row_arrays:
            arrays[f"rows/{name}/ids"] = ids[name]
            arrays.update({f"rows/{name}/{key}": value[:len(ids[name])] for key, value in rows[name].items()})
        arrays.update({f"extra/{name}": np.asarray(value) for name, value in (extra or {}).items()})
        payload = _encode(arrays, {"format": FORMAT_VERSION, "step": step, "base_step": base_step,
                                   "previous_step": previous})
        path = self._path(base_step, step)
        if parallel.is_primary():
            with atomic_write(path) as f:
                f.write(payload)
        self._last[base_step] = step
        self._saved_at = self.clock()
        full = state_bytes(state)
        logging.info("Wrote incremental checkpoint %s: %s rows, %d bytes (%.2f%% of the %d-byte full state)", path,
                     {name: len(v) for name, v in ids.items()}, len(payload), 100 * len(payload) / full, full)
        return len(payload)

    def restore(self, state: Tree, base_step: int) -> tuple[Tree, dict[str, np.ndarray] | None, int]:
        """(state, extra, step): `state`, restored from the full checkpoint at `base_step`, with its increments applied.

        The increments are applied in chain order; a newest file that cannot be read (an unfinished save)
        is set aside and the state of the increment before it returned. extra is None when there is no
        increment. The tables and row slots of `state` are donated: use the returned state only.
        """
        state_step = int(parallel.gather(state.step))
        if state_step != base_step:
            raise ValueError(f"restore(base_step={base_step}) got a train state at step {state_step}: pass the state "
                             f"restored from the full checkpoint of step {base_step}")
        row_arrays, leaves = _row_arrays(state), _leaves_by_path(_without_rows(state))
        merged: dict[str, list] = {name: [] for name in row_arrays}
        last = None
        for path, arrays in self._chain(base_step):
            _check_matches(path, arrays, row_arrays, leaves)
            for name in row_arrays:
                merged[name].append({key.removeprefix(f"rows/{name}/"): value for key, value in arrays.items()
                                     if key.startswith(f"rows/{name}/")})
            last = arrays
        if last is None:
            self._last[base_step] = base_step
            return state, None, base_step
        ids, rows = {}, {}
        for name, increments in merged.items():
            table = row_arrays[name]["params"]
            newest_ids, newest_rows = _newest_rows(increments)
            padded, replicated = _padded(newest_ids, table.shape[0]), _replicated_like(table)
            ids[name] = _global_array(padded, replicated)
            rows[name] = {key: _global_array(_padded_rows(value, len(padded)), replicated)
                          for key, value in newest_rows.items()}
        shardings = jax.tree.map(lambda a: a.sharding, row_arrays)
        new_rows = jax.jit(_scatter, out_shardings=shardings, donate_argnums=0)(row_arrays, ids, rows)
        rest = _without_rows(state)
        flat, treedef = jax.tree_util.tree_flatten_with_path(rest)
        rest = treedef.unflatten([_global_array(last[f"leaf/{jax.tree_util.keystr(p)}"], leaf.sharding)
                                  for p, leaf in flat])
        step = int(last[f"leaf/{_STEP_KEY}"])
        self._last[base_step] = step
        extra = {key.removeprefix("extra/"): value for key, value in last.items() if key.startswith("extra/")}
        logging.info("Applied the incremental checkpoints of %s up to step %d", self._base_dir(base_step), step)
        return _with_rows(rest, new_rows), extra, step

    def latest_step(self, base_step: int) -> int | None:
        """The newest increment's step on the full checkpoint of `base_step`, or None."""
        steps = self._steps(base_step)
        return steps[-1] if steps else None

    def prune(self, base_step: int) -> None:
        """Deletes the increments of full checkpoints older than `base_step` (call once `base_step` is saved)."""
        if not parallel.is_primary() or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.isdigit() and int(name) < base_step:
                shutil.rmtree(os.path.join(self.directory, name))

    def _base_dir(self, base_step: int) -> str:
        return os.path.join(self.directory, str(base_step))

    def _path(self, base_step: int, step: int) -> str:
        return os.path.join(self._base_dir(base_step), f"{step}.npz")

    def _steps(self, base_step: int) -> list[int]:
        directory = self._base_dir(base_step)
        names = os.listdir(directory) if os.path.isdir(directory) else []
        return sorted(int(m.group(1)) for m in map(_INCREMENT_NAME.match, names) if m)

    def _previous(self, base_step: int) -> int:
        if base_step not in self._last:
            self._last[base_step] = self.latest_step(base_step) or base_step
        return self._last[base_step]

    def _chain(self, base_step: int) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """(path, arrays) of each increment on `base_step` in order, the chain verified; an unreadable newest
        file is set aside (renamed *.npz.unreadable) and ends the chain."""
        directory, steps, previous = self._base_dir(base_step), self._steps(base_step), base_step

        def resume(previous: int) -> str:
            return (f"delete it and every later file in {directory} to resume from step {previous} (the last good "
                    f"state), or delete {directory} to resume from the full checkpoint of step {base_step}")

        for index, step in enumerate(steps):
            path = self._path(base_step, step)
            try:
                arrays, meta = _decode(path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                if index + 1 < len(steps):
                    raise IncrementalCheckpointError(
                        f"incremental checkpoint {path} is unreadable ({_first_line(e)}) and later increments build "
                        f"on it; " + resume(previous)) from None
                logging.warning("Ignoring the unreadable newest incremental checkpoint %s (%s): an unfinished save; "
                                "resuming from step %d", path, _first_line(e), previous)
                if parallel.is_primary():
                    os.replace(path, path + ".unreadable")
                return
            if (meta["step"], meta["base_step"], meta["previous_step"]) != (step, base_step, previous):
                raise IncrementalCheckpointError(
                    f"incremental checkpoint {path} (step {meta['step']} on the full checkpoint of step "
                    f"{meta['base_step']}, following step {meta['previous_step']}) does not continue the chain at "
                    f"step {previous}: an increment is missing or misplaced; " + resume(previous))
            yield path, arrays
            previous = step



def state_bytes(state: Tree) -> int:
    """The bytes of every array of `state`: what a full checkpoint writes."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def _row_arrays(state: Tree) -> RowArrays:
    """Per table, the arrays indexed by its rows: the table ('params') and its per-row optimizer slots."""
    if "rows" not in state.opt_state:
        raise IncrementalCheckpointError("incremental checkpoints need config.sparse_embeddings=True: with whole-"
                                         "table updates every row of the tables' optimizer state changes every step")
    return {name: {"params": state.params[name], **{f"slot/{k}": v for k, v in state.opt_state["rows"][name].items()}}
            for name in TABLES}


def _without_rows(state: Tree) -> Tree:
    """`state` without the arrays of _row_arrays: what an increment stores whole."""
    return state.replace(params={k: v for k, v in state.params.items() if k not in TABLES},
                         opt_state={k: v for k, v in state.opt_state.items() if k != "rows"})


def _with_rows(rest: Tree, row_arrays: RowArrays) -> Tree:
    """The inverse of (_without_rows, _row_arrays)."""
    params = {**rest.params, **{name: arrays["params"] for name, arrays in row_arrays.items()}}
    slots = {name: {k.removeprefix("slot/"): v for k, v in arrays.items() if k != "params"}
             for name, arrays in row_arrays.items()}
    return rest.replace(params=params, opt_state={**rest.opt_state, "rows": slots})


def _leaves_by_path(tree: Tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@jax.jit
def _gather(row_arrays: RowArrays, ids: dict[str, jax.Array]) -> RowArrays:
    """Each table's arrays at its ids (padding ids read zeros)."""
    return {name: {k: gather_rows(a, ids[name]) for k, a in arrays.items()} for name, arrays in row_arrays.items()}


def _scatter(row_arrays: RowArrays, ids: dict[str, jax.Array], rows: RowArrays) -> RowArrays:
    """Each table's arrays with rows[name][k][i] written at ids[name][i] (padding ids dropped)."""
    return {name: {k: scatter_rows(a, ids[name], rows[name][k]) for k, a in arrays.items()}
            for name, arrays in row_arrays.items()}


def _row_ids(name: str, ids: Any, size: int) -> np.ndarray:
    """Sorted unique ids in [0, size) (ids >= size are the lookups' padding)."""
    ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
    if ids.size and ids[0] < 0:
        raise ValueError(f"touched[{name!r}] holds the negative row id {ids[0]}")
    return ids[ids < size]


def _union_over_processes(ids: np.ndarray) -> np.ndarray:
    """The union of every process's `ids` (sorted unique), on every process."""
    if jax.process_count() == 1:
        return ids
    longest = int(multihost_utils.process_allgather(np.int64(len(ids))).max())
    padded = np.full(longest, -1, np.int64)
    padded[:len(ids)] = ids
    every = multihost_utils.process_allgather(padded).reshape(-1)
    return np.unique(every[every >= 0])


def _bucket(n: int) -> int:
    return max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def _padded(ids: np.ndarray, size: int) -> np.ndarray:
    """ids padded with `size` (out of range: gathers read zeros, scatters drop) to a bucketed length."""
    out = np.full(_bucket(len(ids)), size, np.int32 if size < 2**31 else np.int64)
    out[:len(ids)] = ids
    return out


def _padded_rows(rows: np.ndarray, length: int) -> np.ndarray:
    return np.concatenate([rows, np.zeros((length - len(rows), *rows.shape[1:]), rows.dtype)])


def _replicated_like(array: jax.Array) -> jax.sharding.Sharding:
    """A full copy on every device of `array` (one device: its own sharding)."""
    return array.sharding.update(spec=P()) if isinstance(array.sharding, NamedSharding) else array.sharding


def _global_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` (the same on every process) as a global array on `sharding`, each process placing its shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: np.asarray(value[index]))


def _newest_rows(increments: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One table's (ids, rows) over a chain of increments, each id's rows from the newest increment holding it."""
    ids = np.concatenate([inc["ids"] for inc in increments])
    # np.unique of the reversed ids: the first occurrence there is the newest one.
    unique, first = np.unique(ids[::-1], return_index=True)
    newest = len(ids) - 1 - first
    keys = [k for k in increments[-1] if k != "ids"]
    return unique, {k: np.concatenate([inc[k] for inc in increments])[newest] for k in keys}


def _check_matches(path: str, arrays: Mapping[str, np.ndarray], row_arrays: RowArrays,
                   leaves: Mapping[str, jax.Array]) -> None:
    """Raises unless the increment at `path` has this state's leaves and row arrays, shapes and dtypes."""
    expected = {f"leaf/{p}": (leaf.shape, leaf.dtype) for p, leaf in leaves.items()}
    expected.update({f"rows/{name}/{k}": (a.shape[1:], a.dtype) for name, table in row_arrays.items()
                     for k, a in table.items()})
    found = {k: (v.shape if k.startswith("leaf/") else v.shape[1:], v.dtype) for k, v in arrays.items()
             if k.startswith(("leaf/", "rows/")) and not k.endswith("/ids")}
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()), key=str)[0][0]
        raise IncrementalCheckpointError(
            f"incremental checkpoint {path} does not match this run's model or optimizer (first difference: {diff}); "
            f"use the config it was trained with, or delete {os.path.dirname(path)} to resume from the full checkpoint")


def _encode(arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """An .npz of `arrays` and `meta` (JSON); dtypes numpy cannot store (bfloat16) as unsigned ints of their width."""
    stored, dtypes = {}, {}
    for key, value in arrays.items():
        if value.dtype.kind == "V":
            dtypes[key] = value.dtype.name
            value = value.view(f"u{value.dtype.itemsize}")
        stored[key] = value
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, meta=np.array(json.dumps({**meta, "dtypes": dtypes})), **stored)
    return buffer.getvalue()


def _decode(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and meta of an .npz written by _encode, every member read (a damaged file raises here)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {meta.get('format')}, expected {FORMAT_VERSION}")
    for key, name in meta["dtypes"].items():
        arrays[key] = arrays[key].view(jax.numpy.dtype(name))
    return arrays, meta

