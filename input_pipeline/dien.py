"""DIEN sample files + vocabularies -> encoded numpy columns, cached on disk.

A sample file (`local_train_splitByUser`, `local_test_splitByUser`) holds one example a line,
tab-separated `label uid mid cat hist_mids hist_cats`, history entries oldest first joined by
the byte \\x02. The same samples may instead be a Parquet file of the same name plus `.parquet`
(columns label integer 0/1; uid, mid, cat strings; hist_mids, hist_cats lists of strings), as
`python -m input_pipeline.amazon --format parquet` writes them; when a directory holds both, the
Parquet file is read (the preparation removes the other format's files, so both are present only
when put there by hand). Either encodes to the same arrays (Books' train split: 71 MB of Parquet
encoded in 5 s, 519 MB of text in 11 s, as each distinct Parquet token is looked up once).
Vocabularies `uid_voc`, `mid_voc`, `cat_voc` are `.txt` (one token a line, id = 0-based line
number) or pickled dicts str -> int (`.pkl` / `.pickle`, DIEN's format).
Unknown tokens map to id 0, as DeepRec (default_value=0) and DIEN's data iterator do.

Encoded columns are cached as one `.npy` per column under `<data_dir>/.din_cache/`, keyed by
the sample file, the vocabularies and FORMAT_VERSION, so later runs memory-map them.

A directory prepared with `--samples every_event` holds no sample files but the per-user sequences
and sample pointers of `input_pipeline.events` (its events.json marks it); `load_split` reads it
the same way into the same EncodedSplit, whose histories are then slices of one shared sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from itertools import repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from input_pipeline import events
from input_pipeline.errors import DataError, bad_file, bad_line
from input_pipeline.textio import read_bytes

TRAIN_FILE = "local_train_splitByUser"
TEST_FILE = "local_test_splitByUser"
SPLIT_FILES = {"train": TRAIN_FILE, "test": TEST_FILE}
PARQUET_SUFFIX = ".parquet"
VOCAB_NAMES = ("uid", "mid", "cat")
VOCAB_SUFFIXES = (".txt", ".pkl", ".pickle")
CACHE_DIR = ".din_cache"
FORMAT_VERSION = 2
COLUMNS = ("label", "uid", "mid", "cat", "hist_start", "hist_lengths", "hist_mids", "hist_cats", "user")
FIELDS = "label uid mid cat hist_mids hist_cats"
HISTORY_SEPARATOR = b"\x02"
HISTORY_CHUNK_LINES = 1 << 16
PREPARE_HINT = ("prepare the directory with `python -m input_pipeline.amazon` "
                "(or point --config.data_dir at a prepared directory)")

_LABELS = {b"0": 0.0, b"1": 1.0}


@dataclasses.dataclass(frozen=True)
class Vocabularies:
    """Token -> id tables for users, items and categories; unknown tokens map to 0."""

    uid: dict[str, int]
    mid: dict[str, int]
    cat: dict[str, int]
    # (path, size, mtime_ns, inode) of each source file; empty for vocabularies built in memory.
    sources: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def sizes(self) -> dict[str, int]:
        """Embedding table sizes: max id + 1 per vocabulary."""
        return {name: max(getattr(self, name).values(), default=0) + 1 for name in VOCAB_NAMES}

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies these tables for the cache: their source files, else their content."""
        if self.sources:
            return _digest(self.sources)
        return _digest([sorted(getattr(self, name).items()) for name in VOCAB_NAMES])


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """One split, encoded; each history a (start, length) slice of the hist_mids / hist_cats entries.

    A sample file's histories follow one another (hist_start is the running sum of hist_lengths); an
    every-event split's point into its users' sequences, which many examples share.
    """

    label: np.ndarray         # float32 [N]
    uid: np.ndarray           # int32 [N] vocabulary ids
    mid: np.ndarray           # int32 [N]
    cat: np.ndarray           # int32 [N]
    hist_start: np.ndarray    # int64 [N]; example i's history is hist_mids[hist_start[i]:][:hist_lengths[i]]
    hist_lengths: np.ndarray  # int32 [N]
    hist_mids: np.ndarray     # int32 [entries], each history oldest first
    hist_cats: np.ndarray     # int32 [entries]
    user: np.ndarray          # int32 [N] dense index of the raw uid string (GAUC groups)

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def from_offsets(cls, offsets: np.ndarray, **columns: np.ndarray) -> "EncodedSplit":
        """An EncodedSplit of consecutive histories: example i's is entries offsets[i]:offsets[i+1]."""
        offsets = np.asarray(offsets, np.int64)
        return cls(hist_start=offsets[:-1], hist_lengths=np.diff(offsets).astype(np.int32), **columns)


