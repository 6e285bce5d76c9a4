"""Every-event samples, stored as per-user sequences plus sample pointers: O(events), not O(events x history).

DIEN's preparation (`--samples last_event`, the default) makes one (negative, positive) pair per user.
`--samples every_event` makes a pair of every positive after a user's first, as production CTR logs do:

1. Each user's positives are ordered by time, stably (file order on equal times).
2. Every positive with at least one earlier positive yields a positive sample whose history is ALL the
   user's earlier positives, oldest first, and a negative sample with the same history whose item is
   drawn uniformly from the list of all positives' items (so popularity-weighted), re-drawn while it
   equals the positive item (DIEN's rule, per event). The negative comes first, as in DIEN's files.
3. Split: by user (a user's samples all go to test with probability `test_fraction`), or with
   `split_time` T by time (samples whose positive is at or after unix time T go to test; their
   history still holds every earlier positive, from before T too).
4. Vocabularies are counted on the train samples as if they were written as DIEN lines (each target
   once, each history entry once per sample that shows it), most frequent first, `default_mid` /
   `default_cat` at id 0, ties broken by code order (first appearance in the raw file).

Storage, in the prepared directory beside the vocabularies (all numpy `.npy`, read memory-mapped):
- `events.json`: {"format": "din_events", "version", "samples": "every_event", "history_keep": "last",
  "users", "events", "train_samples", "test_samples", "split"}.
- The sequences, users in order of their first positive, each user's positives oldest first:
  `events_seq_offsets.npy` int64 [U+1] (user u's positives are rows offsets[u]:offsets[u+1]),
  `events_seq_mid.npy` int32 [E] item codes, `events_seq_cat.npy` int32 [E] category codes,
  `events_seq_time.npy` int64 [E] unix times.
- The samples of each split (`train`, `test`), in (user, time) order, negative then positive:
  `events_<split>_user.npy` int32 [N] user index, `events_<split>_position.npy` int32 [N] the target's
  position in its user's sequence (= the history length: the history is the user's first `position`
  positives), `events_<split>_label.npy` int8 [N], `events_<split>_mid.npy` / `_cat.npy` int32 [N]
  candidate item and category codes.
- `events_{uid,mid,cat}_tokens.txt`: the token of each code, one a line (code = 0-based line number).
Bytes: 24 per event + 17 per sample, against ~2 x 50 history tokens per line for DIEN text.

Loading (`load_columns`, through `dien.load_split`) maps codes to vocabulary ids once, a chunk at a
time, into `.npy` columns of the `dien` cache; the sample pointers become the EncodedSplit's
(hist_start, hist_lengths) into the one shared encoded sequence, so batches slice histories out of it
and nothing is loaded into RAM. Every-event histories are long (a user's whole past), and the newest
positives predict the next click best, so `history_keep` defaults to 'last' for this format (the
manifest records it); DeepRec's 'first' stays the default for DIEN files, where it is their parity.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import pickle
import shutil
from typing import IO, Callable, Iterable, Iterator

import numpy as np

from input_pipeline import mapped
from input_pipeline.errors import bad_file
from input_pipeline.textio import atomic_files

SAMPLES = ("last_event", "every_event")
MANIFEST = "events.json"
FORMAT = "din_events"
VERSION = 1
HISTORY_KEEP = "last"
SPLITS = ("train", "test")
SAMPLE_COLUMNS = {"user": np.int32, "position": np.int32, "label": np.int8, "mid": np.int32, "cat": np.int32}
SEQUENCE_COLUMNS = {"offsets": np.int64, "mid": np.int32, "cat": np.int32, "time": np.int64}
TOKEN_KINDS = ("uid", "mid", "cat")
DEFAULT_MID = "default_mid"
DEFAULT_CAT = "default_cat"

_CHUNK = 1 << 22  # events (or samples) per chunk of the writers and the loader's encoding


def check_options(samples: str, test_fraction: float, split_time: int | None) -> None:
    """Raises ValueError (one line, naming the flag) for a bad --samples, --test_fraction or --split_time."""
    if samples not in SAMPLES:
        raise ValueError(f"--samples must be one of {', '.join(SAMPLES)}, not {samples!r}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], not {test_fraction}")
    if split_time is not None and (isinstance(split_time, bool) or not isinstance(split_time, (int, np.integer))):
        raise ValueError(f"--split_time must be an integer unix time, not {split_time!r}")


# ---------------------------------------------------------------------------------------------
# Timelines and negatives (both sample modes)


def chunks(n: int) -> Iterator[slice]:
    """Slices of _CHUNK rows covering range(n): loops over them keep int64/float64 temporaries small."""
    return (slice(begin, min(begin + _CHUNK, n)) for begin in range(0, n, _CHUNK))


def first_positions(codes: np.ndarray, n: int) -> np.ndarray:
    """Where each of the codes 0..n-1 first occurs in `codes` (len(codes) if it does not), [n] int64."""
    first = np.full(n, len(codes), np.int64)
    for rows in chunks(len(codes)):
        np.minimum.at(first, codes[rows], np.arange(rows.start, rows.stop))
    return first


def timelines(uid: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Event order by (user's first event, time, file position); user codes and counts in that order."""
    n_users = int(uid.max()) + 1 if len(uid) else 0
    users = np.argsort(first_positions(uid, n_users))  # user codes by first event
    rank = np.empty_like(users)
    rank[users] = np.arange(len(users))
    earliest = int(seconds.min()) if len(seconds) else 0
    bits = (int(seconds.max()) - earliest).bit_length() if len(seconds) else 0
    if bits + len(users).bit_length() > 62:
        return np.lexsort((seconds, rank[uid])), users, np.bincount(uid, minlength=n_users)[users]
    key = np.empty(len(uid), np.int64)  # one stable sort of a combined key is ~2x faster than lexsort
    for rows in chunks(len(uid)):
        key[rows] = (rank[uid[rows]] << bits) | (seconds[rows].astype(np.int64) - earliest)
    return np.argsort(key, kind="stable"), users, np.bincount(uid, minlength=n_users)[users]


