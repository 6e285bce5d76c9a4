"""Command-line entry point: python -m din_jax.main --config configs/default.py --workdir /tmp/din."""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from din_jax import report
from din_jax.checkpoint import CheckpointError
from din_jax.config_check import ConfigError
from input_pipeline.errors import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); override fields as --config.field=value.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results (the seed's --output_dir).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown --config.key or an unreadable config file as one sentence."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _exit(f"{e}; see --helpfull")
    except (AttributeError, KeyError) as e:
        keys = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        bad = str(e).strip("\"'")
        named = next((k for k in keys if k.split(".")[-1] == bad or f".{bad}." in k), f"config.{bad}")
        _exit(f"unknown config key {named.lstrip('-')!r}: it is not a field of the config file; "
              "list the fields with `python -c 'from configs import default; print(default.get_config())'`")
    except (OSError, SyntaxError, ImportError) as e:
        _exit(f"cannot load the config file given by --config ({e}); pass a file such as configs/default.py")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of orbax and jax (dozens of lines per checkpoint); warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/jax/", "/jaxlib/"))
        return record.levelno >= std_logging.WARNING or not noisy


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from din_jax import train  # imported here so that --help and flag errors stay fast

    try:
        config = FLAGS.config
        config.get("dataset")  # a config file that failed to load raises here
    except (OSError, SyntaxError, ImportError, AttributeError) as e:
        _exit(f"cannot load the config file given by --config ({_one_line(e)}); pass a file such as configs/default.py")
    try:
        results = train.train_and_evaluate(config, FLAGS.workdir)
    except (DataError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(report.results_table(results, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
