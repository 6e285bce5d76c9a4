"""What every preparation command shares: the common flags, the summary table, one-line errors."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

from absl import app, flags

from input_pipeline.errors import DataError


def define_common_flags() -> None:
    """--out_dir, --seed, --test_fraction, --samples, --split_time and --on_bad_line, as every converter takes them."""
    flags.DEFINE_string("out_dir", None, "Directory for the sample files and vocabularies.", required=True)
    flags.DEFINE_integer("seed", 3, "Seed of the negative sampling and the train/test split.")
    flags.DEFINE_float("test_fraction", 0.1, "Probability that a user's pair goes to the test file.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_enum("samples", "last_event", ["last_event", "every_event"],
                      "last_event: one (negative, positive) pair per user, DIEN's files; every_event: a pair per "
                      "positive after the user's first, stored as per-user sequences + pointers "
                      "(input_pipeline.events).")
    flags.DEFINE_integer("split_time", None, "Split by time instead of by user: samples whose positive is at or "
                         "after this unix time go to the test split.")
    flags.DEFINE_enum("on_bad_line", "error", ["error", "skip"],
                      "On a malformed line: stop with an error, or count and skip it.")


def summary(stats: Any) -> str:
    """A two-column table of a stats dataclass's fields."""
    cells = [(field.name, _cell(getattr(stats, field.name))) for field in dataclasses.fields(stats)]
    width = max(len(name) for name, _ in cells)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in cells)


def _cell(value: int | float | tuple[str, ...]) -> str:
    """One value of the summary table."""
    if isinstance(value, tuple):
        return ", ".join(value) or "-"
    return f"{value:.2f}" if isinstance(value, float) else f"{value:,}"


def counts(train_pairs: int, test_pairs: int, bad_lines: int) -> str:
    """What a preparation kept and skipped, as its warnings and errors state it."""
    return f"train pairs: {train_pairs:,}, test pairs: {test_pairs:,}, bad lines skipped: {bad_lines:,}"


def warnings(stats: Any) -> list[str]:
    """What makes a prepared directory incomplete or unusable for training, one sentence each.

    `stats` has the fields train_pairs, test_pairs, truncated and one or more bad_* (lines skipped).
    """
    bad_lines = sum(getattr(stats, field.name) for field in dataclasses.fields(stats) if field.name.startswith("bad_"))
    kept = counts(stats.train_pairs, stats.test_pairs, bad_lines)
    found = [f"truncated input: {file} - the rest of its gzip stream is missing or corrupt and was not read ({kept}); "
             "fetch the file again for the whole data set" for file in stats.truncated]
    if bad_lines:
        found.append(f"skipped {bad_lines:,} malformed lines ({kept}); rerun with --on_bad_line=error to see the "
                     "first one with its line number")
    if not stats.test_pairs:
        found.append(f"the test split is empty ({kept}); python -m din_jax.main loads it even with "
                     "--config.no_eval=true and stops there - prepare again from complete raw files, or with more "
                     "users or a larger --test_fraction")
    return found


def run(argv: list[str], prepare: Callable[[Any], Any]) -> None:
    """Runs prepare(flags) and prints its summary, then any `warnings` on stderr (exit status 0).

    A DataError (such as an empty train split) is one line on stderr and exit status 1.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        stats = prepare(flags.FLAGS)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(summary(stats))
    for warning in warnings(stats):
        print(f"warning: {warning}.", file=sys.stderr)