def draw_negatives(item_list: np.ndarray, positive: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per positive, an item drawn uniformly from `item_list`, re-drawn while equal to the positive.

    The first draws are made a chunk at a time (the same stream as one call): their int64 indices stay small.
    """
    negative = np.empty(len(positive), item_list.dtype)
    for rows in chunks(len(positive)):
        negative[rows] = item_list[rng.integers(0, len(item_list), size=rows.stop - rows.start)]
    redraw = np.flatnonzero(negative == positive)
    while len(redraw):
        negative[redraw] = item_list[rng.integers(0, len(item_list), size=len(redraw))]
        redraw = redraw[negative[redraw] == positive[redraw]]
    return negative


def test_flags(rng: np.random.Generator, count: int, test_fraction: float, times: np.ndarray | None,
               split_time: int | None, path: str) -> np.ndarray:
    """Per unit (pair, or user), whether it goes to test: time >= split_time, else a draw < test_fraction."""
    if split_time is None:
        return rng.random(count) < test_fraction
    test = times >= split_time
    if len(times) and test.all():
        raise bad_file(path, f"every sample's event is at or after --split_time={split_time} (the earliest is "
                             f"{int(times.min())}), so the train split would be empty", "choose a later --split_time")
    if not test.any():
        latest = f"the latest is {int(times.max())}" if len(times) else "there are none"
        raise bad_file(path, f"no sample's event is at or after --split_time={split_time} ({latest})",
                       "choose an earlier --split_time")
    return test


def vocabulary(tokens: Iterable[bytes], default: str | None) -> dict[str, int]:
    """token -> id in the given order; `default` (if any) keeps id 0 even if it occurs in `tokens`."""
    vocab = {} if default is None else {default: 0}
    for token in tokens:
        vocab.setdefault(token.decode("utf-8"), len(vocab))
    return vocab


def write_vocabularies(create: Callable[[str], IO[bytes]], uid: Iterable[bytes], mid: Iterable[bytes],
                       cat: Iterable[bytes]) -> None:
    """`{uid,mid,cat}_voc.pkl` (dict, pickle protocol 4) and `.txt` (one token a line) of tokens in id order."""
    for name, vocab in (("uid_voc", vocabulary(uid, None)), ("mid_voc", vocabulary(mid, DEFAULT_MID)),
                        ("cat_voc", vocabulary(cat, DEFAULT_CAT))):
        create(f"{name}.pkl").write(pickle.dumps(vocab, protocol=4))
        create(f"{name}.txt").write("".join(f"{token}\n" for token in vocab).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Preparation


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Every user's positives, users by first positive, oldest first; codes into the token lists."""

    offsets: np.ndarray  # [U+1] int64
    mid: np.ndarray  # [E] int32
    cat: np.ndarray  # [E] int32
    time: np.ndarray  # [E] int64
    user: np.ndarray  # [E] int32 user index of each event (not stored: the offsets say it)
    position: np.ndarray  # [E] int32 position in its user's sequence = history length (not stored)
    uid_codes: np.ndarray  # [U] the input's user code of each user index


@dataclasses.dataclass(frozen=True)
class EventStats:
    """What an every-event preparation kept; a pair is a (negative, positive) sample pair."""

    users: int
    dropped_users: int  # users with a single positive (no sample)
    train_pairs: int
    test_pairs: int


def sequences(uid: np.ndarray, item: np.ndarray, seconds: np.ndarray, item_cat: np.ndarray) -> Sequences:
    """Each user's positives in time order, as one concatenated sequence."""
    order, users, counts = timelines(uid, seconds)
    offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    mid = item[order].astype(np.int32, copy=False)
    time = seconds[order]
    del order
    user = np.repeat(np.arange(len(users), dtype=np.int32), counts)
    position = np.empty(len(mid), np.int32)
    for rows in chunks(len(mid)):
        position[rows] = np.arange(rows.start, rows.stop) - offsets[user[rows]]
    return Sequences(offsets=offsets, mid=mid, cat=item_cat.astype(np.int32)[mid], time=time, user=user,
                     position=position, uid_codes=users)


def prepare(out_dir: str, path: str, uid: np.ndarray, item: np.ndarray, seconds: np.ndarray, item_cat: np.ndarray,
            tokens: dict[str, np.ndarray], *, seed: int, test_fraction: float, split_time: int | None,
            check_train: Callable[[int, int], None]) -> EventStats:
    """Writes the every-event storage and vocabularies of a click log (codes into `tokens`) to `out_dir`.

    uid, item, seconds: [N] per positive, in file order; item_cat: [I] category code per item code;
    `tokens` maps 'uid', 'mid', 'cat' to object arrays of bytes; `check_train(train_pairs, test_pairs)`
    raises when the train split would be empty, before anything is written.
    """
    seq = sequences(uid, item, seconds, item_cat)
    sampled = seq.position > 0
    if len(tokens["mid"]) == 1 and sampled.any():
        raise bad_file(path, "every positive is of the same item, so no negative item can be drawn",
                       "use a log with at least two items")
    negative_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if split_time is None:
        test = test_flags(split_rng, len(seq.uid_codes), test_fraction, None, None, path)[seq.user]
    else:
        test = _scatter(sampled, test_flags(split_rng, 0, 0.0, seq.time[sampled], split_time, path))
    pairs = {"train": int((sampled & ~test).sum()), "test": int((sampled & test).sum())}
    check_train(pairs["train"], pairs["test"])
    negative = np.zeros(len(seq.mid), np.int32)  # drawn for every sampled event, in event order
    negative[sampled] = draw_negatives(item, seq.mid[sampled], negative_rng)
    uid_order, mid_order, cat_order = _vocabulary_orders(seq, negative, sampled & ~test, item_cat)
    stats = EventStats(users=len(seq.uid_codes), dropped_users=int((np.diff(seq.offsets) < 2).sum()),
                       train_pairs=pairs["train"], test_pairs=pairs["test"])
    with atomic_files(out_dir) as create:
        _write_manifest(create, seq, pairs, split_time)
        for name in SEQUENCE_COLUMNS:
            column = getattr(seq, name)
            write_column(create(f"events_seq_{name}.npy"), (column[rows] for rows in chunks(len(column))),
                         SEQUENCE_COLUMNS[name], len(column))
        for split, chosen in (("train", sampled & ~test), ("test", sampled & test)):
            _write_samples(create, split, seq, negative, item_cat, chosen, pairs[split])
        for kind, names in (("uid", tokens["uid"][seq.uid_codes]), ("mid", tokens["mid"]), ("cat", tokens["cat"])):
            create(f"events_{kind}_tokens.txt").write(b"".join(token + b"\n" for token in names))
        uid_tokens = tokens["uid"][seq.uid_codes[uid_order]]
        del seq, negative, sampled, test  # the vocabularies' dicts need the room
        write_vocabularies(create, uid_tokens, tokens["mid"][mid_order], tokens["cat"][cat_order])
    remove_last_event_files(out_dir)
    return stats


def _scatter(where: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A bool array shaped like `where`, holding `values` at its True positions."""
    out = np.zeros(len(where), bool)
    out[where] = values
    return out


def _vocabulary_orders(seq: Sequences, negative: np.ndarray, train: np.ndarray,
                       item_cat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User indices, item codes and category codes in vocabulary order, counted on the train samples as lines.

    A train pair is two lines: the user twice, each target once, each history entry twice.
    """
    later = np.cumsum(train[::-1], dtype=_count_dtype(len(train)))[::-1]
    later -= train  # train pairs after each event, overall
    later_at_end = later[seq.offsets[1:] - 1]  # [U] train pairs after each user's last event
    n_items, n_cats = len(item_cat), int(item_cat.max(initial=-1)) + 1
    mid_counts, user_counts = np.zeros(n_items), np.zeros(len(seq.uid_codes), np.int64)
    for rows in chunks(len(seq.mid)):  # in chunks: bincount's indices are int64, its weights float64
        target = train[rows]
        shows = 2 * (later[rows] - later_at_end[seq.user[rows]])  # the user's train lines showing the event
        mid_counts += np.bincount(seq.mid[rows], weights=shows + target, minlength=n_items)
        mid_counts += np.bincount(negative[rows][target], minlength=n_items)
        user_counts += np.bincount(seq.user[rows][target], minlength=len(seq.uid_codes))
    del later
    cat_counts = np.bincount(item_cat, weights=mid_counts, minlength=n_cats)
    return _by_count(user_counts), _by_count(mid_counts), _by_count(cat_counts)


def _count_dtype(n: int) -> type:
    """The narrowest of int32 / int64 that holds counts up to `n`."""
    return np.int32 if n < 2**31 else np.int64


def _by_count(counts: np.ndarray) -> np.ndarray:
    """The codes with a positive count, most frequent first, ties by code."""
    present = np.flatnonzero(counts > 0)
    return present[np.lexsort((present, -counts[present]))]


def _write_manifest(create: Callable[[str], IO[bytes]], seq: Sequences, pairs: dict[str, int],
                    split_time: int | None) -> None:
    """events.json: the format, its sample mode, its history_keep default and its sizes."""
    manifest = {"format": FORMAT, "version": VERSION, "samples": "every_event", "history_keep": HISTORY_KEEP,
                "users": len(seq.uid_codes), "events": len(seq.mid),
                "train_samples": 2 * pairs["train"], "test_samples": 2 * pairs["test"],
                "split": "by_user" if split_time is None else f"time>={split_time}"}
    create(MANIFEST).write(json.dumps(manifest, indent=1).encode("utf-8"))


def _write_samples(create: Callable[[str], IO[bytes]], split: str, seq: Sequences, negative: np.ndarray,
                   item_cat: np.ndarray, chosen: np.ndarray, count: int) -> None:
    """One split's sample columns: per chosen event (`count` of them) a negative then a positive row, a chunk
    of events at a time."""
    events = lambda: (np.flatnonzero(chosen[rows]) + rows.start for rows in chunks(len(chosen)))  # noqa: E731
    columns = {
        "user": lambda e: np.repeat(seq.user[e], 2),
        "position": lambda e: np.repeat(seq.position[e], 2),
        "label": lambda e: np.tile(np.array([0, 1], np.int8), len(e)),
        "mid": lambda e: np.stack([negative[e], seq.mid[e]], axis=1).ravel(),
        "cat": lambda e: np.stack([item_cat[negative[e]], seq.cat[e]], axis=1).ravel(),
    }
    for name, rows in columns.items():
        write_column(create(f"events_{split}_{name}.npy"), map(rows, events()), SAMPLE_COLUMNS[name], 2 * count)


def write_column(f: IO[bytes], parts: Iterable[np.ndarray], dtype, length: int | None = None) -> None:
    """A 1-d .npy column written part by part: `length` rows in all (the one part's when None)."""
    parts = list(parts) if length is None else parts
    length = len(parts[0]) if length is None else length
    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": (length,)})
    for chunk in parts:
        f.write(np.ascontiguousarray(chunk, dtype).tobytes())


def storage_files(data_dir: str) -> list[str]:
    """Every file of the every-event storage in `data_dir` (those present)."""
    names = [MANIFEST] + [f"events_seq_{name}.npy" for name in SEQUENCE_COLUMNS]
    names += [f"events_{split}_{name}.npy" for split in SPLITS for name in SAMPLE_COLUMNS]
    names += [f"events_{kind}_tokens.txt" for kind in TOKEN_KINDS]
    return [os.path.join(data_dir, name) for name in names if os.path.isfile(os.path.join(data_dir, name))]


def remove_last_event_files(data_dir: str) -> None:
    """Deletes the DIEN sample files and info files a last-event preparation left: they are stale now."""
    for name in ("local_train_splitByUser", "local_test_splitByUser", "reviews-info", "item-info"):
        for path in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".parquet")):
            if os.path.isfile(path):
                os.remove(path)


