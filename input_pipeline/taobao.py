"""Taobao UserBehavior (Alibaba Tianchi) -> DIEN sample files and vocabularies.

`UserBehavior.csv` has one behaviour a line, `user,item,category,behavior,timestamp`, no header;
ids are integers, behavior is one of pv (page view = click), cart, fav, buy. The mapping onto the
DIEN preparation of `input_pipeline.amazon` (whose pairing, negative sampling, split,
vocabularies and writers are used as they are):

1. A positive is a row whose behaviour is one of `behavior` (default pv only); other rows are
   dropped before anything else, so they are neither targets, history, nor negative candidates.
2. Each user's positives are ordered by timestamp, stably (file order on equal times); repeated
   (user, item) rows are kept, as repeated clicks. The last positive becomes a (negative,
   positive) pair whose history is the earlier positives, oldest first. A user with a single
   positive is dropped.
3. The negative is drawn uniformly from the list of all positive rows' items (so weighted by
   their positive count), re-drawn while it equals the positive item.
4. An item's category is the category id of its first positive row. The data set gives every
   item one category; an item seen with several keeps the first and is counted in
   `items_with_several_categories`.
5. Pairs go to the test file with probability `test_fraction`; vocabularies are counted on train.
Timestamps are only used for ordering; rows outside the data set's nominal 9 days are kept.

Outputs in `out_dir`, as `input_pipeline.amazon` writes them: the sample files and vocabularies,
plus `reviews-info` (`user\\titem\\t1.0\\ttime` of every positive, in file order) and `item-info`
(`item\\tcategory` of every positive item, in increasing item id). Ids are written as decimal
integers. Reading: 4 MB line blocks parsed by Arrow's CSV reader into int32 columns (a block it rejects, or with
a blank line or an out-of-range value, is parsed line by line, which names the bad line; Arrow also accepts
spaces around an integer), only positive rows kept; ids coded through a presence array and its cumsum.
Memory is about 16 bytes per positive row read, and ~50 per row at the every-event writer's peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from absl import app, flags

from input_pipeline.amazon import (_blocks, _parse_lines, _Reviews, _split_lines, check_options, checked_fields,
                                   write_samples)
from input_pipeline import cli
from input_pipeline.errors import bad_file
from input_pipeline.events import first_positions
from input_pipeline.textio import LineBlock

BEHAVIORS = ("pv", "cart", "fav", "buy")

_ID = rb"[0-9]{1,18}"
_FIELDS = (("user", _ID, "a non-negative integer"), ("item", _ID, "a non-negative integer"),
           ("category", _ID, "a non-negative integer"),
           ("behavior", "|".join(BEHAVIORS).encode(), f"one of {', '.join(BEHAVIORS)}"),
           ("timestamp", rb"-?[0-9]{1,18}", "an integer"))
_LAYOUT = "user,item,category,behavior,timestamp"
_HINT = "pass Taobao's UserBehavior.csv (user,item,category,behavior,timestamp, no header)"


@dataclasses.dataclass(frozen=True)
class PrepareStats:
    """Counts of one preparation, for the CLI summary and tests."""

    behaviors: int  # behaviour lines used, of every type
    positives: int  # rows of the chosen behaviour types
    users: int  # users with a positive
    items: int  # distinct positive items
    categories: int  # distinct categories of those items
    train_pairs: int
    test_pairs: int
    dropped_users: int  # users with a single positive (no history)
    items_with_several_categories: int  # kept at their first positive row's category
    bad_lines: int  # skipped with on_bad_line='skip'
    truncated: tuple[str, ...]  # the file, as '<path> (after line <n>)', if its gzip stream ended early (skip)
    seconds: float


def prepare(behaviors: str, out_dir: str, *, behavior: str | Iterable[str] = ("pv",), seed: int = 3,
            test_fraction: float = 0.1, on_bad_line: str = "error", samples: str = "last_event",
            split_time: int | None = None) -> PrepareStats:
    """Writes the DIEN sample files (or the every-event storage), vocabularies and info files of a UserBehavior
    file to `out_dir`; `samples` and `split_time` as in `input_pipeline.amazon.prepare`."""
    chosen = behavior.split(",") if isinstance(behavior, str) else list(behavior)
    if not chosen or not set(chosen) <= set(BEHAVIORS):
        raise ValueError(f"behavior must be a non-empty subset of {', '.join(BEHAVIORS)}, not {behavior!r}")
    check_options(on_bad_line, test_fraction, samples, split_time)
    start = time.perf_counter()
    rows, used, bad, truncated = _read_positives(behaviors, on_bad_line == "skip", chosen)
    if not used:
        problem = f"has no usable lines ({bad} bad lines skipped)" if bad else "has no lines"
        raise bad_file(behaviors, problem, _HINT)
    if not len(rows["user"]):
        raise bad_file(behaviors, f"has no {'/'.join(chosen)} rows", "choose other types with --behavior")
    uid, uid_tokens = _codes(rows.pop("user"))
    item_code, item_tokens = _codes(rows.pop("item"))
    category = rows.pop("category")
    item_category = category[first_positions(item_code, len(item_tokens))]  # [I] category of each item's first row
    several = len(np.unique(item_code[category != item_category[item_code]]))
    del category
    item_cat, cat_tokens = _codes(item_category)
    data = _Reviews(uid=uid, item=item_code, rating=np.broadcast_to(np.float64(1.0), uid.shape), time=rows["timestamp"],
                    uid_tokens=uid_tokens, item_tokens=item_tokens)
    train_pairs, test_pairs, dropped_users = write_samples(
        behaviors, out_dir, data, item_cat, cat_tokens, _item_rows(item_tokens, cat_tokens[item_cat]),
        samples=samples, seed=seed, test_fraction=test_fraction, split_time=split_time, bad_lines=bad,
        truncated=truncated)
    return PrepareStats(
        behaviors=used, positives=len(uid), users=len(uid_tokens), items=len(item_tokens), categories=len(cat_tokens),
        train_pairs=train_pairs, test_pairs=test_pairs, dropped_users=dropped_users,
        items_with_several_categories=several, bad_lines=bad, truncated=truncated,
        seconds=time.perf_counter() - start)


def _item_rows(item_tokens: np.ndarray, categories: np.ndarray) -> Iterator[tuple[bytes, bytes]]:
    """(item, category) rows for item-info, made only when a last-event preparation writes it."""
    return zip(item_tokens.tolist(), categories.tolist())


def _codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes ([N] int32) of integer ids into their sorted distinct values, and those values as tokens.

    Ids below a bound proportional to N (Taobao's are) are coded through a presence array and its cumsum,
    without sorting; others through np.unique.
    """
    if len(ids) and ids.min() >= 0 and ids.max() < 8 * len(ids) + (1 << 24):
        present = np.zeros(int(ids.max()) + 1, bool)
        present[ids] = True
        values = np.flatnonzero(present)
        codes = (np.cumsum(present, dtype=np.int32) - 1)[ids]
    else:
        values, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.int32, copy=False), values.astype(bytes).astype(object)


