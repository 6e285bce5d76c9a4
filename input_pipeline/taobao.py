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
integers. Memory is about 32 bytes per positive row plus the sample files' text.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Iterable

import numpy as np
from absl import app, flags

from input_pipeline.amazon import (checked_fields, _check_train_split, _pairs, _parse_lines, _read, _Reviews,
                                   _write_outputs)
from input_pipeline import cli
from input_pipeline.errors import bad_file
from input_pipeline.textio import open_lines

BEHAVIORS = ("pv", "cart", "fav", "buy")

_ID = rb"[0-9]{1,18}"
_FIELDS = (("user", _ID, "a non-negative integer"), ("item", _ID, "a non-negative integer"),
           ("category", _ID, "a non-negative integer"),
           ("behavior", "|".join(BEHAVIORS).encode(), f"one of {', '.join(BEHAVIORS)}"),
           ("timestamp", rb"-?[0-9]{1,18}", "an integer"))
_LINE = re.compile(b"^" + b",".join(b"(" + pattern + b")" for _, pattern, _ in _FIELDS) + b"$", re.MULTILINE)
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
            test_fraction: float = 0.1, on_bad_line: str = "error") -> PrepareStats:
    """Writes the DIEN sample files, vocabularies and info files of a UserBehavior file to `out_dir`."""
    chosen = behavior.split(",") if isinstance(behavior, str) else list(behavior)
    if not chosen or not set(chosen) <= set(BEHAVIORS):
        raise ValueError(f"behavior must be a non-empty subset of {', '.join(BEHAVIORS)}, not {behavior!r}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', not {on_bad_line!r}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], not {test_fraction}")
    start = time.perf_counter()
    with open_lines(behaviors):  # a wrong path fails now, not after a long parse
        pass
    chosen_bytes = np.array([name.encode() for name in chosen], dtype=bytes)
    parts, bad, truncated = _read(behaviors, on_bad_line == "skip",
                                  functools.partial(_positive_rows, chosen=chosen_bytes))
    used = sum(count for _, count in parts)
    if not used:
        problem = f"has no usable lines ({bad} bad lines skipped)" if bad else "has no lines"
        raise bad_file(behaviors, problem, _HINT)
    user, item, category, seconds = np.concatenate([rows for rows, _ in parts]).T
    if not len(user):
        raise bad_file(behaviors, f"has no {'/'.join(chosen)} rows", "choose other types with --behavior")
    uid, uid_tokens, _ = _codes(user)
    item_code, item_tokens, first = _codes(item)
    item_category = category[first]  # [I] category id of each item's first positive row
    cat_values, item_cat = np.unique(item_category, return_inverse=True)
    cat_tokens = cat_values.astype(bytes).astype(object)
    item_cat = item_cat.astype(np.int64)
    data = _Reviews(uid=uid, item=item_code, rating=np.ones(len(uid)), time=seconds,
                    uid_tokens=uid_tokens, item_tokens=item_tokens)
    negative_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    pairs = _pairs(behaviors, data, negative_rng, split_rng, test_fraction)
    _check_train_split(behaviors, pairs, bad, truncated)
    _write_outputs(out_dir, data, pairs, item_cat, cat_tokens,
                   list(zip(item_tokens.tolist(), cat_tokens[item_cat].tolist())))
    return PrepareStats(
        behaviors=used, positives=len(uid), users=len(uid_tokens), items=len(item_tokens),
        categories=len(cat_values), train_pairs=int((~pairs.test).sum()), test_pairs=int(pairs.test.sum()),
        dropped_users=len(uid_tokens) - len(pairs.uid),
        items_with_several_categories=len(np.unique(item_code[category != item_category[item_code]])),
        bad_lines=bad, truncated=truncated, seconds=time.perf_counter() - start)


def _codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ([N] int64) of integer ids into their sorted distinct values, those as tokens, their first rows."""
    values, first, codes = np.unique(ids, return_index=True, return_inverse=True)
    return codes.astype(np.int64), values.astype(bytes).astype(object), first


def _positive_rows(path: str, numbers: list[int], lines: list[bytes], skip: bool, *,
                   chosen: np.ndarray) -> tuple[tuple[np.ndarray, int], int]:
    """([n, 4] int64 user, item, category, timestamp of the chosen rows; lines used) and the bad-line count."""
    rows = _LINE.findall(b"\n".join(lines))
    bad = 0
    if len(rows) < len(lines):  # some line is malformed or blank: find it, line by line
        rows, bad = _parse_lines(path, numbers, lines, skip, _fields)
    table = np.array(rows, dtype=bytes).reshape(len(rows), len(_FIELDS))
    positive = table[np.isin(table[:, 3], chosen)]
    return (positive[:, [0, 1, 2, 4]].astype(np.int64), len(table)), bad


def _fields(line: bytes) -> tuple[bytes, ...]:
    """The five fields of one behaviour line; says what is wrong with a bad one."""
    return checked_fields(line, b",", _FIELDS, _LAYOUT)


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
                                       test_fraction=args.test_fraction, on_bad_line=args.on_bad_line))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