# ---------------------------------------------------------------------------------------------
# Vocabularies


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain containers and scalars only: every class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Token -> id from a `.txt` (id = 0-based line number) or a pickled dict (`.pkl`, `.pickle`)."""
    if os.fspath(path).endswith(".txt"):
        return _load_text_vocab(path)
    return _load_pickled_vocab(path)


def _load_text_vocab(path: str | os.PathLike) -> dict[str, int]:
    """One token a line; a repeated token is an error, as in TensorFlow's vocabulary files."""
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_file(path, f"not UTF-8 text ({e})", "write the vocabulary as UTF-8") from None
    tokens = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    vocab: dict[str, int] = {}
    for number, token in enumerate(tokens):
        if vocab.setdefault(token, number) != number:
            raise bad_line(path, number + 1, f"token {token!r} already has id {vocab[token]}",
                           "each token may appear once")
    if tokens == [""]:
        raise bad_file(path, "empty vocabulary", PREPARE_HINT)
    return vocab


def _load_pickled_vocab(path: str | os.PathLike) -> dict[str, int]:
    """A pickled dict str -> int, read without ever constructing an arbitrary object."""
    unpickler = _NoGlobalsUnpickler(io.BytesIO(read_bytes(path)), encoding="utf-8")
    try:
        vocab = unpickler.load()
    except Exception as e:  # A malformed pickle can fail in many ways; all mean the same to the user.
        raise bad_file(path, f"not a plain pickled dict ({type(e).__name__}: {e})",
                       "a vocabulary pickle may hold only a dict of str -> int") from None
    _check_vocab(path, vocab)
    return vocab


def _check_vocab(path: str | os.PathLike, vocab: object) -> None:
    """Raises a DataError unless `vocab` is a non-empty dict of str -> non-negative int."""
    fix = "a vocabulary pickle must hold a dict of str -> non-negative int"
    if not isinstance(vocab, dict):
        raise bad_file(path, f"holds a {type(vocab).__name__}, not a dict", fix)
    if not vocab:
        raise bad_file(path, "empty vocabulary", PREPARE_HINT)
    for token, index in vocab.items():
        if type(token) is not str or type(index) is not int or index < 0:
            raise bad_file(path, f"entry {token!r}: {index!r} is not str -> non-negative int", fix)


def find_vocab(data_dir: str | os.PathLike, name: str) -> str:
    """The path of vocabulary `name` ('uid', 'mid', 'cat'): `<name>_voc` + .txt, .pkl or .pickle."""
    stem = os.path.join(os.fspath(data_dir), f"{name}_voc")
    for suffix in VOCAB_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    raise bad_file(data_dir, f"no {name} vocabulary ({', '.join(f'{name}_voc{s}' for s in VOCAB_SUFFIXES)})",
                   PREPARE_HINT)


