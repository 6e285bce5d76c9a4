"""Amazon (McAuley 2014) review and meta files -> DIEN sample files and vocabularies.

This is the data preparation of DIEN / DeepRec (`process_data.py` -> `local_aggretor.py` ->
`split_by_user.py` -> `generate_voc.py`), re-done with numpy and a seed:

1. An item's category is the last element of its first category path (`categories[0][-1]`);
   items without meta, or with no category, get `default_cat`.
2. Each user's reviews are ordered by `unixReviewTime`, stably (file order on equal times).
3. Only each user's last review yields samples: a negative line (label 0) then a positive line
   (label 1). The negative item is drawn uniformly from the list of all reviews' items (so
   popularity-weighted), re-drawn while it equals the positive item.
4. Both lines carry the user's earlier reviewed items, oldest first, and their categories as
   history. A user with a single review has no history and is dropped.
5. Each pair goes to the test file with probability `test_fraction` (1/10), else to train.
6. Vocabularies are counted on the train file: uid, mid and cat tokens, targets and every history
   entry, most frequent first.

Outputs in `out_dir`, written atomically: `local_train_splitByUser`, `local_test_splitByUser`
(`label\\tuid\\tmid\\tcat\\thist_mids\\thist_cats`, history entries joined by b'\\x02'),
`{uid,mid,cat}_voc.pkl` (dict str -> int, pickle protocol 4) and `.txt` (one token a line,
id = line number, as DeepRec's pick2txt.py writes them), `reviews-info`
(`uid\\tasin\\trating\\ttime` for every review, in file order) and `item-info` (`asin\\tcategory`
for every meta line, in file order).

Deliberate differences from the original scripts:
- Randomness is seeded: two numpy Generators spawned from `seed`, one for negatives and one for
  the split, so the same inputs and seed give identical bytes, and changing `test_fraction`
  does not change the negatives.
- No `eval` on input lines: reviews are JSON; meta lines are JSON or Python literals
  (`ast.literal_eval`). A malformed line is an error naming file:line (or, with
  `on_bad_line='skip'`, counted and skipped).
- The original draws a negative for every review, but `local_aggretor.py` and
  `split_by_user.py` keep only each user's last pair. Draws are independent, so drawing only
  the negatives that survive gives the same distribution of samples (not the same numbers).
- The original raises KeyError when a drawn negative item has no meta; here it gets
  `default_cat`, like a positive without meta.
- `local_train` (the pairs before each user's last one) is never used downstream; it is not built.
- A user whose only review is the last one is dropped explicitly (the original drops both lines
  because their history is empty).
- Users are written in order of their first review in the file, not in Python 2 dict order, and
  vocabulary ties (equal counts) are broken by first appearance in the train file, not by
  Python 2 dict order; so the output is deterministic.
- `generate_voc.py` puts `default_mid`/`default_cat` at id 0 and then overwrites the id with a
  count rank if the token occurs in the data (it does: items without meta), leaving id 0 unused.
  Here the default keeps id 0 and the other tokens take ids 1, 2, ... in rank order.
- An empty first category path (IndexError in the original) gives `default_cat`.
- `split_test()` starts from a hard-coded `last_user = "A26ZDKC53OP6JD"`; this is harmless (it
  only changes which branch resets the counter for the first user) and has no counterpart here,
  since each user's last pair is found directly.

Speed: review lines are parsed in batches by one regular expression for the 2014 file layout
(which also validates the whole line as JSON); a batch with any other line falls back to
`json.loads` line by line. Meta lines likewise have a validating fast path for the usual
Python-literal layout. Everything after parsing is numpy array arithmetic.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import time
from typing import Iterable, Iterator

import numpy as np
from absl import app, flags

from input_pipeline.errors import DataError, bad_file, bad_line
from input_pipeline.textio import atomic_write, open_lines

DEFAULT_MID = "default_mid"
DEFAULT_CAT = "default_cat"
TRAIN_FILE = "local_train_splitByUser"
TEST_FILE = "local_test_splitByUser"
HISTORY_SEPARATOR = b"\x02"

_BATCH_LINES = 1 << 16
_SKIP_HINT = "fix or delete the line, or rerun with --on_bad_line=skip to count and skip bad lines"

# A review line of the 2014 files, fully validated as JSON; groups: reviewerID, asin, overall,
# unixReviewTime. Ids with escapes and numbers with exponents take the json.loads path.
_JSON_STRING = rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_JSON_INT = rb"-?(?:0|[1-9][0-9]{0,17})"
_REVIEW_LINE = re.compile(
    rb'^\{"reviewerID": "([^"\\\x00-\x1f]+)", "asin": "([^"\\\x00-\x1f]+)", '
    rb'(?:"reviewerName": ' + _JSON_STRING + rb", )?"
    rb'"helpful": \[' + _JSON_INT + rb", " + _JSON_INT + rb"\], "
    rb'"reviewText": ' + _JSON_STRING + rb", "
    rb'"overall": (' + _JSON_INT + rb"(?:\.[0-9]+)?), "
    rb'"summary": ' + _JSON_STRING + rb", "
    rb'"unixReviewTime": (' + _JSON_INT + rb"), "
    rb'"reviewTime": ' + _JSON_STRING + rb"\}$",
    re.MULTILINE)

# A meta line as Python 2 printed it: a dict whose first key is 'asin' and which has one
# 'categories' key (a list of lists of strings); other values are strings, numbers, lists of
# those, or dicts of those. Groups: asin, the categories list.
_PY_STRING = rb"""u?(?:'[^'\\\n]*(?:\\.[^'\\\n]*)*'|"[^"\\\n]*(?:\\.[^"\\\n]*)*")"""
_PY_ATOM = rb"(?:" + _PY_STRING + rb"|-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|True|False|None)"
_PY_LIST = rb"\[(?:" + _PY_ATOM + rb"(?:, " + _PY_ATOM + rb")*)?\]"
_PY_FLAT = rb"(?:" + _PY_ATOM + rb"|" + _PY_LIST + rb")"
_PY_DICT = rb"\{(?:" + _PY_STRING + rb": " + _PY_FLAT + rb"(?:, " + _PY_STRING + rb": " + _PY_FLAT + rb")*)?\}"
_PY_PATHS = rb"\[(?:" + _PY_LIST + rb"(?:, " + _PY_LIST + rb")*)?\]"
_PY_PAIR = (rb"""(?!u?['"](?:asin|categories)['"])""" + _PY_STRING
            + rb": (?:" + _PY_FLAT + rb"|" + _PY_PATHS + rb"|" + _PY_DICT + rb")")
_META_LINE = re.compile(
    rb"\{'asin': '([^'\\\x00-\x1f]+)', (?:" + _PY_PAIR + rb", )*?"
    rb"'categories': (" + _PY_PATHS + rb")(?:, " + _PY_PAIR + rb")*\}")
_FIRST_PATH_LEAF = re.compile(rb"\[\[(?:" + _PY_STRING + rb", )*(" + _PY_STRING + rb")\]")
_CONTROL = re.compile(r"[\x00-\x1f]")


@dataclasses.dataclass(frozen=True)
class PrepareStats:
    """Counts of one preparation, for the CLI summary and tests."""

    reviews: int  # review lines used
    users: int
    items: int  # distinct reviewed items
    train_pairs: int
    test_pairs: int
    dropped_users: int  # users with a single review (no history)
    items_without_meta: int  # reviewed items given default_cat (no meta line or no category)
    meta_items: int  # meta lines used
    bad_review_lines: int  # skipped with on_bad_line='skip'
    bad_meta_lines: int
    truncated: tuple[str, ...]  # files whose gzip stream ended early (on_bad_line='skip')
    seconds: float


class _Malformed(ValueError):
    """A line that cannot be used; the message says what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class _Reviews:
    """Review columns in file order; uid and item are codes into the token lists."""

    uid: np.ndarray  # [N] int64
    item: np.ndarray  # [N] int64
    rating: np.ndarray  # [N] float64
    time: np.ndarray  # [N] int64
    uid_tokens: np.ndarray  # [U] object (bytes)
    item_tokens: np.ndarray  # [I] object (bytes)


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """One (negative, positive) pair per kept user, users in order of their first review."""

    uid: np.ndarray  # [K] user codes
    negative: np.ndarray  # [K] item codes
    positive: np.ndarray  # [K] item codes
    history: np.ndarray  # [sum(history_length)] item codes, pair after pair, oldest first
    history_length: np.ndarray  # [K]
    test: np.ndarray  # [K] bool


def prepare(reviews: str, meta: str | None, out_dir: str, *, seed: int = 3,
            test_fraction: float = 0.1, on_bad_line: str = "error") -> PrepareStats:
    """Writes the DIEN sample files, vocabularies and info files for one category to `out_dir`."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', not {on_bad_line!r}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], not {test_fraction}")
    start = time.perf_counter()
    for path in (reviews, meta) if meta else (reviews,):
        with open_lines(path):  # a wrong path fails now, not after a long parse
            pass
    skip = on_bad_line == "skip"
    parts, bad_reviews, truncated = _read(reviews, skip, _review_rows)
    table = np.concatenate(parts)  # [N, 4] bytes: reviewerID, asin, overall, unixReviewTime
    if not len(table):
        problem = f"has no usable review lines ({bad_reviews} bad lines skipped)" if bad_reviews else "has no reviews"
        raise bad_file(reviews, problem,
                       "pass a reviews_<Category>.json[.gz] file with one JSON review a line")
    data = _review_columns(table)
    del table, parts
    meta_parts, bad_meta, meta_truncated = _read(meta, skip, _meta_rows) if meta else ([], 0, ())
    meta_rows = [row for part in meta_parts for row in part]
    categories = _first_categories(meta_rows)
    item_cat, cat_tokens = _item_categories(data.item_tokens, categories)
    negative_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    pairs = _pairs(reviews, data, negative_rng, split_rng, test_fraction)
    _write_outputs(out_dir, data, pairs, item_cat, cat_tokens, meta_rows)
    return PrepareStats(
        reviews=len(data.uid), users=len(data.uid_tokens), items=len(data.item_tokens),
        train_pairs=int((~pairs.test).sum()), test_pairs=int(pairs.test.sum()),
        dropped_users=len(data.uid_tokens) - len(pairs.uid),
        items_without_meta=int((cat_tokens[item_cat] == DEFAULT_CAT.encode()).sum()),
        meta_items=len(meta_rows), bad_review_lines=bad_reviews, bad_meta_lines=bad_meta,
        truncated=truncated + meta_truncated, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Reading


def _read(path: str, skip: bool, parse_batch) -> tuple[list, int, tuple[str, ...]]:
    """`parse_batch` results over `path`'s non-empty lines, the bad-line count and truncated files."""
    parts: list = []
    bad = 0
    truncated: tuple[str, ...] = ()
    for batch in _line_batches(path, skip):
        if batch is None:
            truncated = (path,)
            continue
        rows, batch_bad = parse_batch(path, *batch, skip)
        parts.append(rows)
        bad += batch_bad
    return parts, bad, truncated


def _line_batches(path: str, skip: bool) -> Iterator[tuple[list[int], list[bytes]] | None]:
    """(line numbers, lines) of non-empty lines in batches; a final None marks a skipped truncation."""
    numbers: list[int] = []
    lines: list[bytes] = []
    with open_lines(path) as stream:
        try:
            for number, line in stream:
                if line:
                    numbers.append(number)
                    lines.append(line)
                    if len(lines) == _BATCH_LINES:
                        yield numbers, lines
                        numbers, lines = [], []
        except DataError:
            if not skip:
                raise
            yield numbers, lines
            yield None
            return
    yield numbers, lines


def _parse_lines(path: str, numbers: list[int], lines: list[bytes], skip: bool,
                 parse_line) -> tuple[list, int]:
    """`parse_line` of each non-blank line; a malformed line raises, or is counted with `skip`."""
    rows = []
    bad = 0
    for number, line in zip(numbers, lines):
        if not line.strip():
            continue
        try:
            rows.append(parse_line(line))
        except _Malformed as e:
            if not skip:
                raise bad_line(path, number, str(e), _SKIP_HINT) from None
            bad += 1
    return rows, bad


def _is_utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _review_rows(path: str, numbers: list[int], lines: list[bytes], skip: bool) -> tuple[np.ndarray, int]:
    """[n, 4] bytes (reviewerID, asin, overall, unixReviewTime) of the lines, and the bad-line count."""
    text = b"\n".join(lines)
    rows = _REVIEW_LINE.findall(text)
    bad = 0
    if len(rows) < len(lines) or not _is_utf8(text):  # some line needs the json.loads path
        rows, bad = _parse_lines(path, numbers, lines, skip, _review_fields)
    return np.array(rows, dtype=bytes).reshape(len(rows), 4), bad


def _review_fields(line: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(reviewerID, asin, overall, unixReviewTime) of one review line, as bytes."""
    match = _REVIEW_LINE.match(line)
    if match and _is_utf8(line):
        return match.groups()
    return _review_fields_from_json(line)


def _review_fields_from_json(line: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """`_review_fields` by `json.loads`, for any layout; says what is wrong with a bad line."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise _Malformed(f"not a valid JSON line ({e})") from None
    if not isinstance(record, dict):
        raise _Malformed("not a JSON object")
    rating = record.get("overall")
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        raise _Malformed(f"'overall' is {rating!r}, not a number")
    seconds = record.get("unixReviewTime")
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not float(seconds).is_integer() or not -2**62 < seconds < 2**62):
        raise _Malformed(f"'unixReviewTime' is {seconds!r}, not an integer number of seconds")
    return (_token(record, "reviewerID"), _token(record, "asin"),
            repr(float(rating)).encode(), str(int(seconds)).encode())


def _token(record: dict, key: str) -> bytes:
    """The non-empty string `record[key]` as UTF-8, checked to fit a tab-separated line."""
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{key!r} is missing or not a non-empty string")
    return _checked(value, key)


def _checked(value: str, what: str) -> bytes:
    """`value` as UTF-8; control characters (tab, newline, \\x02) cannot go into the outputs."""
    if _CONTROL.search(value):
        raise _Malformed(f"{what} {value!r} contains a control character (tab, newline, \\x02, ...)")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed(f"{what} {value!r} is not valid unicode") from None


def _review_columns(table: np.ndarray) -> _Reviews:
    """Column arrays of the [N, 4] parsed review fields, ids factorized to int codes."""
    uid_tokens, uid = np.unique(table[:, 0], return_inverse=True)
    item_tokens, item = np.unique(table[:, 1], return_inverse=True)
    return _Reviews(uid=uid.astype(np.int64), item=item.astype(np.int64),
                    rating=table[:, 2].astype(np.float64), time=table[:, 3].astype(np.int64),
                    uid_tokens=uid_tokens.astype(object), item_tokens=item_tokens.astype(object))


def _meta_rows(path: str, numbers: list[int], lines: list[bytes], skip: bool) -> tuple[list, int]:
    """(asin, category or None) per meta line, and the bad-line count."""
    return _parse_lines(path, numbers, lines, skip, _meta_fields)


def _meta_fields(line: bytes) -> tuple[bytes, bytes | None]:
    """(asin, last element of the first category path or None) of one meta line."""
    match = _META_LINE.fullmatch(line)
    if match and _is_utf8(line):
        leaf = _FIRST_PATH_LEAF.match(match.group(2))
        return match.group(1), _python_string(leaf.group(1)) if leaf else None
    return _meta_fields_from_literal(line)


def _meta_fields_from_literal(line: bytes) -> tuple[bytes, bytes | None]:
    """`_meta_fields` by `json.loads` or `ast.literal_eval`; says what is wrong with a bad line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("not UTF-8 text") from None
    try:
        record = json.loads(text)
    except ValueError:
        try:
            record = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise _Malformed("neither JSON nor a Python literal") from None
    if not isinstance(record, dict):
        raise _Malformed("not a dict")
    return _token(record, "asin"), _first_path_leaf(record.get("categories"))


def _python_string(literal: bytes) -> bytes | None:
    """The value of one Python string literal as UTF-8 (None when empty)."""
    if literal[:1] in (b"'", b'"') and b"\\" not in literal:
        value = literal[1:-1].decode("utf-8")
    else:
        try:
            value = ast.literal_eval(literal.decode("utf-8"))
        except (ValueError, SyntaxError):
            raise _Malformed(f"bad string literal {literal!r} in 'categories'") from None
    return _checked(value, "category") if value else None


def _first_path_leaf(categories: object) -> bytes | None:
    """`categories[0][-1]` as UTF-8, or None when there is no category."""
    if categories is None:
        return None
    if not isinstance(categories, list) or not all(isinstance(path, list) for path in categories):
        raise _Malformed("'categories' is not a list of category paths (lists of strings)")
    if not categories or not categories[0]:
        return None
    leaf = categories[0][-1]
    if not isinstance(leaf, str):
        raise _Malformed(f"category {leaf!r} is not a string")
    return _checked(leaf, "category") if leaf else None


# ---------------------------------------------------------------------------------------------
# Samples


def _first_categories(meta_rows: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes | None]:
    """asin -> category of its first meta line (later duplicates are ignored, as in the original)."""
    categories: dict[bytes, bytes | None] = {}
    for asin, category in meta_rows:
        categories.setdefault(asin, category)
    return categories


def _item_categories(item_tokens: np.ndarray, categories: dict[bytes, bytes | None]):
    """Category code of every item ([I] int64) and the category tokens ([C] object)."""
    default = DEFAULT_CAT.encode()
    names = np.array([categories.get(item) or default for item in item_tokens], dtype=object)
    cat_tokens, item_cat = np.unique(names, return_inverse=True)
    return item_cat.astype(np.int64), cat_tokens


def _pairs(path: str, data: _Reviews, negative_rng: np.random.Generator,
           split_rng: np.random.Generator, test_fraction: float) -> _Pairs:
    """Each multi-review user's last review with a drawn negative, its history and its split."""
    order, users, counts = _timelines(data.uid, data.time)
    items = data.item[order]  # every user's reviews, oldest first, users by first review
    ends = np.cumsum(counts)
    is_last = np.zeros(len(items), dtype=bool)
    is_last[ends - 1] = True
    kept = counts >= 2
    positive = items[ends - 1][kept]
    if len(positive) and len(data.item_tokens) == 1:
        raise bad_file(path, "every review is of the same item, so no negative item can be drawn",
                       "use a review file with at least two items")
    return _Pairs(uid=users[kept], negative=_draw_negatives(data.item, positive, negative_rng),
                  positive=positive, history=items[~is_last], history_length=counts[kept] - 1,
                  test=split_rng.random(len(positive)) < test_fraction)


def _timelines(uid: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Review order by (user's first review, time, file position); user codes and counts in that order."""
    _, first = np.unique(uid, return_index=True)
    users = np.argsort(first)  # user codes by first review
    rank = np.empty_like(users)
    rank[users] = np.arange(len(users))
    order = np.lexsort((np.arange(len(uid)), seconds, rank[uid]))
    return order, users, np.bincount(uid, minlength=len(users))[users]


def _draw_negatives(item_list: np.ndarray, positive: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per positive, an item drawn uniformly from `item_list`, re-drawn while equal to the positive."""
    negative = item_list[rng.integers(0, len(item_list), size=len(positive))]
    redraw = np.flatnonzero(negative == positive)
    while len(redraw):
        negative[redraw] = item_list[rng.integers(0, len(item_list), size=len(redraw))]
        redraw = redraw[negative[redraw] == positive[redraw]]
    return negative


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The index ranges [start, start + length) of every run, concatenated."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum(), dtype=np.int64)


def _history_starts(pairs: _Pairs) -> np.ndarray:
    """Where each pair's history begins in `pairs.history`."""
    return np.cumsum(pairs.history_length) - pairs.history_length


def _sample_lines(pairs: _Pairs, chosen: np.ndarray, uid_tokens: np.ndarray, item_tokens: np.ndarray,
                  item_cat: np.ndarray, cat_tokens: np.ndarray) -> bytes:
    """The chosen pairs as DIEN sample lines: negative line, then positive line."""
    lengths = pairs.history_length[chosen]
    history = pairs.history[_runs(_history_starts(pairs)[chosen], lengths)]
    hist_mids = _joined_runs(item_tokens[history], lengths)
    hist_cats = _joined_runs(cat_tokens[item_cat[history]], lengths)
    targets = np.stack([pairs.negative[chosen], pairs.positive[chosen]], axis=1).ravel()  # [2K]
    labels = np.tile(np.array([b"0", b"1"], dtype=object), len(chosen))
    return _tsv([labels, np.repeat(uid_tokens[pairs.uid[chosen]], 2), item_tokens[targets],
                 cat_tokens[item_cat[targets]], np.repeat(hist_mids, 2), np.repeat(hist_cats, 2)])


def _joined_runs(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Consecutive runs of `lengths` tokens, each joined by the history separator ([K] object)."""
    flat = tokens.tolist()
    ends = np.cumsum(lengths).tolist()
    starts = (np.cumsum(lengths) - lengths).tolist()
    joined = np.empty(len(ends), dtype=object)
    joined[:] = [HISTORY_SEPARATOR.join(flat[a:b]) for a, b in zip(starts, ends)]
    return joined


def _tsv(columns: list[np.ndarray]) -> bytes:
    """Tab-separated, '\\n'-terminated lines from equally long arrays of bytes."""
    line = b"\t".join([b"%b"] * len(columns)) + b"\n"
    return b"".join([line % row for row in zip(*[column.tolist() for column in columns])])


# ---------------------------------------------------------------------------------------------
# Vocabularies


def _vocabularies(pairs: _Pairs, n_users: int, item_cat: np.ndarray, n_cats: int) -> tuple[np.ndarray, ...]:
    """uid, mid and cat codes in vocabulary order, counted on the train pairs."""
    train = np.flatnonzero(~pairs.test)
    lengths = pairs.history_length[train]
    history = pairs.history[_runs(_history_starts(pairs)[train], lengths)]
    # Item codes in the order the train file shows them; a pair's history is shown twice, but only
    # its first showing (the negative line) can be a first appearance.
    blocks = np.cumsum(lengths + 2) - (lengths + 2)
    shown = np.empty(len(history) + 2 * len(train), dtype=np.int64)
    shown[blocks] = pairs.negative[train]
    shown[_runs(blocks + 1, lengths)] = history
    shown[blocks + lengths + 1] = pairs.positive[train]
    n_items = len(item_cat)
    mid_counts = np.bincount(shown, minlength=n_items) + np.bincount(history, minlength=n_items)
    cat_counts = np.bincount(item_cat[shown], minlength=n_cats) + np.bincount(item_cat[history], minlength=n_cats)
    uid = pairs.uid[train]
    return (_frequency_order(uid, 2 * np.bincount(uid, minlength=n_users)),
            _frequency_order(shown, mid_counts), _frequency_order(item_cat[shown], cat_counts))


def _frequency_order(shown: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The codes in `shown`, most frequent first, ties broken by first appearance."""
    present, first = np.unique(shown, return_index=True)
    return present[np.lexsort((first, -counts[present]))]


def _vocabulary(tokens: Iterable[bytes], default: str | None) -> dict[str, int]:
    """token -> id in the given order; `default` (if any) keeps id 0 even if it occurs in `tokens`."""
    names = [token.decode("utf-8") for token in tokens]
    head = [default] if default is not None else []
    return {name: i for i, name in enumerate(head + [n for n in names if n != default])}


# ---------------------------------------------------------------------------------------------
# Writing


def _write_outputs(out_dir: str, data: _Reviews, pairs: _Pairs, item_cat: np.ndarray,
                   cat_tokens: np.ndarray, meta_rows: list[tuple[bytes, bytes | None]]) -> None:
    """Writes every output file to `out_dir`, each atomically."""
    tokens = (data.uid_tokens, data.item_tokens, item_cat, cat_tokens)
    _write(out_dir, TRAIN_FILE, _sample_lines(pairs, np.flatnonzero(~pairs.test), *tokens))
    _write(out_dir, TEST_FILE, _sample_lines(pairs, np.flatnonzero(pairs.test), *tokens))
    uid_order, mid_order, cat_order = _vocabularies(pairs, len(data.uid_tokens), item_cat, len(cat_tokens))
    for name, vocabulary in (("uid_voc", _vocabulary(data.uid_tokens[uid_order], None)),
                             ("mid_voc", _vocabulary(data.item_tokens[mid_order], DEFAULT_MID)),
                             ("cat_voc", _vocabulary(cat_tokens[cat_order], DEFAULT_CAT))):
        _write(out_dir, f"{name}.pkl", pickle.dumps(vocabulary, protocol=4))
        _write(out_dir, f"{name}.txt", "".join(f"{token}\n" for token in vocabulary).encode("utf-8"))
    _write(out_dir, "reviews-info", _reviews_info(data))
    _write(out_dir, "item-info", _item_info(meta_rows))


def _reviews_info(data: _Reviews) -> bytes:
    """`uid\\tasin\\trating\\ttime` for every review in file order; ratings written like 4.0."""
    ratings, rating_code = np.unique(data.rating, return_inverse=True)
    rating_text = np.array([repr(float(r)).encode() for r in ratings], dtype=object)
    return _tsv([data.uid_tokens[data.uid], data.item_tokens[data.item], rating_text[rating_code],
                 data.time.astype(bytes).astype(object)])


def _item_info(meta_rows: list[tuple[bytes, bytes | None]]) -> bytes:
    """`asin\\tcategory` for every meta line in file order (default_cat when it has none)."""
    default = DEFAULT_CAT.encode()
    return b"".join(b"%b\t%b\n" % (asin, category or default) for asin, category in meta_rows)


def _write(out_dir: str, name: str, data: bytes) -> None:
    """Writes `data` to `out_dir/name` atomically."""
    with atomic_write(os.path.join(out_dir, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    """The CLI flags; defined only when run as a program, so importing `prepare` defines none."""
    flags.DEFINE_string("reviews", None, "reviews_<Category>[_5].json[.gz] file.", required=True)
    flags.DEFINE_string("meta", None, "meta_<Category>.json[.gz] file; without it every item gets default_cat.")
    flags.DEFINE_string("out_dir", None, "Directory for the sample files and vocabularies.", required=True)
    flags.DEFINE_integer("seed", 3, "Seed of the negative sampling and the train/test split.")
    flags.DEFINE_float("test_fraction", 0.1, "Probability that a user's pair goes to the test file.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_enum("on_bad_line", "error", ["error", "skip"],
                      "On a malformed line: stop with an error, or count and skip it.")


def _summary(stats: PrepareStats) -> str:
    """A two-column table of the counts."""
    cells = [(field.name, _cell(getattr(stats, field.name))) for field in dataclasses.fields(stats)]
    width = max(len(name) for name, _ in cells)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in cells)


def _cell(value: int | float | tuple[str, ...]) -> str:
    """One value of the summary table."""
    if isinstance(value, tuple):
        return ", ".join(value) or "-"
    return f"{value:.2f}" if isinstance(value, float) else f"{value:,}"


def main(argv: list[str]) -> None:
    """Prepares one category and prints the counts; a DataError is one line on stderr, status 1."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    args = flags.FLAGS
    try:
        stats = prepare(args.reviews, args.meta, args.out_dir, seed=args.seed,
                        test_fraction=args.test_fraction, on_bad_line=args.on_bad_line)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(_summary(stats))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
