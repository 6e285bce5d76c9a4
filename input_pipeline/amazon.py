"""Amazon (McAuley 2014) review and meta files -> DIEN sample files and vocabularies.

This is the data preparation of DIEN / DeepRec (`process_data.py` -> `local_aggretor.py` ->
`split_by_user.py` -> `generate_voc.py`), re-done with numpy / Arrow and a seed:

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

Outputs in `out_dir`: `local_train_splitByUser`, `local_test_splitByUser`
(`label\\tuid\\tmid\\tcat\\thist_mids\\thist_cats`, history entries joined by b'\\x02'), or with
`format='parquet'` the same samples as `local_{train,test}_splitByUser.parquet` (columns label int8;
uid, mid, cat string; hist_mids, hist_cats list<string>); `{uid,mid,cat}_voc.pkl` (dict str -> int,
pickle protocol 4) and `.txt` (one token a line, id = line number, as DeepRec's pick2txt.py writes
them), `reviews-info` (`uid\\tasin\\trating\\ttime` for every review, in file order) and `item-info`
(`asin\\tcategory` for every meta line, in file order). They are written to temporary files and
renamed into place together at the end, so an error leaves the directory as it was; sample files
of the other format from an earlier preparation are removed then, since they would not match the
new vocabularies. A preparation that would leave the train file empty (too little or truncated input,
or every pair drawn for test) is such an error, as training cannot use it; an empty test file is not
(the CLI warns about it, and about a truncated file read with `on_bad_line='skip'`).

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

What a line must be. A review line is one JSON object with non-empty string `reviewerID` and
`asin` (valid UTF-8, no control characters such as tab or \\x02), a finite number `overall` and an
integer `unixReviewTime`; its other fields must be valid JSON but are not decoded (so bad UTF-8
inside `reviewText` does not matter). A meta line is a dict literal whose `asin` is such a string;
its category is `categories[0][-1]` when `categories` is a list of lists of strings.
Fast paths: review blocks are parsed by pyarrow's JSON reader into just those four columns, and a
block with anything unusual (a failed check, a blank line, two objects on a line) is parsed again
line by line with `json.loads`, which decides and names the line. A meta line that starts with
`{'asin': '...', `, ends with `}`, holds `, 'categories': ` exactly once and whose categories are
plain string literals is read by RE2 regular expressions, without parsing its other values (a
syntax error inside them goes unnoticed; and were that one `'categories'` inside a double-quoted
string of a line without real categories, it would be taken for them - no McAuley file has such
lines); every other meta line is parsed with `json.loads` / `ast.literal_eval`.

Speed and memory. Files are streamed in blocks of about 4 MB of whole lines (`textio.line_blocks`):
a thread per file reads and decompresses ahead while the previous block is parsed, and the meta
file is parsed on a thread of its own alongside the reviews. zlib, pyarrow's JSON parser and RE2
run without the GIL, so both cores stay busy and no line becomes a Python object; inflating the
review file (~300 MB/s) is the floor. What stays in memory grows with the number of reviews, not
with the bytes of a line: per review its uid and asin bytes (Arrow buffers until they are
factorized into codes at the end of the file), time and rating; per meta line its asin and
category; afterwards codes, the timelines and one chunk of output rows at a time (sample and info
files are written in chunks by Arrow kernels, the info files on a second thread). Measured peak:
1.5 GB for Books' 8.9M reviews and 2.3M meta lines, whether the review lines are 240 or 980 bytes
long, and 2.4 GB for 20M reviews (120-170 bytes per review); so a file much larger than memory
prepares as long as those columns fit. Books takes about a minute on 2 cores
(`benchmarks/prepare.py`).
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
import threading
import time
from typing import IO, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import tqdm
from absl import app, flags

from input_pipeline import cli, events
from input_pipeline.errors import DataError, bad_file, bad_line
from input_pipeline.events import (DEFAULT_CAT, draw_negatives, first_positions, test_flags, timelines,
                                   write_vocabularies)
from input_pipeline.textio import LineBlock, atomic_files, line_blocks, open_lines

TRAIN_FILE = "local_train_splitByUser"
TEST_FILE = "local_test_splitByUser"
PARQUET_SUFFIX = ".parquet"
FORMATS = ("text", "parquet")
HISTORY_SEPARATOR = b"\x02"
SAMPLE_SCHEMA = pa.schema([("label", pa.int8()), ("uid", pa.string()), ("mid", pa.string()), ("cat", pa.string()),
                           ("hist_mids", pa.list_(pa.string())), ("hist_cats", pa.list_(pa.string()))])

_BATCH_LINES = 1 << 16  # lines per batch of the line-by-line readers (`_read`, used by movielens and taobao)
_BLOCK_BYTES = 4 << 20  # bytes of whole lines per block of the Amazon readers
_WRITE_ROWS = 1 << 16  # rows (or pairs) per chunk of the writers
_SKIP_HINT = "fix or delete the line, or rerun with --on_bad_line=skip to count and skip bad lines"

# The four review fields, as pyarrow's JSON reader converts them; other keys are skipped unconverted.
_REVIEW_SCHEMA = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()), ("overall", pa.float64()),
                            ("unixReviewTime", pa.int64())])
_REVIEW_PARSE = pa_json.ParseOptions(explicit_schema=_REVIEW_SCHEMA, unexpected_field_behavior="ignore")

# RE2 patterns (pyarrow.compute) for meta lines as Python 2 printed them; a line still ends in '\n'.
_RE2_STRING = r"""u?(?:'[^'\\\x00-\x1f]*'|"[^"\\\x00-\x1f]*")"""  # a string literal without escapes
_RE2_PATH = r"\[(?:" + _RE2_STRING + r"(?:, " + _RE2_STRING + r")*)?\]"
_META_ASIN = r"^\{'asin': '(?P<asin>[^'\\\x00-\x1f]+)', "
_META_CATEGORIES_KEY = ", 'categories': "
_META_CATEGORIES = (_META_CATEGORIES_KEY + r"(?P<paths>\[(?:" + _RE2_PATH + r"(?:, " + _RE2_PATH + r")*)?\])"
                    r"(?:, '|\}\r?\n?$)")
