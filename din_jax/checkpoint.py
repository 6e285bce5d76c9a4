"""Orbax checkpoints of the train state: periodic saves (seed --save_steps), retention, resume.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never destroys the last good checkpoint; `max_to_keep` deletes old steps only after a new one is final.
Each step holds the train state (item 'default') and, next to it in the same atomic step, the host-side
state of the run (item 'extra': numpy arrays such as the work queue's position or embedding id maps).
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE_ITEM, EXTRA_ITEM = "default", "extra"


class CheckpointError(Exception):
    """A checkpoint cannot be written or does not fit this run's config; the message says what to do."""


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def restore_latest(self, state: Any) -> Any | None:
        """The newest checkpoint restored into `state`'s structure, or None when there is none."""
        restored = self.restore_latest_with_extra(state)
        return None if restored is None else restored[0]

    def restore_latest_with_extra(self, state: Any) -> tuple[Any, dict[str, np.ndarray]] | None:
        """(train state, host-side arrays saved with it) of the newest checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
        if os.path.isdir(os.path.join(self.directory, str(step), EXTRA_ITEM)):
            items[EXTRA_ITEM] = ocp.args.PyTreeRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model or optimizer ({_first_line(e)}); "
                "use the config it was trained with, or a new --workdir / --config.checkpoint_dir") from None
        extra = restored.get(EXTRA_ITEM) if EXTRA_ITEM in items else None
        return restored[STATE_ITEM], ({} if extra is None else _unpack(np.asarray(extra["npz"])))

    def is_save_step(self, step: int, force: bool = False) -> bool:
        """Whether save(step, ..., force) would write (cheap: no file system access unless it would)."""
        return (force or (self.save_steps > 0 and step % self.save_steps == 0)) and step not in self.manager.all_steps()

    def save(self, step: int, state: Any, force: bool = False,
             extra: Mapping[str, np.ndarray] | None = None) -> bool:
        """Saves `state` (and `extra` host arrays) at `step` if it is a save step (or `force`); returns whether it saved."""
        if not force and (self.save_steps <= 0 or step % self.save_steps):
            return False  # checked first: this runs every step and must not touch the file system
        if step in self.manager.all_steps():
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if extra:
            items[EXTRA_ITEM] = ocp.args.PyTreeSave({"npz": _pack(extra)})
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {step} in {self.directory} ({e.strerror}); "
                                  "the previous checkpoints are intact - free space or fix permissions and rerun") from None

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


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
