"""Prints samples of a prepared directory as DIEN text lines, with their full (untruncated) history.

    python -m input_pipeline.inspect --data_dir D --split train|test --limit N [--seed S]

prints N samples (the first N, or with --seed N drawn at random without replacement, in split order)
as `label\\tuid\\tmid\\tcat\\thist_mids\\thist_cats`, history entries oldest first joined by \\x02:
what `input_pipeline.dien` reads, in whichever format it is stored (DIEN text, Parquet, or the
every-event storage of `input_pipeline.events`), shown as the one DIEN line it stands for. Training
cuts histories to max_seq_length when it builds batches; this shows them whole.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
from absl import app, flags

from input_pipeline import dien, events
from input_pipeline.errors import DataError, bad_file
from input_pipeline.textio import open_lines

SEPARATOR = dien.HISTORY_SEPARATOR.decode()


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample as tokens: what a DIEN line holds."""

    label: int
    uid: str
    mid: str
    cat: str
    hist_mids: list[str]  # oldest first
    hist_cats: list[str]

    def line(self) -> str:
        """The DIEN text line (without its newline)."""
        return "\t".join([str(self.label), self.uid, self.mid, self.cat, SEPARATOR.join(self.hist_mids),
                          SEPARATOR.join(self.hist_cats)])


def count(data_dir: str, split: str) -> int:
    """Number of samples in `split`."""
    if events.is_events_dir(data_dir):
        return len(events.open_column(data_dir, f"{split}_label"))
    path = dien.sample_source(data_dir, split)
    if path.endswith(dien.PARQUET_SUFFIX):
        return pq.read_metadata(path).num_rows
    with open_lines(path) as lines:
        return sum(1 for _ in lines)


def samples(data_dir: str, split: str, indices: Iterable[int] | None = None) -> Iterator[tuple[int, Sample]]:
    """(index, Sample) for the increasing `indices` of `split` (every sample when None), in any stored format."""
    wanted = None if indices is None else np.asarray(list(indices), np.int64)
    if events.is_events_dir(data_dir):
        return _event_samples(data_dir, split, np.arange(count(data_dir, split)) if wanted is None else wanted)
    path = dien.sample_source(data_dir, split)
    if path.endswith(dien.PARQUET_SUFFIX):
        return _parquet_samples(path, wanted)
    return _text_samples(path, wanted)


def _text_samples(path: str, wanted: np.ndarray | None) -> Iterator[tuple[int, Sample]]:
    """The wanted lines of a DIEN text file, parsed."""
    chosen = None if wanted is None else set(wanted.tolist())
    with open_lines(path) as lines:
        for number, line in lines:
            if chosen is None or number - 1 in chosen:
                label, uid, mid, cat, hist_mids, hist_cats = line.decode("utf-8").split("\t")
                yield number - 1, Sample(int(float(label)), uid, mid, cat, _entries(hist_mids), _entries(hist_cats))


def _entries(field: str) -> list[str]:
    """The history entries of one field, oldest first; an empty field has none."""
    return field.split(SEPARATOR) if field else []


def _parquet_samples(path: str, wanted: np.ndarray | None) -> Iterator[tuple[int, Sample]]:
    """The wanted rows of a Parquet sample file."""
    table = pq.read_table(path, columns=dien.FIELDS.split())
    if wanted is not None:
        table = table.take(wanted)
    rows = range(table.num_rows) if wanted is None else wanted.tolist()
    for index, row in zip(rows, table.to_pylist()):
        yield index, Sample(int(row["label"]), row["uid"], row["mid"], row["cat"], row["hist_mids"], row["hist_cats"])


def _event_samples(data_dir: str, split: str, wanted: np.ndarray) -> Iterator[tuple[int, Sample]]:
    """The wanted samples of an every-event storage, histories sliced out of the users' sequences."""
    tokens = {kind: events.read_tokens(data_dir, kind) for kind in events.TOKEN_KINDS}
    column = {name: events.open_column(data_dir, f"{split}_{name}") for name in events.SAMPLE_COLUMNS}
    offsets, seq_mid, seq_cat = (events.open_column(data_dir, f"seq_{name}") for name in ("offsets", "mid", "cat"))
    for index in wanted.tolist():
        user, start = int(column["user"][index]), offsets[column["user"][index]]
        history = slice(start, start + column["position"][index])
        yield index, Sample(int(column["label"][index]), tokens["uid"][user], tokens["mid"][column["mid"][index]],
                            tokens["cat"][column["cat"][index]], [tokens["mid"][m] for m in seq_mid[history]],
                            [tokens["cat"][c] for c in seq_cat[history]])


def chosen_indices(total: int, limit: int, seed: int | None) -> np.ndarray:
    """The first `limit` indices, or with a seed `limit` drawn without replacement; increasing."""
    limit = min(limit, total)
    if seed is None:
        return np.arange(limit)
    return np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))


def _define_flags() -> None:
    """The CLI flags; defined only when run as a program."""
    flags.DEFINE_string("data_dir", None, "A prepared directory (DIEN text, Parquet or every-event storage).",
                        required=True)
    flags.DEFINE_enum("split", "train", ["train", "test"], "Which split to print.")
    flags.DEFINE_integer("limit", 10, "How many samples to print.", lower_bound=0)
    flags.DEFINE_integer("seed", None, "Draw the samples at random with this seed (default: the first ones).")


def main(argv: list[str]) -> None:
    """Prints the chosen samples' DIEN lines; a DataError is one line on stderr, status 1."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    args = flags.FLAGS
    try:
        if not os.path.isdir(args.data_dir):
            raise bad_file(args.data_dir, "no such data directory", "pass a directory prepared by input_pipeline")
        indices = chosen_indices(count(args.data_dir, args.split), args.limit, args.seed)
        for _, sample in samples(args.data_dir, args.split, indices):
            sys.stdout.buffer.write(sample.line().encode("utf-8") + b"\n")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
