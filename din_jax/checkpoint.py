"""Orbax checkpoints of the train state: periodic saves (seed --save_steps), retention, resume.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never destroys the last good checkpoint; `max_to_keep` deletes old steps only after a new one is final.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def restore_latest(self, state: Any) -> Any | None:
        """The newest checkpoint restored into `state`'s structure, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's model or optimizer ({_first_line(e)}); "
                "use the config it was trained with, or a new --workdir / --config.checkpoint_dir") from None

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Saves `state` at `step` if it is a save step (or `force`); returns whether it saved."""
        if not force and (self.save_steps <= 0 or step % self.save_steps):
            return False  # checked first: this runs every step and must not touch the file system
        if step in self.manager.all_steps():
            return False
        try:
            return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {step} in {self.directory} ({e.strerror}); "
                                  "the previous checkpoints are intact - free space or fix permissions and rerun") from None

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
