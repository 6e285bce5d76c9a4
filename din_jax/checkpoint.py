"""Orbax checkpoints of the train state: periodic saves (seed --save_steps), retention, resume, and the clean stop
on SIGINT / SIGTERM that ends with one.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never destroys the last good checkpoint; `max_to_keep` deletes old steps only after a new one is final.
Each step holds the train state (item 'default') and, next to it in the same atomic step, the host-side
state of the run (item 'extra': numpy arrays such as the work queue's position or embedding id maps).
A save that fails (full disk, lost permission) or a checkpoint that does not fit the config is a
CheckpointError of one sentence; the existing checkpoints stay as they were.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import tempfile
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from din_jax import parallel

STATE_ITEM, EXTRA_ITEM = "default", "extra"
PER_DEVICE_ITEM = "per_device"  # host state that differs by device (din_jax.owned_ids), one row per device
TABLE_LAYOUT = "table_layout"  # extra array: per embedding table (model.TABLES order), the devices it is split over
PER_DEVICE_LENGTHS = "per_device_lengths"  # extra array: the bytes of each device's row of PER_DEVICE_ITEM


class CheckpointError(Exception):
    """A run directory or checkpoint cannot be written, or a checkpoint does not fit this run's config; the message
    says what to do."""


class Interrupted(Exception):
    """Training stopped at SIGINT or SIGTERM after checkpointing the step it reached; exit with 128 + `signum`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM ask training to stop cleanly instead of killing it, from creation until restore().

    The first signal only records itself in `received` (the loop checks it after each step, saves a
    checkpoint and raises interrupted(): nothing is written from inside the handler); it also restores
    the signals' default action, so a second SIGINT or SIGTERM aborts at once. Inactive when `enabled`
    is False or outside the main thread (where Python cannot set handlers).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.received: int | None = None
        active = enabled and threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if active else {}

    def restore(self) -> None:
        """Puts back the handlers there were before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def interrupted(self, step: int, directory: str) -> Interrupted:
        """The Interrupted to raise once the checkpoint of `step` is in `directory`."""
        name = signal.Signals(self.received).name
        return Interrupted(f"stopped by {name} at step {step}; checkpoint {directory}/{step} is saved - rerun the "
                           "same command to resume", self.received)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint; "
                    "send it again to abort without one\n".encode())


def require_writable(directory: str, what: str, keep: bool = True) -> None:
    """Checks that `directory` can be written by writing (and removing) a file in it; if it cannot, a CheckpointError
    naming `what`, the flag that chooses the directory. keep=True creates the directory; keep=False creates nothing
    and probes the nearest existing parent instead, so a run that then fails on its data leaves no empty directory
    behind (and processes sharing a workdir never race one's clean-up against another's probe)."""
    probe = os.path.abspath(directory)
    if not keep:
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
    try:
        if keep:
            os.makedirs(probe, exist_ok=True)
        elif not os.path.isdir(probe):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write in {os.path.abspath(directory)} ({_os_reason(e)}); make it writable "
                              f"or pass another {what}") from None


def config_changes(config_file: str, config: Mapping[str, Any]) -> list[str]:
    """'key: before -> now' for each field of `config` that differs from the run config saved in `config_file`
    ({'config': ...}, as train.py writes it); [] when there is no readable file."""
    try:
        with open(config_file, encoding="utf-8") as f:
            before = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    now = json.loads(json.dumps(dict(config), default=float))  # tuples -> lists, as in the file
    return [f"config.{key}: {old!r} -> {new!r}" for key, old, new in _differences(before, now, "")]


def _differences(before: Any, now: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, before, now) of every leaf that differs between two nested dicts."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in sorted(set(before) | set(now), key=str)
                for d in _differences(before.get(key), now.get(key), f"{prefix}{key}.")]
    return [] if before == now else [(prefix.rstrip("."), before, now)]


class Checkpointer:
    """Saves every `save_steps` steps (0: only when forced), keeps `keep_max`, restores the latest."""

    def __init__(self, directory: str, save_steps: int, keep_max: int):
        self.directory = os.path.abspath(directory)
        self.save_steps = save_steps
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {self.directory} ({e.strerror}); "
                                  "pass a writable --workdir or --config.checkpoint_dir") from None
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep_max, 1), create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=(STATE_ITEM, EXTRA_ITEM, PER_DEVICE_ITEM))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def latest_extra(self) -> dict[str, np.ndarray]:
        """The host-side arrays saved with the newest checkpoint (none: empty)."""
        step = self.latest_step()
        if step is None or not os.path.isdir(os.path.join(self.directory, str(step), EXTRA_ITEM)):
            return {}
        restored = self.manager.restore(step, args=ocp.args.Composite(**{EXTRA_ITEM: ocp.args.PyTreeRestore()}))
        return _unpack(np.asarray(restored[EXTRA_ITEM]["npz"]))

    def restore_latest(self, state: Any) -> Any | None:
        """The newest checkpoint restored into `state`'s structure, or None when there is none."""
        restored = self.restore_latest_with_extra(state)
        return None if restored is None else restored[0]

    def restore_latest_with_extra(self, state: Any, changes: Sequence[str] = (),
                                  table_layout: Mapping[str, int] | None = None
                                  ) -> tuple[Any, dict[str, np.ndarray]] | None:
        """(train state, host-side arrays saved with it) of the newest checkpoint, or None when there is none.

        changes: the config fields changed since the run that wrote it (config_changes), named in the error
        when it does not fit `state`. table_layout: per table, the devices its rows are split over (1: whole),
        which the checkpoint must have been written with (saved in its extra arrays as TABLE_LAYOUT).
        """
        step = self.latest_step()
        if step is None:
            return None
        extra = self.latest_extra()  # read first (and once): the table layout it records decides whether to go on
        if table_layout is not None:
            self._check_table_layout(step, extra.get(TABLE_LAYOUT), table_layout)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract)}))
        except (ValueError, KeyError, TypeError) as e:
            changed = f"; config changed since: {', '.join(changes[:6])}" if changes else ""
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model or optimizer "
                f"({_mismatch(e)}){changed} - rerun with the config it was trained with, or use a new --workdir / "
                "--config.checkpoint_dir") from None
        return restored[STATE_ITEM], extra

    def _check_table_layout(self, step: int, saved: np.ndarray | None, expected: Mapping[str, int]) -> None:
        """CheckpointError naming both device counts when checkpoint `step` split its tables otherwise;
        saved: its TABLE_LAYOUT array (None: written before layouts were recorded, whole tables)."""
        stored = {name: 1 for name in expected} if saved is None else dict(zip(expected, (int(n) for n in saved)))
        if stored != dict(expected):
            split = lambda layout: ", ".join(f"{k} over {n}" for k, n in layout.items() if n > 1) or "none"  # noqa: E731
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} splits its tables over {max(stored.values())} device(s) "
                f"({split(stored)}), this run over {max(expected.values())} ({split(dict(expected))}); resume with "
                "the device count and config.shard_embeddings it was written with, or use a new --workdir")

    def restore_per_device(self, mesh: Mesh, extra: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """This process's devices' `per_device` arrays of the newest checkpoint (whose `extra` is given), in device
        order; none when it holds none. Its table layout was checked: it has this run's device count."""
        step = self.latest_step()
        lengths = extra.get(PER_DEVICE_LENGTHS)
        if step is None or lengths is None:
            return []
        abstract = {"rows": jax.ShapeDtypeStruct((lengths.size, int(lengths.max())), np.uint8,
                                                 sharding=parallel.batch_sharding(mesh))}
        rows = self.manager.restore(step, args=ocp.args.Composite(**{
            PER_DEVICE_ITEM: ocp.args.StandardRestore(abstract)}))[PER_DEVICE_ITEM]["rows"]
        out = []
        for shard in sorted(rows.addressable_shards, key=lambda s: s.index[0].start or 0):
            first = shard.index[0].start or 0  # the device's row of the whole array: its length in `lengths`
            out.extend(_unpack(row[:int(lengths[first + i])]) for i, row in enumerate(np.asarray(shard.data)))
        return out

    def is_save_step(self, step: int, force: bool = False) -> bool:
        """Whether save(step, ..., force) would write (cheap: no file system access unless it would)."""
        return (force or (self.save_steps > 0 and step % self.save_steps == 0)) and step not in self.manager.all_steps()

    def save(self, step: int, state: Any, force: bool = False, extra: Mapping[str, np.ndarray] | None = None,
             per_device: Sequence[Mapping[str, np.ndarray]] = (), mesh: Mesh | None = None) -> bool:
        """Saves `state` (and `extra` host arrays, the same on every process, and `per_device`: named arrays of
        each of this process's devices on `mesh`) at `step` if it is a save step (or `force`); returns whether it
        saved. Every process calls it alike."""
        if not force and (self.save_steps <= 0 or step % self.save_steps):
            return False  # checked first: this runs every step and must not touch the file system
        if step in self.manager.all_steps():
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if per_device:
            blobs = [_pack(arrays) for arrays in per_device]
            lengths = parallel.gather_host(np.array([b.size for b in blobs], np.int64)).reshape(-1)
            rows = np.zeros((len(blobs), int(lengths.max())), np.uint8)
            for row, blob in zip(rows, blobs):
                row[:blob.size] = blob
            items[PER_DEVICE_ITEM] = ocp.args.StandardSave({"rows": jax.make_array_from_process_local_data(
                parallel.batch_sharding(mesh), rows, (lengths.size, rows.shape[1]))})
            extra = {**(extra or {}), PER_DEVICE_LENGTHS: lengths}
        if extra:
            items[EXTRA_ITEM] = ocp.args.PyTreeSave({"npz": _pack(extra)})
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except (OSError, ValueError) as e:
            reason = _os_reason(e)
            if reason is None:
                raise  # not an I/O error: a bug to see with its traceback
            previous = self.latest_step()
            kept = f"checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {step} in {self.directory} ({reason}); {kept} - free "
                                  "space or fix permissions, then rerun the same command to resume") from None

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _pack(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Named numpy arrays of any shapes (empty ones too) as one uint8 array (.npz bytes) orbax can store."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return np.frombuffer(buffer.getvalue(), np.uint8)


def _unpack(blob: np.ndarray) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob.tobytes()), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _os_reason(error: Exception) -> str | None:
    """The operating system's words for an I/O error: an OSError, or tensorstore's ValueError that carries
    `[os_error_code='28']`; None for any other error."""
    if isinstance(error, OSError):
        return error.strerror or (os.strerror(error.errno) if error.errno else _first_line(error))
    code = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else None


def _mismatch(error: Exception) -> str:
    """What does not fit, in short: 'stored shape (144, 80), this config's (64, 80)' when orbax names shapes."""
    shapes = re.search(r"Requested shape: (\([^)]*\)) is not compatible with the stored shape: (\([^)]*\))",
                       str(error))
    return f"stored shape {shapes.group(2)}, this config's {shapes.group(1)}" if shapes else _first_line(error)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