def remove_storage(data_dir: str) -> None:
    """Deletes an every-event storage from `data_dir`: a last-event preparation replaced it."""
    for path in storage_files(data_dir):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# Reading


def is_events_dir(data_dir: str | os.PathLike) -> bool:
    """Whether `data_dir` holds an every-event storage (its events.json)."""
    return os.path.isfile(os.path.join(os.fspath(data_dir), MANIFEST))


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """events.json of `data_dir`, checked to be this format and version."""
    path = os.path.join(os.fspath(data_dir), MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise bad_file(path, f"unreadable ({e})", "prepare the directory again with --samples every_event") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise bad_file(path, f"not a {FORMAT} version {VERSION} manifest",
                       "prepare the directory again with --samples every_event")
    return manifest


def open_column(data_dir: str | os.PathLike, name: str) -> np.ndarray:
    """One stored column (`seq_mid`, `train_position`, ...), memory-mapped."""
    path = os.path.join(os.fspath(data_dir), f"events_{name}.npy")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise bad_file(path, f"unreadable ({e})", "prepare the directory again with --samples every_event") from None


def read_tokens(data_dir: str | os.PathLike, kind: str) -> list[str]:
    """The token of every code of `kind` ('uid', 'mid', 'cat')."""
    path = os.path.join(os.fspath(data_dir), f"events_{kind}_tokens.txt")
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8").split("\n")[:-1]
    except (OSError, UnicodeDecodeError) as e:
        raise bad_file(path, f"unreadable ({e})", "prepare the directory again with --samples every_event") from None


def load_columns(data_dir: str | os.PathLike, split: str, vocabs: dict[str, dict[str, int]],
                 cache_dir: str) -> dict[str, np.ndarray]:
    """The EncodedSplit columns of `split`: codes mapped to `vocabs` ids, cached in `cache_dir` (memory-mapped).

    The split's `position` (= history length) and `user` columns are the stored files themselves; the
    encoded sequence is shared by both splits' histories (hist_start points into it).
    """
    read_manifest(data_dir)
    ids = {kind: np.fromiter(map(vocabs[kind].get, read_tokens(data_dir, kind), itertools.repeat(0)), np.int32)
           for kind in TOKEN_KINDS}
    column = functools.partial(open_column, data_dir)
    offsets, user, position = column("seq_offsets"), column(f"{split}_user"), column(f"{split}_position")
    if len(column(f"{split}_label")) == 0:
        raise bad_file(os.path.join(os.fspath(data_dir), f"events_{split}_label.npy"), "the split has 0 samples",
                       "prepare again with more users or another --test_fraction / --split_time")
    encoded = _cached(os.path.join(cache_dir, "events_seq"), {
        "hist_mids": (np.int32, _mapped(ids["mid"], column("seq_mid"))),
        "hist_cats": (np.int32, _mapped(ids["cat"], column("seq_cat")))})
    encoded |= _cached(os.path.join(cache_dir, f"events_{split}"), {
        "label": (np.float32, _mapped(None, column(f"{split}_label"))),
        "uid": (np.int32, _mapped(ids["uid"], user)),
        "mid": (np.int32, _mapped(ids["mid"], column(f"{split}_mid"))),
        "cat": (np.int32, _mapped(ids["cat"], column(f"{split}_cat"))),
        "hist_start": (np.int64, _mapped(offsets, user))})
    mapped.release_pages(offsets)  # read at random while building the cache
    return {**encoded, "hist_lengths": position, "user": user}


def _mapped(table: np.ndarray | None, codes: np.ndarray) -> tuple[int, Callable[[], Iterator[np.ndarray]]]:
    """(rows, chunks of table[codes]) read a chunk at a time, the pages of `codes` released after each
    (input_pipeline.mapped); table None: the codes as they are."""
    return len(codes), lambda: (part if table is None else table[part] for part in mapped.chunks(codes))


def _cached(directory: str, columns: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Columns (name -> (dtype, (rows, chunks))) as .npy files in `directory`, memory-mapped; built once.

    The caller keys `directory` by the sources; an unwritable cache keeps the columns in memory.
    """
    if not os.path.isdir(directory):
        tmp = f"{directory}.tmp-{os.getpid()}"
        try:
            os.makedirs(tmp, exist_ok=True)
            for name, (dtype, (rows, parts)) in columns.items():
                with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
                    write_column(f, parts(), dtype, rows)
            os.rename(tmp, directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(directory):
                return {name: np.concatenate(list(parts()) or [np.zeros(0, dtype)]).astype(dtype)
                        for name, (dtype, (_, parts)) in columns.items()}
    return {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r") for name in columns}
