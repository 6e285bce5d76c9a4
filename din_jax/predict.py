"""Scores a file of examples with an exported model: python -m din_jax.predict --model DIR --input F --output F.

The input is DIEN sample lines or JSON lines, told apart by the file's first line:

  DIEN   `[label] uid mid cat hist_mids hist_cats`, tab-separated, history entries oldest first joined by
         \\x02 (the label is optional: 5 or 6 fields; '\\r\\n' line ends are fine; plain or gzip)
  JSON   {"uid": ..., "item": ..., "category": ..., "history_items": [...], "history_categories": [...]}
         with an optional "label"

The output has one line per input line, in order: for DIEN lines the score, then a tab and the label
when the line has one; for JSON lines, or with --explain, a JSON object with "score" (and "label" when
given) and with --explain "attention": the weights of the example's history entries in history order
(0 for entries beyond max_seq_length, which the model does not see). The file is read and scored a
batch at a time and the output written atomically: a malformed line stops the run with its
file:line and leaves no output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import IO, Iterator, NamedTuple

import jax
import numpy as np
from absl import app, flags
from tqdm import tqdm

from din_jax.export import (DEFAULT_BATCH_SIZE, ID_COLUMNS, Example, ExportedModel, ExportError, load_model, parse_flags,
                            run_command)
from input_pipeline.errors import DataError, bad_line
from input_pipeline.textio import atomic_write, open_lines

DIEN_FIELDS = "[label] uid mid cat hist_mids hist_cats"
HISTORY_SEPARATOR = "\x02"


class Line(NamedTuple):
    """One input line, parsed."""

    example: Example
    label: int | None
    json: bool


@dataclasses.dataclass(frozen=True)
class Stats:
    """What predict_file did."""

    examples: int
    seconds: float          # reading, scoring and writing everything, compiling included
    compile_seconds: float  # of which the first batch (the inference function compiles for its size)
    unknown_tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # per feature: nothing learned for them

    def unknown_summary(self) -> str:
        """'' when every token was known, else e.g. '12 tokens unknown to the model (uid 2, mid 10, cat 0): ...'."""
        total = sum(self.unknown_tokens.values())
        if not total:
            return ""
        parts = ", ".join(f"{column} {count:,}" for column, count in self.unknown_tokens.items())
        return (f"{total:,} tokens unknown to the model ({parts}): scored as the unknown id 0 (embedding kinds: "
                "a zero or shared row)")

    @property
    def examples_per_sec(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def parse_dien_line(text: str) -> tuple[Example, int | None]:
    """(example, label or None) of a DIEN sample line; ValueError says what is wrong."""
    fields = text.split("\t")
    if len(fields) not in (5, 6):
        raise ValueError(f"expected 5 or 6 tab-separated fields ({DIEN_FIELDS}), found {len(fields)}")
    label = parse_label(fields[0]) if len(fields) == 6 else None
    uid, mid, cat, hist_mids, hist_cats = fields[-5:]
    items = hist_mids.split(HISTORY_SEPARATOR) if hist_mids else []
    categories = hist_cats.split(HISTORY_SEPARATOR) if hist_cats else []
    if len(items) != len(categories):
        raise ValueError(f"hist_mids has {len(items)} entries but hist_cats has {len(categories)}; "
                         "each history item needs its category")
    return Example(uid, mid, cat, items, categories), label


def parse_json_line(text: str) -> tuple[Example, int | None]:
    """(example, label or None) of a JSON line; ValueError says what is wrong."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e}); the file's first line is JSON, so each line must be") from None
    example = Example.from_dict(value)
    return example, (parse_label(value["label"]) if "label" in value else None)