_META_END = r"\}\r?\n?$"
_META_LEAF = r"""^\[\[(?:""" + _RE2_STRING + r""", )*u?(?:'(?P<single>[^']*)'|"(?P<double>[^"]*)")\]"""
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
    truncated: tuple[str, ...]  # files whose gzip stream ended early, as '<path> (after line <n>)' (on_bad_line='skip')
    seconds: float


class _Malformed(ValueError):
    """A line that cannot be used; the message says what is wrong with it."""


def checked_fields(line: bytes, separator: bytes, spec: tuple[tuple[str, bytes, str], ...],
                   layout: str) -> tuple[bytes, ...]:
    """The fields of a delimited line, each matched against its (name, regex, description) in `spec`."""
    fields = line.split(separator)
    if len(fields) != len(spec):
        raise _Malformed(f"has {len(fields)} fields, not {len(spec)} ({layout})")
    for field, (name, pattern, kind) in zip(fields, spec):
        if not re.fullmatch(pattern, field):
            raise _Malformed(f"{name} {field.decode('latin-1')!r} is not {kind}")
    return tuple(fields)


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
class _ItemInfo:
    """(asin, category) of every meta line used, in file order; category null when it has none."""

    asin: pa.Array  # [M] binary
    category: pa.Array  # [M] binary, nullable


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """One (negative, positive) pair per kept user, users in order of their first review."""

    uid: np.ndarray  # [K] user codes
    negative: np.ndarray  # [K] item codes
    positive: np.ndarray  # [K] item codes
    history: np.ndarray  # [sum(history_length)] item codes, pair after pair, oldest first
    history_length: np.ndarray  # [K]
    test: np.ndarray  # [K] bool


def prepare(reviews: str, meta: str | None, out_dir: str, *, seed: int = 3, test_fraction: float = 0.1,
            on_bad_line: str = "error", format: str = "text", progress: bool = False, samples: str = "last_event",
            split_time: int | None = None) -> PrepareStats:
    """Writes the DIEN sample files (or with samples='every_event' the `events` storage), vocabularies and
    info files for one category to `out_dir`.

    `progress` shows a bar per stage on stderr when it is a terminal; `split_time` splits by time
    (samples whose positive is at or after it go to test) instead of by user.
    """
    check_options(on_bad_line, test_fraction, samples, split_time, format)
    start = time.perf_counter()
    for path in (reviews, meta) if meta else (reviews,):
        with open_lines(path):  # a wrong path fails now, not after a long parse
            pass
    skip = on_bad_line == "skip"
    data, bad_reviews, bad_meta, info, truncated = _read_both(reviews, meta, skip, progress)
    if not len(data.uid):
        problem = f"has no usable review lines ({bad_reviews} bad lines skipped)" if bad_reviews else "has no reviews"
        raise bad_file(reviews, problem, "pass a reviews_<Category>.json[.gz] file with one JSON review a line")
    item_cat, cat_tokens = _item_categories(data.item_tokens, _reviewed_categories(data.item_tokens, info))
    train_pairs, test_pairs, dropped_users = write_samples(
        reviews, out_dir, data, item_cat, cat_tokens, info, samples=samples, seed=seed, test_fraction=test_fraction,
        split_time=split_time, bad_lines=bad_reviews + bad_meta, truncated=truncated, format=format, progress=progress)
    return PrepareStats(
        reviews=len(data.uid), users=len(data.uid_tokens), items=len(data.item_tokens),
        train_pairs=train_pairs, test_pairs=test_pairs, dropped_users=dropped_users,
        items_without_meta=int((cat_tokens[item_cat] == DEFAULT_CAT.encode()).sum()),
        meta_items=len(info.asin), bad_review_lines=bad_reviews, bad_meta_lines=bad_meta,
        truncated=truncated, seconds=time.perf_counter() - start)


