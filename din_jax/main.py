"""Command-line entry point: python -m din_jax.main --config configs/default.py --workdir /tmp/din."""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import sys
import traceback
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from din_jax import report
from input_pipeline.errors import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); override fields as --config.field=value.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results (the seed's --output_dir).")
flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process 0's coordinator "
                    "(default: $DIN_COORDINATOR_ADDRESS, or the first SLURM node).")
flags.DEFINE_integer("num_processes", 0, "Multi-process runs: how many processes (default: $DIN_NUM_PROCESSES or "
                     "$SLURM_NTASKS; 0 or 1 = a single process).")
flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's index (default: $DIN_PROCESS_ID, "
                     "$JOB_COMPLETION_INDEX of a Kubernetes Indexed Job, or $SLURM_PROCID).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 30, "Multi-process runs: a process silent this long is declared "
                     "dead and the others stop.")
flags.DEFINE_integer("initialization_timeout_seconds", 300, "Multi-process runs: how long to wait for every "
                     "process to join.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown --config.key or an unreadable config file as one sentence."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _exit(f"{e}; see --helpfull")
    except (AttributeError, KeyError):
        _exit(unknown_key_message(argv))
    except (OSError, SyntaxError, ImportError) as e:
        _exit(f"cannot load the config file given by --config ({_one_line(e)}); pass a file such as configs/default.py")


LIST_FIELDS = "list the fields with `python -c 'from configs import default; print(default.get_config())'`"


def unknown_key_message(argv: list[str]) -> str:
    """The sentence for a --config.key override that names no field, with the closest field when one is near."""
    config = _load_config(argv)
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        node, walked = config, ["config"]
        for part in arg.split("=")[0].removeprefix("--config.").split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []  # a leaf or an unreadable file: none
            if part not in fields:
                named = ".".join(walked + [part])
                close = difflib.get_close_matches(part, fields, n=1)
                if close:
                    return f"unknown config key {named!r} (did you mean {'.'.join(walked + close)!r}?)"
                return f"unknown config key {named!r}: it is not a field of the config file; {LIST_FIELDS}"
            node, walked = node[part], walked + [part]
    return f"unknown config key; {LIST_FIELDS}"


def _load_config(argv: list[str]) -> Any:
    """The config file given by --config in `argv`, loaded without overrides (None if it cannot be)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return FLAGS["config"].parser.parse(value)
            except Exception:  # noqa: BLE001 - the override error is the one to report
                return None
    return None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of orbax and jax (dozens of lines per checkpoint), the tracebacks orbax logs for a
    failed write in its worker threads (the error reaches the save, which reports it in one line), and asyncio's
    "Task exception was never retrieved" for orbax's other array reads abandoned after a failed restore (the
    restore reports the failure in one line); warnings show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname and "raised an exception" in str(record.msg):
            return False
        if record.name == "asyncio" and ("/orbax/" in record.getMessage() or _raised_in_orbax(record.exc_info)):
            return False  # a Task names its orbax coroutine; a _GatheringFuture only its exception's traceback
        noisy = any(part in record.pathname for part in ("/orbax/", "/jax/", "/jaxlib/"))
        return record.levelno >= std_logging.WARNING or not noisy


def _raised_in_orbax(exc_info) -> bool:
    """Whether a log record's exception was raised inside orbax."""
    if not exc_info or exc_info[2] is None:
        return False
    return any("/orbax/" in frame.filename.replace("\\", "/") for frame in traceback.extract_tb(exc_info[2]))


def _unraisable(hook_args: object) -> None:
    """sys.unraisablehook: after a failed checkpoint write (a full disk), tensorstore completes each other pending
    write into orbax's closed event loop and Python prints 'Event loop is closed' for each; after a failed restore
    (a checkpoint of another config), orbax's other pending array reads fail when they are collected. The failure
    itself is reported once, by the save or the restore."""
    error = getattr(hook_args, "exc_value", None)
    code = getattr(getattr(hook_args, "object", None), "cr_code", None)  # an abandoned coroutine's code
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    if code is not None and "/orbax/" in code.co_filename.replace("\\", "/"):
        return
    sys.__unraisablehook__(hook_args)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    std_logging.getLogger("asyncio").addFilter(_QuietLibraries())  # whichever handler would print its reports
    sys.unraisablehook = _unraisable
    try:
        config = FLAGS.config
        config.get("dataset")  # a config file that failed to load raises here
    except (OSError, SyntaxError, ImportError, AttributeError) as e:
        _exit(f"cannot load the config file given by --config ({_one_line(e)}); pass a file such as configs/default.py")
    # Imported only now (jax, orbax: ~1.5 s) so that --help, flag errors and a bad config file answer at once.
    from din_jax import parallel, train
    from din_jax.checkpoint import CheckpointError, Interrupted
    from din_jax.config_check import ConfigError
    from din_jax.ev import CapacityError
    try:
        cluster = parallel.resolve_cluster(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        parallel.limit_cpus(config.intra)  # before the first computation sizes XLA's thread pool
    except parallel.ParallelError as e:
        _exit(str(e))
    parallel.initialize(cluster, FLAGS.heartbeat_timeout_seconds, FLAGS.initialization_timeout_seconds)
    try:
        results = train.train_and_evaluate(config, FLAGS.workdir)
    except Interrupted as e:  # SIGINT / SIGTERM: a checkpoint was saved; the usual 128 + signal status
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (DataError, ConfigError, CheckpointError, CapacityError, train.DivergedError) as e:
        _stop(f"error: {e}", cluster is not None)
    except OSError as e:  # a full disk or a lost permission outside checkpoints (metrics, logs)
        _stop(f"error: {e.filename or 'a file'}: {e.strerror or _one_line(e)}; free space or fix permissions, then "
              "rerun the same command to resume from the last checkpoint", cluster is not None)
    except Exception as e:
        if cluster is None:
            raise
        _stop(f"error: process {cluster.process_id} of {cluster.num_processes} stopped ({_one_line(e)}); if another "
              "process failed first its log has the cause - rerun the same command to resume from the last "
              "checkpoint", True)
    if cluster is None or cluster.process_id == 0:
        print(report.results_table(results, FLAGS.workdir))


def _stop(message: str, multi_process: bool) -> None:
    """Exits 1 with `message`; a multi-process run exits at once, without waiting for the lost processes."""
    print(message, file=sys.stderr, flush=True)
    if not multi_process:
        sys.exit(1)
    sys.stdout.flush()
    os._exit(1)  # sys.exit would wait in jax.distributed's shutdown barrier for processes that are gone


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
