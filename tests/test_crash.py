"""Crash safety: a killed, interrupted or failing run keeps its last good checkpoint and resumes to the same result.

Every run is a real `python -m din_jax.main` process on one tiny data set; they share a persistent XLA
compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from din_jax import train
from din_jax.checkpoint import CheckpointError, Checkpointer, StopSignals, require_writable
from tests.test_parallel import TINY, restored_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24  # two epochs of the tiny data (12 steps each): a resumed run crosses the epoch boundary
SAVE_STEPS = 4  # six checkpoints a run: enough to be killed between two, few enough to keep the runs short
RUN = [*TINY, f"--config.steps={STEPS}", f"--config.save_steps={SAVE_STEPS}"]

# The disk fills while orbax writes the train state's arrays of a checkpoint (any step).
DISK_FULL = """
import errno, os, sys
from absl import app
from orbax.checkpoint._src.serialization import jax_array_handlers
from din_jax import main

async def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

jax_array_handlers.ArrayHandler.serialize = disk_full
app.run(main.main, flags_parser=main.parse_flags)
"""


class Runs:
    """Starts din_jax.main on the module's data directory, with the shared compilation cache."""

    def __init__(self, directory: pathlib.Path):
        self.data_dir = directory / "data"
        self.env = dict(os.environ)  # with the session's compilation cache (tests/conftest.py)

    def command(self, workdir: pathlib.Path, *flags: str, code: str = "") -> list[str]:
        start = ["-c", code] if code else ["-m", "din_jax.main"]
        return [sys.executable, *start, "--config", "configs/default.py", "--workdir", str(workdir), *RUN,
                f"--config.data_dir={self.data_dir}", *flags]

    def run(self, workdir: pathlib.Path, *flags: str, code: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(self.command(workdir, *flags, code=code), cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=300)

    def start(self, workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(self.command(workdir), cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=f,
                                    text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("crash"))


@pytest.fixture(scope="module")
def straight(runs, tmp_path_factory) -> pathlib.Path:
    """The workdir of an uninterrupted run (it also prepares the data and fills the compilation cache)."""
    workdir = tmp_path_factory.mktemp("straight")
    result = runs.run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The complete checkpoints of a run (orbax's unfinished ones are named <step>.orbax-checkpoint-tmp)."""
    directory = workdir / "checkpoints"
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if directory.is_dir() else []


def wait_for_checkpoint_after(process: subprocess.Popen, workdir: pathlib.Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while not any(s > step for s in checkpoint_steps(workdir)):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the checkpoint"
        time.sleep(0.01)


def files_digest(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_of(workdir: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    subprocess.run(["cp", "-a", str(workdir), str(destination)], check=True)
    return destination


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def assert_same_as_straight(straight: pathlib.Path, workdir: pathlib.Path) -> None:
    """Bit for bit: the final train state (parameters, optimizer slots, step) and every eval metric."""
    assert json.loads((workdir / "eval_metrics.json").read_text()) == json.loads(
        (straight / "eval_metrics.json").read_text())
    expected, got = (restored_state(w / "checkpoints" / str(STEPS) / "default") for w in (straight, workdir))
    leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for (path, left), right in zip(leaves, jax.tree.leaves(got)):
        assert np.array_equal(left, right), jax.tree_util.keystr(path)


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(runs, straight, tmp_path):
    workdir = tmp_path / "killed"
    process = runs.start(workdir, tmp_path / "killed.log")
    wait_for_checkpoint_after(process, workdir, 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = checkpoint_steps(workdir)[-1]
    assert 2 < last < STEPS and not (workdir / "eval_metrics.json").exists()

    resumed = runs.run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint at step {last}" in resumed.stderr
    assert_same_as_straight(straight, workdir)


def test_sigterm_saves_the_step_reached_and_the_rerun_resumes_from_it(runs, straight, tmp_path):
    workdir = tmp_path / "terminated"
    process = runs.start(workdir, tmp_path / "terminated.log")
    wait_for_checkpoint_after(process, workdir, 0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "terminated.log").read_text()
    reached = checkpoint_steps(workdir)[-1]
    assert reached < STEPS and not (workdir / "eval_metrics.json").exists()
    assert (f"stopped by SIGTERM at step {reached}; checkpoint {workdir}/checkpoints/{reached} is saved - rerun the "
            "same command to resume") in log
    assert "Traceback" not in log

    resumed = runs.run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint at step {reached}" in resumed.stderr
    assert_same_as_straight(straight, workdir)


def test_first_signal_asks_for_a_stop_and_a_second_one_aborts():
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled here, in the main thread, before the next line runs
        assert stop.received == signal.SIGINT
        # The default action again: a second Ctrl-C or SIGTERM ends the process at once, without a checkpoint.
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(runs, straight, tmp_path):
    workdir = copy_of(straight, tmp_path / "diverged")
    before = files_digest(workdir / "checkpoints")
    # Resumed at step 24; step 25's update (Adam moves every weight by ~1e30) makes step 26's loss NaN or Inf.
    result = runs.run(workdir, f"--config.steps={STEPS + 6}", "--config.learning_rate=1e30")
    error = one_error_line(result)
    assert error == (f"error: the training loss was NaN or Inf at step {STEPS + 2}; training stopped and checkpoint "
                     f"{workdir}/checkpoints/{STEPS} (step {STEPS}) is the last good one - lower "
                     "--config.learning_rate (or check the data), then rerun to resume from it")
    assert files_digest(workdir / "checkpoints") == before


def test_divergence_before_any_checkpoint_says_there_is_nothing_to_resume_from(tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), save_steps=0, keep_max=1)
    try:
        with pytest.raises(train.DivergedError) as error:
            train._check_finite(jax.numpy.array(3), None, checkpointer)
    finally:
        checkpointer.close()
    assert str(error.value) == (
        "the training loss was NaN or Inf at step 3; training stopped before any checkpoint was written, so there is "
        "nothing to resume from - lower --config.learning_rate (or check the data) and rerun the same command: it "
        "starts again from step 0 (--config.save_steps=N keeps checkpoints on the way)")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(runs, straight, tmp_path):
    workdir = copy_of(straight, tmp_path / "full")
    result = runs.run(workdir, f"--config.steps={STEPS + SAVE_STEPS}", code=DISK_FULL)
    error = one_error_line(result)
    assert error == (f"error: could not write checkpoint {STEPS + SAVE_STEPS} in {workdir}/checkpoints (No space left "
                     f"on device); checkpoint {STEPS} is intact - free space or fix permissions, then rerun the same "
                     "command to resume")
    assert checkpoint_steps(workdir) == [STEPS]
    kept, original = (restored_state(w / "checkpoints" / str(STEPS) / "default") for w in (workdir, straight))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(original)))


def test_checkpoint_of_another_embedding_dim_names_the_changed_field(runs, straight, tmp_path):
    workdir = copy_of(straight, tmp_path / "other_dim")
    before = files_digest(workdir)
    result = runs.run(workdir, "--config.model.embedding_dim=8")
    error = one_error_line(result)
    assert error.startswith(f"error: checkpoint {workdir}/checkpoints/{STEPS} does not match this run's model or "
                            "optimizer (stored shape")
    assert error.endswith("; config changed since: config.model.embedding_dim: 18 -> 8 - rerun with the config it "
                          "was trained with, or use a new --workdir / --config.checkpoint_dir")
    assert files_digest(workdir) == before  # checkpoints and the run's config.json as they were


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 500")
def test_unwritable_workdir_is_one_line(runs, tmp_path):
    workdir = tmp_path / "readonly"
    workdir.mkdir(mode=0o500)
    error = one_error_line(runs.run(workdir))
    assert error == f"error: cannot write in {workdir} (Permission denied); make it writable or pass another --workdir"


def test_workdir_inside_a_file_is_one_line(runs, tmp_path):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
    error = one_error_line(runs.run(workdir))
    assert error == f"error: cannot write in {workdir} (Not a directory); make it writable or pass another --workdir"


def test_checkpoint_dir_probe_creates_nothing(tmp_path):
    """The checkpoint directory's probe writes in its nearest existing parent: nothing is created, so no empty
    directory is left behind and processes sharing a workdir cannot remove it under one another."""
    require_writable(str(tmp_path / "a" / "checkpoints"), "--config.checkpoint_dir", keep=False)
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"^cannot write in .*/file/checkpoints \(Not a directory\); make it "
                                              r"writable or pass another --config.checkpoint_dir$"):
        require_writable(str(tmp_path / "file" / "checkpoints"), "--config.checkpoint_dir", keep=False)