def _read_positives(path: str, skip: bool, chosen: list[str]) -> tuple[dict[str, np.ndarray], int, int, tuple[str, ...]]:
    """The chosen rows' user, item, category, timestamp columns (int32 where they fit, else int64), in file
    order; the lines used, the bad-line count and the truncated file (if skipped)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _KEPT}
    used = bad = 0
    truncated: tuple[str, ...] = ()
    with contextlib.closing(_blocks(path, skip, threading.Event())) as blocks:
        for block in blocks:
            if isinstance(block, str):
                truncated = (block,)
                continue
            columns, block_bad = _block_columns(path, block, skip)
            positive = np.isin(columns.pop("behavior"), [BEHAVIORS.index(name) for name in chosen])
            for name, column in columns.items():
                parts[name].append(_narrow(column[positive]))
            used += len(positive)
            bad += block_bad
    return {name: _concatenated(parts, name) for name in _KEPT}, used, bad, truncated


def _concatenated(parts: dict[str, list[np.ndarray]], name: str) -> np.ndarray:
    """One column's blocks as one array, freeing the blocks (so a column at a time is held twice)."""
    column = np.concatenate(parts.pop(name)) if parts[name] else np.zeros(0, np.int32)
    return _narrow(column)


def _narrow(column: np.ndarray) -> np.ndarray:
    """An integer column as int32 when its values fit, else as it is."""
    fits = not len(column) or (column.min() >= np.iinfo(np.int32).min and column.max() <= np.iinfo(np.int32).max)
    return column.astype(np.int32, copy=False) if fits else column