def parse_label(value: str | int | float) -> int:
    """A click label: 0 or 1, spelled as a number ('1', '1.0', 1)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number not in (0.0, 1.0):
        raise ValueError(f"label {value!r} is not 0 or 1")
    return int(number)


def read_lines(path: str) -> Iterator[Line]:
    """The parsed lines of `path`, streamed; the format (DIEN or JSON lines) is that of its first line."""
    with open_lines(path) as lines:
        is_json = None
        for number, raw in lines:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise bad_line(path, number, f"not UTF-8 text ({e})", "write the file as UTF-8") from None
            if is_json is None:
                is_json = text.lstrip().startswith("{")
            try:
                if not text.strip():
                    raise ValueError("empty line; each line must hold one example")
                example, label = parse_json_line(text) if is_json else parse_dien_line(text)
            except ValueError as e:
                raise bad_line(path, number, str(e)) from None
            yield Line(example, label, is_json)


def _batches(lines: Iterator[Line], batch_size: int) -> Iterator[list[Line]]:
    batch: list[Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write(out: IO[str], lines: list[Line], probabilities: np.ndarray, weights: np.ndarray | None,
           model: ExportedModel) -> None:
    """The output lines of one scored batch."""
    rows = []
    for i, line in enumerate(lines):
        score = f"{probabilities[i]:.9g}"
        if weights is None and not line.json:
            rows.append(score if line.label is None else f"{score}\t{line.label}")
            continue
        row = f'{{"score": {score}'
        if line.label is not None:
            row += f', "label": {line.label}'
        if weights is not None:
            attention = model.history_attention(weights[i], len(line.example.history_items))
            row += f', "attention": [{", ".join(f"{w:.9g}" for w in attention)}]'
        rows.append(row + "}")
    out.write("\n".join(rows) + "\n")


def predict_file(model: ExportedModel, input_path: str, output_path: str, explain: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> Stats:
    """Scores every line of `input_path` into `output_path` (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    count, start, compile_seconds = 0, time.perf_counter(), 0.0
    unknown = dict.fromkeys(ID_COLUMNS, 0)
    with tqdm(desc="predict", unit=" examples", disable=not progress, dynamic_ncols=True) as bar, \
            atomic_write(output_path, "w") as out:
        pending = None  # the previous batch: written while this one is scored
        for lines in _batches(read_lines(input_path), batch_size):
            batch_start = time.perf_counter()
            scored = model.score([line.example for line in lines], batch_size)  # one size: one compile
            if not count:  # the first batch compiles the function: timed apart
                jax.block_until_ready(scored)
                compile_seconds = time.perf_counter() - batch_start
            if pending:
                _write_pending(out, pending, explain, model, bar)
            for column, n in model.unknown_tokens([line.example for line in lines]).items():  # while it runs
                unknown[column] += n
            pending = (lines, scored)
            count += len(lines)
        if pending:
            _write_pending(out, pending, explain, model, bar)
    return Stats(count, time.perf_counter() - start, compile_seconds, unknown)


def _write_pending(out: IO[str], pending: tuple, explain: bool, model: ExportedModel, bar: tqdm) -> None:
    lines, (probabilities, weights) = pending
    _write(out, lines, np.asarray(probabilities), np.asarray(weights) if explain else None, model)
    bar.update(len(lines))


def _define_flags() -> None:
    flags.DEFINE_string("model", None, "An exported model directory (python -m din_jax.export).")
    flags.DEFINE_string("input", None, "DIEN sample lines or JSON lines to score (plain or gzip).")
    flags.DEFINE_string("output", None, "Where to write one score line per input line.")
    flags.DEFINE_bool("explain", False, "Write JSON lines with the attention weights over each history.")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Examples scored at a time.", lower_bound=1)
    flags.DEFINE_bool("progress", True, "Show a progress bar on a terminal (--noprogress: never).")
    flags.mark_flags_as_required(["model", "input", "output"])


def main(argv: list[str]) -> None:
    f = flags.FLAGS

    def command() -> Stats:
        if os.path.abspath(f.input) == os.path.abspath(f.output):
            raise DataError(f"{f.output}: --output is the --input file; write the scores to another file")
        return predict_file(load_model(f.model), f.input, f.output, f.explain, f.batch_size,
                            progress=f.progress and sys.stderr.isatty())

    stats = run_command(argv, command, (DataError, ExportError))
    print(f"scored {stats.examples:,} examples in {stats.seconds:.2f} s: {stats.examples_per_sec:,.0f} examples/s "
          f"({stats.compile_seconds:.2f} s of it compiling) -> {f.output}")
    if stats.unknown_summary():
        print(stats.unknown_summary())


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