def load_vocabularies(data_dir: str | os.PathLike) -> Vocabularies:
    """The uid, mid and cat vocabularies of a prepared data directory."""
    paths = {name: find_vocab(data_dir, name) for name in VOCAB_NAMES}
    sources = tuple(_file_identity(paths[name]) for name in VOCAB_NAMES)
    return Vocabularies(**{name: load_vocab(path) for name, path in paths.items()}, sources=sources)


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_file(path: str | os.PathLike, vocabs: Vocabularies) -> EncodedSplit:
    """Parses and encodes one DIEN sample file, text or (named *.parquet) Parquet; no cache."""
    if os.fspath(path).endswith(PARQUET_SUFFIX):
        return _encode_parquet(path, vocabs)
    lines = _split_lines(read_bytes(path))
    if not lines:
        raise _empty_split(path, "the file is empty")
    _check_field_counts(path, lines)
    fields = b"\t".join(lines).split(b"\t")
    del lines
    labels = _parse_labels(path, fields[0::6])
    hist_mids, hist_cats = fields[4::6], fields[5::6]
    lengths = _history_lengths(path, hist_mids, hist_cats)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tables = {name: _byte_keys(getattr(vocabs, name)) for name in VOCAB_NAMES}
    uids = fields[1::6]
    return EncodedSplit.from_offsets(
        offsets,
        label=labels,
        uid=_lookup(uids, tables["uid"]),
        mid=_lookup(fields[2::6], tables["mid"]),
        cat=_lookup(fields[3::6], tables["cat"]),
        hist_mids=_lookup_histories(hist_mids, tables["mid"]),
        hist_cats=_lookup_histories(hist_cats, tables["cat"]),
        user=_lookup(uids, {u: i for i, u in enumerate(dict.fromkeys(uids))}),
    )


def _empty_split(path: str | os.PathLike, problem: str) -> DataError:
    """The DataError for a sample file that exists but holds no samples: a preparation kept no pairs for it."""
    name = os.path.basename(os.fspath(path)).removesuffix(PARQUET_SUFFIX)
    kept, more = {TRAIN_FILE: ("no train pairs", "more users (or a lower --test_fraction)"),
                  TEST_FILE: ("no test pairs", "more users (or a larger --test_fraction)")}.get(
        name, ("no pairs", "more users"))
    return bad_file(path, f"{problem} (0 samples)",
                    f"the preparation that wrote it kept {kept} - prepare again from complete raw files, "
                    f"or with {more}")


def _split_lines(text: bytes) -> list[bytes]:
    """Lines without '\\n' or '\\r\\n'; blank trailing lines dropped."""
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    text = text.rstrip(b"\r\n")
    return text.split(b"\n") if text else []


def _check_field_counts(path: str | os.PathLike, lines: list[bytes]) -> None:
    """Raises a DataError at the first line without exactly 6 tab-separated fields."""
    tabs = np.fromiter(map(bytes.count, lines, repeat(b"\t")), np.int64, len(lines))
    bad = np.flatnonzero(tabs != 5)
    if bad.size:
        i = int(bad[0])
        raise bad_line(path, i + 1, f"expected 6 tab-separated fields ({FIELDS}), found {tabs[i] + 1}",
                       PREPARE_HINT)


def _parse_labels(path: str | os.PathLike, column: list[bytes]) -> np.ndarray:
    """Labels as float32 [N]; '0'/'1' fast, other spellings of 0 or 1 ('1.0') accepted."""
    labels = list(map(_LABELS.get, column))
    if None in labels:
        for i, label in enumerate(labels):
            if label is None:
                labels[i] = _parse_label(path, i + 1, column[i])
    return np.array(labels, np.float32)