def _block_columns(path: str, block: LineBlock, skip: bool) -> tuple[dict[str, np.ndarray], int]:
    """A block's five columns (behavior as its index in BEHAVIORS) and its bad-line count.

    Arrow's CSV parser reads a clean block; a block it rejects (or one with a blank line, or values the line
    checks refuse) is parsed line by line, which names the first bad line or, with `skip`, counts bad lines.
    """
    table = _csv_table(block.data)
    columns = _checked_columns(table) if table is not None and table.num_rows == block.lines else None
    if columns is not None:
        return columns, 0
    lines = [line.rstrip(b"\r") for line in _split_lines(block.data)]
    rows, bad = _parse_lines(path, range(block.first_line, block.first_line + block.lines), lines, skip, _fields)
    fields = list(zip(*rows)) if rows else [()] * len(_FIELDS)
    columns = {name: np.array(values, np.int64) for (name, _, _), values in zip(_FIELDS, fields) if name != "behavior"}
    return columns | {"behavior": np.array([BEHAVIORS.index(v.decode()) for v in fields[3]], np.int8)}, bad


def _csv_table(data: bytes) -> pa.Table | None:
    """The block parsed by Arrow's CSV reader with the five column types, or None if Arrow rejects it."""
    try:
        return pa_csv.read_csv(pa.py_buffer(data), read_options=_CSV_READ, parse_options=_CSV_PARSE,
                               convert_options=_CSV_CONVERT)
    except pa.ArrowInvalid:
        return None


def _checked_columns(table: pa.Table) -> dict[str, np.ndarray] | None:
    """The table's columns if every row passes the checks `_fields` makes, else None."""
    behavior = pc.index_in(table.column("behavior"), value_set=_BEHAVIOR_VALUES)
    if behavior.null_count:
        return None
    columns = {name: table.column(name).to_numpy() for name in _KEPT}
    for name, (low, high) in _RANGES.items():
        column = columns[name]
        if len(column) and (column.min() < low or column.max() >= high):
            return None
    return columns | {"behavior": behavior.to_numpy().astype(np.int8)}


def _fields(line: bytes) -> tuple[bytes, ...]:
    """The five fields of one behaviour line; says what is wrong with a bad one."""
    return checked_fields(line, b",", _FIELDS, _LAYOUT)


_KEPT = ("user", "item", "category", "timestamp")
_RANGES = {"user": (0, 10**18), "item": (0, 10**18), "category": (0, 10**18), "timestamp": (-10**18 + 1, 10**18)}
_BEHAVIOR_VALUES = pa.array(BEHAVIORS)
_CSV_READ = pa_csv.ReadOptions(column_names=[name for name, _, _ in _FIELDS], use_threads=False, block_size=1 << 30)
_CSV_PARSE = pa_csv.ParseOptions(quote_char=False, double_quote=False, escape_char=False)
_CSV_CONVERT = pa_csv.ConvertOptions(
    column_types={name: pa.string() if name == "behavior" else pa.int64() for name, _, _ in _FIELDS},
    null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False)


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    """The CLI flags; defined only when run as a program, so importing `prepare` defines none."""
    flags.DEFINE_string("behaviors", None, "UserBehavior.csv (optionally .gz).", required=True)
    flags.DEFINE_list("behavior", ["pv"], f"Behaviour types that are positives, comma-separated, of {BEHAVIORS}.")
    flags.register_validator("behavior", lambda chosen: bool(chosen) and set(chosen) <= set(BEHAVIORS),
                             message=f"--behavior takes a comma-separated list of {', '.join(BEHAVIORS)}")
    cli.define_common_flags()


def main(argv: list[str]) -> None:
    """Prepares one UserBehavior file and prints the counts; a DataError is one line on stderr, status 1."""
    cli.run(argv, lambda args: prepare(args.behaviors, args.out_dir, behavior=args.behavior, seed=args.seed,
                                       test_fraction=args.test_fraction, on_bad_line=args.on_bad_line,
                                       samples=args.samples, split_time=args.split_time))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