def check_options(on_bad_line: str, test_fraction: float, samples: str, split_time: int | None,
                  format: str = "text") -> None:
    """Raises ValueError, one line naming the option, for an option no preparation accepts."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', not {on_bad_line!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    events.check_options(samples, test_fraction, split_time)
    if samples == "every_event" and format != "text":
        raise ValueError(f"--format {format} chooses the DIEN sample files of --samples last_event; every_event "
                         "samples are stored as events_*.npy columns (drop --format)")


def write_samples(path: str, out_dir: str, data: _Reviews, item_cat: np.ndarray, cat_tokens: np.ndarray,
                  item_info, *, samples: str, seed: int, test_fraction: float, split_time: int | None, bad_lines: int,
                  truncated: tuple[str, ...], format: str = "text", progress: bool = False) -> tuple[int, int, int]:
    """Draws and writes the samples of either mode and the vocabularies: (train pairs, test pairs, dropped users).

    Errors (an empty train split, ...) are raised before anything is written.
    """
    if samples == "every_event":
        stats = events.prepare(out_dir, path, data.uid, data.item, data.time, item_cat,
                               {"uid": data.uid_tokens, "mid": data.item_tokens, "cat": cat_tokens}, seed=seed,
                               test_fraction=test_fraction, split_time=split_time,
                               check_train=lambda train, test: _check_train_split(path, train, test, bad_lines,
                                                                                  truncated))
        return stats.train_pairs, stats.test_pairs, stats.dropped_users
    negative_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    pairs = _pairs(path, data, negative_rng, split_rng, test_fraction, split_time)
    train_pairs, test_pairs = int((~pairs.test).sum()), int(pairs.test.sum())
    _check_train_split(path, train_pairs, test_pairs, bad_lines, truncated)
    _write_outputs(out_dir, data, pairs, item_cat, cat_tokens, item_info, format=format, progress=progress)
    return train_pairs, test_pairs, len(data.uid_tokens) - len(pairs.uid)


# ---------------------------------------------------------------------------------------------
# Reading Amazon files


def _read_both(reviews: str, meta: str | None, skip: bool,
               progress: bool) -> tuple[_Reviews, int, int, _ItemInfo, tuple[str, ...]]:
    """Reads the review file here and the meta file on a second thread; the first error stops both."""
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meta") as pool:
        meta_read = pool.submit(_read_meta, meta, skip, progress, stop) if meta else None
        try:
            data, bad_reviews, truncated = _read_reviews(reviews, skip, progress, stop, meta_read)
            info, bad_meta, meta_truncated = meta_read.result() if meta_read else (_item_info_of([]), 0, ())
        finally:
            stop.set()
    return data, bad_reviews, bad_meta, info, truncated + meta_truncated


class _Stopped(Exception):
    """The other file's reader failed; this one stops without a result."""


def _blocks(path: str, skip: bool, stop: threading.Event) -> Iterator[LineBlock | str]:
    """The file's line blocks; with `skip`, an unreadable rest of the stream ends them with its `_truncation`."""
    lines_read = 0
    with line_blocks(path, _BLOCK_BYTES) as blocks:
        try:
            for block in blocks:
                if stop.is_set():
                    raise _Stopped
                lines_read = block.first_line + block.lines - 1
                yield block
        except DataError:
            if not skip:
                raise
            yield _truncation(path, lines_read)


def _truncation(path: str, lines: int) -> str:
    """A file whose gzip stream broke off after `lines` whole lines, as PrepareStats.truncated names it."""
    return f"{path} (after line {lines})"


def _bar(path: str, progress: bool, position: int) -> tqdm.tqdm:
    """A progress bar over the bytes of `path` (compressed, if it is); off unless `progress` and a terminal."""
    return tqdm.tqdm(total=os.path.getsize(path), desc=os.path.basename(path), unit="B", unit_scale=True,
                     unit_divisor=1024, position=position, leave=True, disable=None if progress else True)