def _parse_label(path: str | os.PathLike, line_number: int, text: bytes) -> float:
    """A label spelled other than '0'/'1' that still means 0 or 1, else a DataError."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise bad_line(path, line_number, f"label {text.decode('utf-8', 'replace')!r} is not 0 or 1",
                       "the first field must be the click label")
    return value


def _history_lengths(path: str | os.PathLike, mids: list[bytes], cats: list[bytes]) -> np.ndarray:
    """Entries per history field, int64 [N]; hist_mids and hist_cats must agree line by line."""
    mid_lengths, cat_lengths = _count_entries(mids), _count_entries(cats)
    bad = np.flatnonzero(mid_lengths != cat_lengths)
    if bad.size:
        i = int(bad[0])
        raise bad_line(path, i + 1, f"hist_mids has {mid_lengths[i]} entries but hist_cats has {cat_lengths[i]}",
                       "each history item needs its category")
    return mid_lengths


def _count_entries(column: list[bytes]) -> np.ndarray:
    """Number of \\x02-separated entries in each field; an empty field has none."""
    separators = np.fromiter(map(bytes.count, column, repeat(HISTORY_SEPARATOR)), np.int64, len(column))
    nonempty = np.fromiter(map(len, column), np.int64, len(column)) > 0
    return separators + nonempty


def _lookup_histories(column: list[bytes], table: dict[bytes, int]) -> np.ndarray:
    """Ids of all history entries of a column in line order, int32; split a chunk at a time to bound memory."""
    return np.concatenate([_lookup(_history_tokens(column[start:start + HISTORY_CHUNK_LINES]), table)
                           for start in range(0, len(column), HISTORY_CHUNK_LINES)])


def _history_tokens(column: list[bytes]) -> list[bytes]:
    """All history entries of some lines, concatenated in line order; empty fields hold none."""
    joined = HISTORY_SEPARATOR.join(filter(None, column))
    return joined.split(HISTORY_SEPARATOR) if joined else []


def _byte_keys(vocab: dict[str, int]) -> dict[bytes, int]:
    """The vocabulary keyed by UTF-8 bytes, to look up raw file tokens without decoding them."""
    return {token.encode("utf-8"): index for token, index in vocab.items()}


def _lookup(tokens: list[bytes], table: dict[bytes, int]) -> np.ndarray:
    """Ids of `tokens` (0 for unknown), int32; map(dict.get) runs in C, ~2.5x faster than np.unique."""
    return np.fromiter(map(table.get, tokens, repeat(0)), np.int32, len(tokens))


def open_vocabularies(data_dir: str | os.PathLike, vocabs: Vocabularies) -> Vocabularies:
    """`vocabs` extended with every token of the train and test files (or every-event token lists) it lacks
    (new ids after its own, in order of first appearance, or of code): an encoding that keeps every raw id distinct, for embeddings keyed by raw
    ids (EmbeddingVariable), where a token outside the vocabulary files is still an id of its own."""
    tables = {name: dict(getattr(vocabs, name)) for name in VOCAB_NAMES}
    if events.is_events_dir(data_dir):
        sources = [{name: events.read_tokens(data_dir, name) for name in VOCAB_NAMES}]
    else:
        sources = (_file_tokens(sample_source(data_dir, split)) for split in ("train", "test"))
    for tokens_of in sources:
        for name, tokens in tokens_of.items():
            table = tables[name]
            next_id = max(table.values(), default=-1) + 1
            for token in dict.fromkeys(tokens):
                if token not in table:
                    table[token] = next_id
                    next_id += 1
    return Vocabularies(**tables)


def _file_tokens(path: str) -> dict[str, list[str]]:
    """All tokens of a sample file per vocabulary, in file order (duplicates kept)."""
    if path.endswith(PARQUET_SUFFIX):
        table = _read_parquet(path)
        column = lambda name: _string_column(path, table, name).to_pylist()  # noqa: E731
        history = lambda name: _history_column(path, table, name)[1].to_pylist()  # noqa: E731
        return {"uid": column("uid"), "mid": column("mid") + history("hist_mids"),
                "cat": column("cat") + history("hist_cats")}
    lines = _split_lines(read_bytes(path))
    _check_field_counts(path, lines)
    fields = b"\t".join(lines).split(b"\t")
    decode = lambda tokens: [t.decode("utf-8", "replace") for t in tokens]  # noqa: E731
    return {"uid": decode(fields[1::6]), "mid": decode(fields[2::6] + _history_tokens(fields[4::6])),
            "cat": decode(fields[3::6] + _history_tokens(fields[5::6]))}


def tokens_by_id(vocab: dict[str, int]) -> list[str]:
    """The token of every id 0..max id ('' where no token has that id)."""
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    return tokens


# ---------------------------------------------------------------------------------------------
# Parquet


def _encode_parquet(path: str | os.PathLike, vocabs: Vocabularies) -> EncodedSplit:
    """Encodes a Parquet sample file; its rows are the text file's lines, so errors name rows."""
    table = _read_parquet(path)
    if not table.num_rows:
        raise _empty_split(path, "the file has no rows")
    uid, mid, cat = (_string_column(path, table, name) for name in ("uid", "mid", "cat"))
    mid_offsets, hist_mids = _history_column(path, table, "hist_mids")
    cat_offsets, hist_cats = _history_column(path, table, "hist_cats")
    bad = np.flatnonzero(np.diff(mid_offsets) != np.diff(cat_offsets))
    if bad.size:
        i = int(bad[0])
        raise bad_line(path, i + 1, f"hist_mids has {mid_offsets[i + 1] - mid_offsets[i]} entries but hist_cats "
                                    f"has {cat_offsets[i + 1] - cat_offsets[i]}",
                       "each history item needs its category")
    return EncodedSplit.from_offsets(
        mid_offsets,
        label=_parquet_labels(path, table["label"]),
        uid=_lookup_strings(uid, vocabs.uid),
        mid=_lookup_strings(mid, vocabs.mid),
        cat=_lookup_strings(cat, vocabs.cat),
        hist_mids=_lookup_strings(hist_mids, vocabs.mid),
        hist_cats=_lookup_strings(hist_cats, vocabs.cat),
        user=pc.dictionary_encode(uid).indices.to_numpy().astype(np.int32),
    )


def _read_parquet(path: str | os.PathLike) -> pa.Table:
    """The six sample columns of a Parquet file; a missing column or an unreadable file is a DataError."""
    fields = FIELDS.split()
    try:
        names = pq.read_schema(path).names
        missing = [name for name in fields if name not in names]
        if missing:
            raise bad_file(path, f"has no column {missing[0]!r} (a Parquet sample file needs {FIELDS})",
                           PREPARE_HINT)
        return pq.read_table(path, columns=fields)
    except (pa.ArrowException, OSError) as e:
        raise bad_file(path, f"not a readable Parquet file ({e})", PREPARE_HINT) from None


def _first_null(path: str | os.PathLike, column: pa.Array, name: str) -> None:
    """Raises a DataError at the first null row of `column`."""
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise bad_line(path, row + 1, f"{name} is null", PREPARE_HINT)


def _string_column(path: str | os.PathLike, table: pa.Table, name: str) -> pa.Array:
    """A column of tokens as one Arrow string array; it must be string-like and have no nulls."""
    try:
        column = table[name].combine_chunks().cast(pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise bad_file(path, f"column {name!r} ({table.schema.field(name).type}) is not strings ({e})",
                       PREPARE_HINT) from None
    _first_null(path, column, name)
    return column


def _history_column(path: str | os.PathLike, table: pa.Table, name: str) -> tuple[np.ndarray, pa.Array]:
    """(int64 offsets [N+1], all entries) of a list<string> column without nulls."""
    try:
        column = table[name].combine_chunks().cast(pa.large_list(pa.large_string()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise bad_file(path, f"column {name!r} ({table.schema.field(name).type}) is not lists of strings ({e})",
                       PREPARE_HINT) from None
    _first_null(path, column, name)
    offsets = np.zeros(len(column) + 1, np.int64)
    np.cumsum(pc.list_value_length(column).to_numpy(), out=offsets[1:])
    entries = column.flatten()
    if entries.null_count:
        entry = int(np.flatnonzero(entries.is_null().to_numpy(zero_copy_only=False))[0])
        raise bad_line(path, int(np.searchsorted(offsets, entry, side="right")), f"{name} holds a null entry",
                       PREPARE_HINT)
    return offsets, entries


def _parquet_labels(path: str | os.PathLike, column: pa.ChunkedArray) -> np.ndarray:
    """Labels as float32 [N]; the column must be numeric (or boolean), without nulls, and 0 or 1."""
    try:
        labels = column.combine_chunks().cast(pa.float32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise bad_file(path, f"column 'label' ({column.type}) is not numeric ({e})", PREPARE_HINT) from None
    _first_null(path, labels, "label")
    values = labels.to_numpy()
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        i = int(bad[0])
        raise bad_line(path, i + 1, f"label {values[i]:g} is not 0 or 1", "the label column must be the click label")
    return values


def _lookup_strings(tokens: pa.Array, table: dict[str, int]) -> np.ndarray:
    """Ids of Arrow string `tokens` (0 for unknown), int32; each distinct token is looked up once."""
    encoded = pc.dictionary_encode(tokens)
    distinct = encoded.dictionary.to_pylist()
    ids = np.fromiter(map(table.get, distinct, repeat(0)), np.int32, len(distinct))
    return ids[encoded.indices.to_numpy()]


# ---------------------------------------------------------------------------------------------
# Cache


def default_history_keep(data_dir: str | os.PathLike) -> str:
    """Which history entries batches keep unless told: the every-event storage's recorded 'last', else
    DeepRec's 'first' (the oldest max_seq_length entries)."""
    return events.read_manifest(data_dir)["history_keep"] if events.is_events_dir(data_dir) else "first"


def sample_path(data_dir: str | os.PathLike, split: str) -> str:
    """The sample file of `split` ('train' or 'test') in `data_dir`."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    return os.path.join(os.fspath(data_dir), SPLIT_FILES[split])


def sample_source(data_dir: str | os.PathLike, split: str) -> str:
    """The file `split` is read from: its Parquet file when there is one, else its text file."""
    path = sample_path(data_dir, split)
    if os.path.isfile(path + PARQUET_SUFFIX):
        return path + PARQUET_SUFFIX
    if not os.path.isfile(path):
        raise bad_file(path, f"no such sample file (nor {os.path.basename(path)}{PARQUET_SUFFIX})", PREPARE_HINT)
    return path


def load_split(data_dir: str | os.PathLike, split: str, vocabs: Vocabularies) -> EncodedSplit:
    """The encoded `split` (every-event storage, else Parquet, else text), from the on-disk cache when it matches."""
    if events.is_events_dir(data_dir):
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        key = _digest([FORMAT_VERSION, _file_identity(os.path.join(os.fspath(data_dir), events.MANIFEST)),
                       vocabs.fingerprint])
        cache = os.path.join(os.fspath(data_dir), CACHE_DIR, f"events.{key}")
        columns = events.load_columns(data_dir, split, {name: getattr(vocabs, name) for name in VOCAB_NAMES}, cache)
        _remove_stale_caches(cache)
        return EncodedSplit(**columns)
    path = sample_source(data_dir, split)
    key = _digest([FORMAT_VERSION, _file_identity(path), vocabs.fingerprint])
    cache = os.path.join(os.fspath(data_dir), CACHE_DIR, f"{SPLIT_FILES[split]}.{key}")
    encoded = _read_cache(cache)
    if encoded is None:
        encoded = encode_file(path, vocabs)
        _write_cache(cache, encoded)
    return encoded


def _file_identity(path: str) -> tuple:
    """(absolute path, size, mtime_ns, inode): changes whenever the file is rewritten."""
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _digest(value: object) -> str:
    """A short stable hash of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value).encode("utf-8")).hexdigest()[:20]


def _read_cache(directory: str) -> EncodedSplit | None:
    """The memory-mapped columns in `directory`, or None when there is no usable cache."""
    if not os.path.isdir(directory):
        return None
    try:
        columns = {name: np.asarray(np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r"))
                   for name in COLUMNS}
    except (OSError, ValueError):
        return None
    return EncodedSplit(**columns)


def _write_cache(directory: str, encoded: EncodedSplit) -> None:
    """Writes all columns under a temporary directory, then renames it into place in one step.

    An unwritable data directory, a full disk or a concurrent writer that finished first only
    means this run keeps its columns in memory.
    """
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(directory)}-", dir=parent)
    except OSError:
        return
    try:
        for name in COLUMNS:
            _save_synced(os.path.join(tmp, f"{name}.npy"), getattr(encoded, name))
        os.rename(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            return
        raise
    _remove_stale_caches(directory)


def _save_synced(path: str, array: np.ndarray) -> None:
    """np.save, flushed to disk before returning."""
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_caches(current: str) -> None:
    """Deletes caches of the same sample file under other keys (older sources or versions)."""
    parent, name = os.path.split(current)
    prefix = name.rsplit(".", 1)[0] + "."
    for entry in os.listdir(parent):
        if entry.startswith(prefix) and entry != name:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


__all__ = [
    "DataError", "Vocabularies", "EncodedSplit", "load_vocab", "find_vocab", "load_vocabularies",
    "encode_file", "sample_path", "sample_source", "load_split", "open_vocabularies", "tokens_by_id", "TRAIN_FILE", "TEST_FILE", "PARQUET_SUFFIX",
]