def _read_reviews(path: str, skip: bool, progress: bool, stop: threading.Event,
                  meta_read: concurrent.futures.Future | None) -> tuple[_Reviews, int, tuple[str, ...]]:
    """Review columns of `path`, the bad-line count and the truncated file (if skipped)."""
    uid, item, rating, seconds = [], [], [], []
    bad = read = 0
    truncated: tuple[str, ...] = ()
    with _bar(path, progress, 0) as bar, contextlib.closing(_blocks(path, skip, stop)) as blocks:
        for block in blocks:
            if meta_read is not None and meta_read.done() and meta_read.exception() is not None:
                raise meta_read.exception()
            if isinstance(block, str):
                truncated = (block,)
                continue
            columns, block_bad = _review_block(path, block, skip)
            for part, column in zip((uid, item, rating, seconds), columns):
                part.append(column)
            bad += block_bad
            read += len(columns[2])
            bar.update(block.position - bar.n)
            bar.set_postfix(reviews=f"{read:,}", refresh=False)
    return _review_codes(uid, item, rating, seconds), bad, truncated


def _review_codes(uid: list[pa.Array], item: list[pa.Array], rating: list[np.ndarray],
                  seconds: list[np.ndarray]) -> _Reviews:
    """The review columns with uid and asin factorized into codes (tokens in order of first appearance)."""
    uid_codes, uid_tokens = _factorize(uid)
    item_codes, item_tokens = _factorize(item)
    return _Reviews(uid=uid_codes, item=item_codes, rating=np.concatenate(rating or [np.zeros(0)]),
                    time=np.concatenate(seconds or [np.zeros(0, np.int64)]), uid_tokens=uid_tokens,
                    item_tokens=item_tokens)


def _factorize(parts: list[pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """int64 codes of the values of `parts` into their distinct values ([U] object bytes), first seen first."""
    encoded = pa.chunked_array(parts, pa.binary()).dictionary_encode()
    if not encoded.num_chunks:
        return np.zeros(0, np.int64), np.zeros(0, object)
    codes = np.concatenate([chunk.indices.to_numpy() for chunk in encoded.chunks]).astype(np.int64)
    return codes, encoded.chunk(0).dictionary.to_numpy(zero_copy_only=False)


def _review_block(path: str, block: LineBlock, skip: bool) -> tuple[tuple, int]:
    """(uid, asin, rating, time) columns of a block's reviews, and its bad-line count."""
    try:
        table = pa_json.read_json(pa.py_buffer(block.data), parse_options=_REVIEW_PARSE,
                                  read_options=pa_json.ReadOptions(use_threads=False,
                                                                   block_size=len(block.data) + 1))
    except pa.ArrowInvalid:
        table = None
    columns = _checked_review_columns(table) if table is not None and table.num_rows == block.lines else None
    if columns is not None:
        return columns, 0
    rows, bad = _parse_lines(path, range(block.first_line, block.first_line + block.lines),
                             _split_lines(block.data), skip, _review_fields_from_json)
    uid, asin, rating, seconds = zip(*rows) if rows else ((), (), (), ())
    return (pa.array(uid, pa.binary()), pa.array(asin, pa.binary()), np.array(rating, np.float64),
            np.array(seconds, np.int64)), bad


def _checked_review_columns(table: pa.Table) -> tuple | None:
    """The table's four columns if every row passes the checks `_review_fields_from_json` makes, else None."""
    uid, asin = (table.column(name).combine_chunks() for name in ("reviewerID", "asin"))
    rating, seconds = (table.column(name).to_numpy() for name in ("overall", "unixReviewTime"))
    if (table.column("overall").null_count or table.column("unixReviewTime").null_count
            or not np.isfinite(rating).all() or not ((seconds > -2**62) & (seconds < 2**62)).all()):
        return None
    if not (_clean_tokens(uid) and _clean_tokens(asin)):
        return None
    return uid.view(pa.binary()), asin.view(pa.binary()), rating, seconds


def _clean_tokens(tokens: pa.Array) -> bool:
    """Whether every value is present, non-empty, valid UTF-8 and free of control characters."""
    if tokens.null_count:
        return False
    try:
        tokens.cast(pa.string()).validate(full=True)
    except pa.ArrowInvalid:
        return False
    offsets = np.frombuffer(tokens.buffers()[1], np.int32)[tokens.offset:tokens.offset + len(tokens) + 1]
    if len(tokens) and np.diff(offsets).min() <= 0:
        return False
    values = np.frombuffer(tokens.buffers()[2] or b"", np.uint8)[offsets[0]:offsets[-1]]
    return bool((values >= 0x20).all())


def _split_lines(data: bytes) -> list[bytes]:
    """The lines of a block, without their '\\n'."""
    lines = data.split(b"\n")
    return lines[:-1] if data.endswith(b"\n") else lines


def _review_fields_from_json(line: bytes) -> tuple[bytes, bytes, float, int]:
    """(reviewerID, asin, overall, unixReviewTime) of one review line by `json.loads`; says what is wrong."""
    try:
        record = json.loads(line.decode("utf-8", "surrogateescape"))  # bad UTF-8 only matters in the ids
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
    return _token(record, "reviewerID"), _token(record, "asin"), float(rating), int(seconds)


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


def _read_meta(path: str, skip: bool, progress: bool, stop: threading.Event) -> tuple[_ItemInfo, int, tuple[str, ...]]:
    """(asin, category) of every usable meta line, the bad-line count and the truncated file (if skipped)."""
    asin, category = [], []
    bad = 0
    truncated: tuple[str, ...] = ()
    with _bar(path, progress, 1) as bar, contextlib.closing(_blocks(path, skip, stop)) as blocks:
        for block in blocks:
            if isinstance(block, str):
                truncated = (block,)
                continue
            block_asin, block_category, block_bad = _meta_block(path, block, skip)
            asin.append(block_asin)
            category.append(block_category)
            bad += block_bad
            bar.update(block.position - bar.n)
    return _ItemInfo(pa.chunked_array(asin, pa.binary()).combine_chunks(),
                     pa.chunked_array(category, pa.binary()).combine_chunks()), bad, truncated


def _meta_block(path: str, block: LineBlock, skip: bool) -> tuple[pa.Array, pa.Array, int]:
    """asin and category (null when none) of a block's meta lines, in line order, and its bad-line count."""
    lines = _lines_array(block.data)
    head = pc.extract_regex(lines, _META_ASIN)
    paths = pc.extract_regex(lines, _META_CATEGORIES)
    fast = pc.and_(pc.and_(head.is_valid(), paths.is_valid()), pc.match_substring_regex(lines, _META_END))
    # The key must occur once in a line. Each matched line holds it at least once, so if the block holds it
    # no more often than that, every line does (bytes.count is ~4x faster than counting line by line).
    if block.data.count(_META_CATEGORIES_KEY.encode()) != pc.sum(paths.is_valid()).as_py():
        fast = pc.and_(fast, pc.equal(pc.count_substring(lines, _META_CATEGORIES_KEY), 1))
    leaf = pc.extract_regex(paths.field("paths"), _META_LEAF)
    single, double = leaf.field("single"), leaf.field("double")
    category = pc.if_else(pc.greater(pc.binary_length(single), 0), single, double)
    category = pc.if_else(pc.equal(pc.binary_length(category), 0), pa.scalar(None, pa.binary()), category)
    asin = head.field("asin")
    fast = pc.fill_null(fast, False).to_numpy(zero_copy_only=False) & _utf8_rows(asin) & _utf8_rows(category)
    slow = np.flatnonzero(~fast)
    if not len(slow):
        return asin, category, 0
    offsets = np.frombuffer(lines.buffers()[1], np.int32)
    parsed, bad = _parse_numbered(path, (block.first_line + slow).tolist(),
                                  [block.data[offsets[i]:offsets[i + 1]].rstrip(b"\r\n") for i in slow.tolist()],
                                  skip, _meta_fields_from_literal)
    # Blank and skipped lines are gone; the others go back among the fast ones, in line order.
    position = np.concatenate([np.flatnonzero(fast), np.array([n for n, _ in parsed], np.int64) - block.first_line])
    order = np.argsort(position, kind="stable")
    return (pa.concat_arrays([asin.filter(fast), pa.array([row[0] for _, row in parsed], pa.binary())]).take(order),
            pa.concat_arrays([category.filter(fast), pa.array([row[1] for _, row in parsed], pa.binary())]).take(order),
            bad)


def _lines_array(data: bytes) -> pa.Array:
    """The lines of a block as an Arrow binary array over the same bytes; each keeps its '\\n'."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(data))
    offsets = np.zeros(len(ends) + 1, np.int32)
    offsets[1:] = ends
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _utf8_rows(values: pa.Array) -> np.ndarray:
    """Per row, whether the value is null or valid UTF-8."""
    try:
        values.cast(pa.string())
        return np.ones(len(values), bool)
    except pa.ArrowInvalid:
        return np.array([value is None or _decodes(value) for value in values.to_pylist()], bool)


def _decodes(value: bytes) -> bool:
    """Whether `value` is valid UTF-8."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _meta_fields_from_literal(line: bytes) -> tuple[bytes, bytes | None]:
    """(asin, `categories[0][-1]` or None) of one meta line, by `json.loads` or `ast.literal_eval`."""
    text = line.decode("utf-8", "surrogateescape")  # bad UTF-8 only matters in the asin and category
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


def _item_info_of(rows: Iterable[tuple[bytes, bytes | None]]) -> _ItemInfo:
    """An _ItemInfo of (asin, category or None) rows."""
    rows = list(rows)
    return _ItemInfo(pa.array([asin for asin, _ in rows], pa.binary()),
                     pa.array([category for _, category in rows], pa.binary()))


def _reviewed_categories(item_tokens: np.ndarray, info: _ItemInfo) -> dict[bytes, bytes]:
    """item -> category of its first meta line, for the reviewed items that have one."""
    first = pc.index_in(pa.array(item_tokens, pa.binary()), value_set=info.asin)
    categories = info.category.take(first).to_pylist()
    return {item: category for item, category in zip(item_tokens.tolist(), categories) if category}


# ---------------------------------------------------------------------------------------------
# Reading line by line (MovieLens and Taobao files, which are small)


def _read(path: str, skip: bool, parse_batch) -> tuple[list, int, tuple[str, ...]]:
    """`parse_batch` results over `path`'s non-empty lines, the bad-line count and truncated files."""
    parts: list = []
    bad = 0
    truncated: tuple[str, ...] = ()
    for batch in _line_batches(path, skip):
        if isinstance(batch, str):
            truncated = (batch,)
            continue
        rows, batch_bad = parse_batch(path, *batch, skip)
        parts.append(rows)
        bad += batch_bad
    return parts, bad, truncated


def _line_batches(path: str, skip: bool) -> Iterator[tuple[list[int], list[bytes]] | str]:
    """(line numbers, lines) of non-empty lines in batches; a final `_truncation` marks a skipped truncation."""
    numbers: list[int] = []
    lines: list[bytes] = []
    number = 0
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
            yield _truncation(path, number)
            return
    yield numbers, lines


def _parse_lines(path: str, numbers: Iterable[int], lines: list[bytes], skip: bool,
                 parse_line) -> tuple[list, int]:
    """`parse_line` of each non-blank line; a malformed line raises, or is counted with `skip`."""
    parsed, bad = _parse_numbered(path, numbers, lines, skip, parse_line)
    return [row for _, row in parsed], bad


def _parse_numbered(path: str, numbers: Iterable[int], lines: list[bytes], skip: bool,
                    parse_line) -> tuple[list[tuple[int, object]], int]:
    """(line number, `parse_line(line)`) of each non-blank line, and the count of skipped bad lines."""
    parsed = []
    bad = 0
    for number, line in zip(numbers, lines):
        if not line.strip():
            continue
        try:
            parsed.append((number, parse_line(line)))
        except _Malformed as e:
            if not skip:
                raise bad_line(path, number, str(e), _SKIP_HINT) from None
            bad += 1
    return parsed, bad


def _review_columns(table: np.ndarray) -> _Reviews:
    """Column arrays of [N, 4] parsed fields (user, item, rating, time as bytes), ids factorized to codes."""
    uid_tokens, uid = np.unique(table[:, 0], return_inverse=True)
    item_tokens, item = np.unique(table[:, 1], return_inverse=True)
    return _Reviews(uid=uid.astype(np.int64), item=item.astype(np.int64),
                    rating=table[:, 2].astype(np.float64), time=table[:, 3].astype(np.int64),
                    uid_tokens=uid_tokens.astype(object), item_tokens=item_tokens.astype(object))


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


def _pairs(path: str, data: _Reviews, negative_rng: np.random.Generator, split_rng: np.random.Generator,
           test_fraction: float, split_time: int | None = None) -> _Pairs:
    """Each multi-review user's last review with a drawn negative, its history and its split."""
    order, users, counts = timelines(data.uid, data.time)
    items = data.item[order]  # every user's reviews, oldest first, users by first review
    ends = np.cumsum(counts)
    is_last = np.zeros(len(items), dtype=bool)
    is_last[ends - 1] = True
    kept = counts >= 2
    positive = items[ends - 1][kept]
    if len(positive) and len(data.item_tokens) == 1:
        raise bad_file(path, "every review is of the same item, so no negative item can be drawn",
                       "use a review file with at least two items")
    return _Pairs(uid=users[kept], negative=draw_negatives(data.item, positive, negative_rng),
                  positive=positive, history=items[~is_last], history_length=counts[kept] - 1,
                  test=test_flags(split_rng, len(positive), test_fraction, data.time[order[ends - 1][kept]],
                                  split_time, path))


def _check_train_split(path: str, train: int, test: int, bad_lines: int, truncated: tuple[str, ...]) -> None:
    """Raises a DataError, before anything is written, when no pair went to the train split (training needs one)."""
    if train:
        return
    if truncated:
        fix = f"the input is truncated at {', '.join(truncated)}: fetch it again, or use more data"
    elif test:
        fix = f"all {test} pairs went to the test split: use more data, or a lower --test_fraction"
    else:
        fix = ("the input is too small: every user has a single (positive) line, so no pair has a history - "
               "use more data")
    raise bad_file(path, f"no train pairs ({cli.counts(train, test, bad_lines)})", fix)


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The index ranges [start, start + length) of every run, concatenated."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum(), dtype=np.int64)


def _history_starts(pairs: _Pairs) -> np.ndarray:
    """Where each pair's history begins in `pairs.history`."""
    return np.cumsum(pairs.history_length) - pairs.history_length


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
    first = first_positions(shown, len(counts))
    present = np.flatnonzero(first < len(shown))
    return present[np.lexsort((first[present], -counts[present]))]


# ---------------------------------------------------------------------------------------------
# Writing


def _write_outputs(out_dir: str, data: _Reviews, pairs: _Pairs, item_cat: np.ndarray, cat_tokens: np.ndarray,
                   item_info: _ItemInfo | Iterable[tuple[bytes, bytes | None]], *, format: str = "text",
                   progress: bool = False) -> None:
    """Writes every output file to `out_dir`; they replace the old ones together when all are written.

    `item_info` is an _ItemInfo or (asin, category or None) rows; `format` is 'text' or 'parquet'
    for the sample files (sample files of the other format are removed, as they are stale).
    """
    if not isinstance(item_info, _ItemInfo):
        item_info = _item_info_of(item_info)
    uid_tokens, item_tokens, cat_strings = (_strings(t) for t in (data.uid_tokens, data.item_tokens, cat_tokens))
    rows = len(pairs.uid) + len(data.uid) + len(item_info.asin)
    with (tqdm.tqdm(total=rows, desc="writing", unit=" rows", unit_scale=True, disable=None if progress else True)
          as bar, atomic_files(out_dir) as create, concurrent.futures.ThreadPoolExecutor(1) as pool):
        # The info files are written on a second thread; Arrow's kernels run without the GIL.
        info_files = pool.submit(_write_info_files, create, data, uid_tokens, item_tokens, item_info, bar)
        for name, chosen in ((TRAIN_FILE, np.flatnonzero(~pairs.test)), (TEST_FILE, np.flatnonzero(pairs.test))):
            tables = _sample_tables(pairs, chosen, uid_tokens, item_tokens, item_cat, cat_strings)
            if format == "parquet":
                _write_parquet(create(name + PARQUET_SUFFIX), tables, bar)
            else:
                _write_chunks(create(name), ((_sample_text(table), table.num_rows // 2) for table in tables), bar)
        uid_order, mid_order, cat_order = _vocabularies(pairs, len(data.uid_tokens), item_cat, len(cat_tokens))
        write_vocabularies(create, data.uid_tokens[uid_order], data.item_tokens[mid_order], cat_tokens[cat_order])
        info_files.result()
    events.remove_storage(out_dir)
    stale = "" if format == "parquet" else PARQUET_SUFFIX
    for name in (TRAIN_FILE, TEST_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name + stale))


def _strings(tokens: np.ndarray) -> pa.Array:
    """An object array of UTF-8 bytes as an Arrow string array."""
    return pa.array(tokens, pa.binary()).cast(pa.string())


def _sample_tables(pairs: _Pairs, chosen: np.ndarray, uid_tokens: pa.Array, item_tokens: pa.Array,
                   item_cat: np.ndarray, cat_tokens: pa.Array) -> Iterator[pa.Table]:
    """The chosen pairs as sample rows (negative, then positive), a chunk of pairs at a time."""
    starts = _history_starts(pairs)
    for begin in range(0, len(chosen), _WRITE_ROWS):
        part = chosen[begin:begin + _WRITE_ROWS]
        lengths = pairs.history_length[part]
        history = pairs.history[_runs(starts[part], lengths)]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        line_pair = np.repeat(np.arange(len(part)), 2)  # both lines of a pair share uid and history
        targets = np.stack([pairs.negative[part], pairs.positive[part]], axis=1).ravel()
        yield pa.table([
            pa.array(np.tile(np.array([0, 1], np.int8), len(part))),
            uid_tokens.take(pairs.uid[part][line_pair]),
            item_tokens.take(targets),
            cat_tokens.take(item_cat[targets]),
            pa.ListArray.from_arrays(offsets, item_tokens.take(history)).take(line_pair),
            pa.ListArray.from_arrays(offsets, cat_tokens.take(item_cat[history])).take(line_pair),
        ], schema=SAMPLE_SCHEMA)
    if not len(chosen):
        yield SAMPLE_SCHEMA.empty_table()


def _sample_text(table: pa.Table) -> memoryview:
    """Sample rows as DIEN lines: tab-separated fields, history entries joined by \\x02."""
    separator = HISTORY_SEPARATOR.decode()
    return _tsv([pc.cast(table["label"], pa.string()), table["uid"], table["mid"], table["cat"],
                 pc.binary_join(table["hist_mids"], separator), pc.binary_join(table["hist_cats"], separator)])


def _tsv(columns: list) -> memoryview:
    """Tab-separated, '\\n'-terminated lines of equally long Arrow string columns, as one buffer."""
    last = pc.binary_join_element_wise(columns[-1], "", "\n")
    lines = pc.binary_join_element_wise(*columns[:-1], last, "\t") if len(columns) > 1 else last
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    if not len(lines):
        return memoryview(b"")
    offsets = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset:lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]]


def _write_chunks(f: IO[bytes], chunks: Iterable[tuple[memoryview, int]], bar: tqdm.tqdm) -> None:
    """Writes (data, rows) chunks to `f`, counting the rows on `bar`."""
    for data, rows in chunks:
        f.write(data)
        bar.update(rows)


def _write_parquet(f: IO[bytes], tables: Iterable[pa.Table], bar: tqdm.tqdm) -> None:
    """Writes sample tables to `f` as one Parquet file, a row group per table, counting pairs on `bar`."""
    with pq.ParquetWriter(f, SAMPLE_SCHEMA) as writer:
        for table in tables:
            writer.write_table(table)
            bar.update(table.num_rows // 2)


def _write_info_files(create, data: _Reviews, uid_tokens: pa.Array, item_tokens: pa.Array, item_info: _ItemInfo,
                      bar: tqdm.tqdm) -> None:
    """Writes reviews-info and item-info."""
    _write_chunks(create("reviews-info"), _reviews_info(data, uid_tokens, item_tokens), bar)
    _write_chunks(create("item-info"), _item_info(item_info), bar)


def _reviews_info(data: _Reviews, uid_tokens: pa.Array, item_tokens: pa.Array) -> Iterator[tuple[memoryview, int]]:
    """`uid\\tasin\\trating\\ttime` for every review in file order, in chunks; ratings written like 4.0."""
    ratings = pc.dictionary_encode(pa.array(data.rating, pa.float64()))
    rating_text = pa.array([repr(rating) for rating in ratings.dictionary.to_pylist()], pa.string())
    rating_code = ratings.indices.to_numpy()
    for begin in range(0, len(data.uid), _WRITE_ROWS):
        rows = slice(begin, begin + _WRITE_ROWS)
        yield _tsv([uid_tokens.take(data.uid[rows]), item_tokens.take(data.item[rows]),
                    rating_text.take(rating_code[rows]), pa.array(data.time[rows]).cast(pa.string())]), \
            len(data.uid[rows])


def _item_info(info: _ItemInfo) -> Iterator[tuple[memoryview, int]]:
    """`asin\\tcategory` for every meta line in file order (default_cat when it has none), in chunks."""
    for begin in range(0, len(info.asin), _WRITE_ROWS):
        asin = info.asin.slice(begin, _WRITE_ROWS).cast(pa.string())
        category = pc.fill_null(info.category.slice(begin, _WRITE_ROWS).cast(pa.string()), DEFAULT_CAT)
        yield _tsv([asin, category]), len(asin)


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    """The CLI flags; defined only when run as a program, so importing `prepare` defines none."""
    flags.DEFINE_string("reviews", None, "reviews_<Category>[_5].json[.gz] file.", required=True)
    flags.DEFINE_string("meta", None, "meta_<Category>.json[.gz] file; without it every item gets default_cat.")
    cli.define_common_flags()
    flags.DEFINE_enum("format", "text", list(FORMATS),
                      "Sample files as DIEN text lines, or as Parquet (local_*_splitByUser.parquet).")
    flags.DEFINE_boolean("progress", True, "Show a progress bar per stage (only when stderr is a terminal).")


def main(argv: list[str]) -> None:
    """Prepares one category and prints the counts; a DataError is one line on stderr, status 1."""
    cli.run(argv, lambda args: prepare(args.reviews, args.meta, args.out_dir, seed=args.seed,
                                       test_fraction=args.test_fraction, on_bad_line=args.on_bad_line,
                                       format=args.format, progress=args.progress, samples=args.samples,
                                       split_time=args.split_time))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
