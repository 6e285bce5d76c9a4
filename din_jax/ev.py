"""DeepRec's embedding features as host-side id -> row mappings (pure numpy, no jax).

One mapping per embedding feature turns the ids of every *global* batch, in step order, into int32 row
indices ("slots") of that feature's device table. Every process of a multi-process run feeds the same
global batches through the same mapping, so a mapping is fully deterministic: it uses only its own
state, numpy sorts and the fixed 64-bit hash `hash64` (no Python `hash()`, no set order, no clock).

The contract with the device step (`Lookup`):
- `slots[i] >= num_rows` means "no row": the lookup reads a zero vector and gets no update. Padding
  (ids < 0) always maps there. The "no row" value is the `num_rows` of that Lookup.
- `init_slots` / `init_sources` [K]: rows to (re)initialise *before* the step runs. A source >= 0
  copies the current value of that row of the same table; a source s < 0 copies row (-s - 1) of the
  fixed default matrix (`default_matrix`, 4096 rows, as DeepRec's `default_value_dim`). K varies.
- `num_rows`: the rows the device table must have when this Lookup's step runs. It only changes when an
  EmbeddingVariable with on_full='grow' doubles; append rows (and optimizer-slot rows) before running
  the step of the first Lookup that reports the larger value - not when it was mapped, since prefetched
  earlier Lookups use the old value as "no row".
- train=False (evaluation, inference) changes nothing: no admission, counting, promotion or step record.

Kinds (`KINDS`, `create`), after DeepRec's docs (docs/docs_en/Embedding-Variable.md, Feature-Filter.md,
Feature-Eviction.md, Adaptive-Embedding.md, Multi-Hash-Variable.md) and its dynamic-dimension EV API:
- `DenseVocabulary`: ids are vocabulary indices, slot = id (din_jax's plain tables).
- `EmbeddingVariable` (--ev, --ev_filter, --ev_elimination): an id gets its own row when admitted.
- `AdaptiveEmbedding` (--adaptive_emb): frequent ids get own rows, the rest share hashed rows.
- `MultiHash` (--multihash): quotient-remainder compositional embedding, two small tables.
- `DynamicDimension` (--dynamic_ev): an EmbeddingVariable whose ids use more dimension blocks as their
  decayed frequency grows.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

DEFAULT_ROWS = 4096  # rows of the default matrix (DeepRec's default_value_dim)
INITIALIZERS = ("truncated_normal", "glorot_uniform")
FILTERS = (None, "counter", "cbf")
COMBINERS = ("add", "mul", "concat")
_CBF_MAX_COUNT = 255  # the Bloom filter's uint8 counters saturate here


class Lookup(NamedTuple):
    """One batch of one feature mapped to rows (see the module docstring for the contract)."""

    slots: np.ndarray  # int32, ids.shape; >= num_rows: zero vector, no update
    init_slots: np.ndarray  # int32 [K]: rows to initialise before the step
    init_sources: np.ndarray  # int32 [K]: >= 0 copy that row; s < 0 copy default-matrix row -s-1
    num_rows: int  # rows the device table must have for this step
    slots_r: np.ndarray | None = None  # int32, ids.shape: the second row of each lookup (MultiHash)
    blocks: np.ndarray | None = None  # int8, ids.shape: live leading dimension blocks (DynamicDimension)


class Eviction(NamedTuple):
    """Rows freed by an eviction: their slots (ascending) and the ids that held them."""

    slots: np.ndarray  # int32 [E]
    ids: np.ndarray  # int64 [E]


class CapacityError(RuntimeError):
    """An EmbeddingVariable with on_full='error' has no free row for a newly admitted id."""


# ------------------------------------------------------------------------------------------ hashing
_GOLDEN = 0x9E3779B97F4A7C15


def hash64(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """splitmix64 of each int64 id (its two's-complement bits), as uint64; `seed` picks an independent hash.

    z = x + (seed + 1) * 0x9E3779B97F4A7C15; z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9;
    z = (z ^ z >> 27) * 0x94D049BB133111EB; z ^ z >> 31 (all mod 2^64). Stable across processes and runs.
    """
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    z = z + np.uint64(((seed + 1) * _GOLDEN) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_tokens(tokens: Sequence[str]) -> np.ndarray:
    """Raw string tokens -> non-negative int64 ids: the first 8 bytes of blake2b(utf-8 token), read
    little-endian, top bit cleared (negative ids mean padding). Stable across processes, runs and
    platforms (hashlib; xxhash is not installed)."""
    mask = (1 << 63) - 1
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") & mask
                        for t in tokens), dtype=np.int64, count=len(tokens))


def default_rows(ids: np.ndarray) -> np.ndarray:
    """The default-matrix row of each id: hash64(id) mod 4096 (DeepRec uses id mod 4096; hashing spreads
    ids that share their low bits)."""
    return (hash64(ids) % np.uint64(DEFAULT_ROWS)).astype(np.int32)


def default_matrix(seed: int, dim: int, initializer: str = "truncated_normal",
                   stddev: float | None = None) -> np.ndarray:
    """The fixed [4096, dim] float32 matrix new rows start from, deterministic from `seed`.

    truncated_normal: N(0, stddev) redrawn outside 2 stddev (TF1's initializer), stddev 1/sqrt(dim) by
    default (din_jax's uid table); glorot_uniform: U(-l, l), l = sqrt(6 / (4096 + dim)), as DeepRec
    applies the initializer to its [default_value_dim, dim] default value.
    """
    rng = np.random.default_rng(seed)
    if initializer == "truncated_normal":
        stddev = dim**-0.5 if stddev is None else stddev
        values = rng.standard_normal((DEFAULT_ROWS, dim))
        outside = np.abs(values) > 2.0
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        return (values * stddev).astype(np.float32)
    if initializer == "glorot_uniform":
        limit = math.sqrt(6.0 / (DEFAULT_ROWS + dim))
        return rng.uniform(-limit, limit, (DEFAULT_ROWS, dim)).astype(np.float32)
    raise ValueError(f"unknown initializer {initializer!r}; choose one of {INITIALIZERS}")


def l2_weight(rows: np.ndarray) -> np.ndarray:
    """DeepRec's l2 eviction measure of each row: 0.5 * sum(v^2) (L2WeightShrinkPolicy), [N, D] -> [N]."""
    rows = np.asarray(rows, dtype=np.float64)
    return 0.5 * np.einsum("nd,nd->n", rows, rows)


# ------------------------------------------------------------------------------------------ helpers
_NO_INIT = (np.zeros(0, np.int32), np.zeros(0, np.int32))
_NO_ALIASES = np.zeros(0, np.int32)  # an empty alias memo (never written: the memo grows into a new array)


def _flat_ids(ids: np.ndarray) -> np.ndarray:
    """Any-shaped integer ids as a flat int64 array (a view when possible)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers (int64 raw ids or vocabulary indices), got dtype {ids.dtype}")
    return ids.reshape(-1).astype(np.int64, copy=False)


def _unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values and how often each occurs (np.sort based: ~7x faster than np.unique here)."""
    if values.size == 0:
        return values[:0], np.zeros(0, np.int64)
    ordered = np.sort(values)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], np.diff(np.append(starts, ordered.size))


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, math.ceil(math.log2(max(n, 1))))


class _IdTable:
    """Open-addressing hash table (linear probing, vectorised in numpy) from non-negative int64 ids to
    positions, with payload columns stored by position. Load (live + deleted) is kept <= 1/2."""

    EMPTY, DELETED = -1, -2

    def __init__(self, min_entries: int, **columns: type):
        self.min_size = _pow2_at_least(2 * min_entries)
        self.columns = columns
        self._reset(self.min_size)

    def _reset(self, size: int):
        self.keys = np.full(size, self.EMPTY, np.int64)
        self.cols = {name: np.zeros(size, dtype) for name, dtype in self.columns.items()}
        self.live = self.deleted = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + sum(c.nbytes for c in self.cols.values())

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id, -1 where absent."""
        mask = self.keys.size - 1
        pos = (hash64(ids) & np.uint64(mask)).astype(np.intp)
        found = np.full(ids.size, -1, np.intp)
        key = self.keys[pos]
        hit = key == ids
        found[hit] = pos[hit]
        todo = np.flatnonzero(~hit & (key != self.EMPTY))
        pos, ids = pos[todo], ids[todo]
        while todo.size:
            pos = (pos + 1) & mask
            key = self.keys[pos]
            hit = key == ids
            found[todo[hit]] = pos[hit]
            go = ~hit & (key != self.EMPTY)
            todo, pos, ids = todo[go], pos[go], ids[go]
        return found

    def insert(self, ids: np.ndarray, **values: np.ndarray) -> np.ndarray:
        """Insert ids (unique, absent) with their column values; returns their positions."""
        if 2 * (self.live + self.deleted + ids.size) > self.keys.size:
            self._rebuild(max(self.min_size, _pow2_at_least((self.live + ids.size) * 8 // 3)))
        mask = self.keys.size - 1
        pos = (hash64(ids) & np.uint64(mask)).astype(np.intp)
        placed = np.empty(ids.size, np.intp)
        todo = np.arange(ids.size)
        while todo.size:
            empty = self.keys[pos] == self.EMPTY
            claim, claim_pos = todo[empty], pos[empty]
            self.keys[claim_pos] = ids[claim]  # several ids may claim one position: one of them wins
            won = self.keys[claim_pos] == ids[claim]
            placed[claim[won]] = claim_pos[won]
            retry = ~empty
            retry[empty] = ~won
            todo, pos = todo[retry], (pos[retry] + 1) & mask
        for name, value in values.items():
            self.cols[name][placed] = value
        self.live += ids.size
        return placed

    def remove(self, positions: np.ndarray):
        """Delete the entries at these (distinct, live) positions."""
        self.keys[positions] = self.DELETED
        self.live -= positions.size
        self.deleted += positions.size

    def entries(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Live ids, ascending, and their column values."""
        pos = np.flatnonzero(self.keys >= 0)
        pos = pos[np.argsort(self.keys[pos], kind="stable")]
        return self.keys[pos], {name: col[pos] for name, col in self.cols.items()}

    def _rebuild(self, size: int):
        pos = np.flatnonzero(self.keys >= 0)
        ids, values = self.keys[pos], {name: col[pos] for name, col in self.cols.items()}
        self._reset(size)
        self.insert(ids, **values)

    def compact(self, min_entries: int | None = None):
        """Drop deleted markers (and resize to hold `min_entries` at load 1/2)."""
        if min_entries is not None:
            self.min_size = _pow2_at_least(2 * min_entries)
        self._rebuild(max(self.min_size, _pow2_at_least(2 * self.live)))


def _check_state(feature: str, state: dict, expected: dict[str, tuple[tuple[int, ...] | None, type]]) -> dict:
    """The arrays of a state dict, checked against {key: (shape or None for any 1-D length, dtype)}."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"state of embedding '{feature}' does not fit this mapping: missing {missing}, "
                         f"unexpected {extra} (was it saved with another kind or options?)")
    out = {}
    for key, (shape, dtype) in expected.items():
        value = np.asarray(state[key])
        if (shape is None and value.ndim != 1) or (shape is not None and value.shape != shape):
            raise ValueError(f"state of embedding '{feature}': {key} has shape {value.shape}, expected "
                             f"{shape if shape is not None else '1-D'} (different capacity or options?)")
        out[key] = value.astype(dtype, copy=True)
    return out


# ------------------------------------------------------------------------------------------ kinds
class IdMapping:
    """The interface of every kind: map, num_rows, initial_rows, touched_since, state_dict, stats.

    Every kind records, per row, the last training step that looked it up (`touched_since`), so the
    caller can write incremental checkpoints of the rows changed since a step.
    """

    kind = ""
    name: str
    num_rows: int
    _row_step: np.ndarray  # int64 [num_rows]: last training step that wrote the row, -1 never

    def map(self, ids: np.ndarray, step: int, train: bool, aliases: np.ndarray | None = None) -> Lookup:
        """Rows of one global batch's ids (int64, any shape; < 0 padding) at global step `step`.

        aliases: optionally, a dense non-negative index of each id (its vocabulary index: equal aliases always
        carry equal ids), which kinds keyed by raw ids use to remember ids' rows instead of probing their hash
        table again; the rows are the same with or without it. Kinds keyed by the index itself ignore it."""
        raise NotImplementedError

    def initial_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, sources) to initialise when the table is created, with the init_sources encoding;
        rows not listed are the caller's to initialise (DenseVocabulary, MultiHash: as any table)."""
        return _NO_INIT

    def touched_since(self, step: int) -> np.ndarray:
        """Slots (int32, ascending) whose rows training wrote or initialised at a step >= `step`."""
        return np.flatnonzero(self._row_step >= step).astype(np.int32)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The mapping's state as numpy arrays (exact round trip through load_state_dict)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, np.ndarray]):
        """Restore a state_dict (of a mapping with the same kind and options)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Rows, capacity, memory and counters, for logs."""
        raise NotImplementedError

    def _record(self, slots: np.ndarray, step: int):
        """Training wrote these rows (slots < num_rows) at `step`."""
        self._row_step[slots] = step


class DenseVocabulary(IdMapping):
    """ids are vocabulary indices in [0, vocab_size): slot = id (din_jax's plain embedding tables)."""

    kind = "dense"

    def __init__(self, vocab_size: int, name: str = "embedding"):
        self.name = name
        self.num_rows = _positive_int("vocab_size", vocab_size)
        self._row_step = np.full(self.num_rows, -1, np.int64)

    def map(self, ids: np.ndarray, step: int, train: bool, aliases: np.ndarray | None = None) -> Lookup:
        flat = _flat_ids(ids)
        if flat.size and flat.max() >= self.num_rows:
            raise ValueError(f"embedding '{self.name}': id {flat.max()} is outside its vocabulary of "
                             f"{self.num_rows} ids; the vocabulary file and the data disagree")
        slots = np.where(flat >= 0, flat, self.num_rows).astype(np.int32)
        if train:
            self._record(slots[slots < self.num_rows], step)
        return Lookup(slots.reshape(np.shape(ids)), *_NO_INIT, self.num_rows)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"row_step": self._row_step.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]):
        self._row_step = _check_state(self.name, state, {"row_step": ((self.num_rows,), np.int64)})["row_step"]

    def stats(self) -> dict:
        return {"kind": self.kind, "num_rows": self.num_rows, "rows_touched": int((self._row_step >= 0).sum()),
                "host_bytes": self._row_step.nbytes}


class MultiHash(IdMapping):
    """DeepRec's get_multihash_variable, complementary_strategy 'Q-R' (Shi et al., "Compositional
    Embeddings Using Complementary Partitions", 2020).

    An id x in [0, N) (a dense index; with hash_ids=True, x = hash64(raw id) mod N) uses two rows:
    q = x // m of table Q (ceil(N / m) rows) and r = x % m of table R (m rows), m = ceil(sqrt(N)).
    Distinct x give distinct (q, r). The device table is Q's rows then R's: slots = q, slots_r = |Q| + r.
    The two rows are combined by `combine` (DeepRec's operation "add", "mult", "concat"): 'add' (sum)
    and 'mul' (product) use rows of width dim; 'concat' uses rows of width dim / 2 (`row_dim`) and
    concatenates them to dim.
    """

    kind = "multihash"

    def __init__(self, num_ids_or_buckets: int, dim: int, combiner: str = "add", hash_ids: bool = False,
                 name: str = "embedding"):
        self.name = name
        self.num_ids = _positive_int("num_ids_or_buckets", num_ids_or_buckets)
        self.dim = _positive_int("dim", dim)
        if combiner not in COMBINERS:
            raise ValueError(f"embedding '{name}': unknown multihash combiner {combiner!r}; choose one of {COMBINERS}")
        if combiner == "concat" and dim % 2:
            raise ValueError(f"embedding '{name}': combiner 'concat' joins two rows of dim / 2, so dim must be "
                             f"even, got {dim}")
        self.combiner, self.hash_ids = combiner, hash_ids
        self.row_dim = dim // 2 if combiner == "concat" else dim
        self.remainder_rows = math.isqrt(self.num_ids - 1) + 1  # m = ceil(sqrt(N))
        self.quotient_rows = -(-self.num_ids // self.remainder_rows)
        self.num_rows = self.quotient_rows + self.remainder_rows
        self._row_step = np.full(self.num_rows, -1, np.int64)

    def map(self, ids: np.ndarray, step: int, train: bool, aliases: np.ndarray | None = None) -> Lookup:
        flat = _flat_ids(ids)
        real = flat >= 0
        if self.hash_ids:
            x = np.where(real, hash64(flat) % np.uint64(self.num_ids), 0).astype(np.int64)
        else:
            if flat.size and flat.max() >= self.num_ids:
                raise ValueError(f"embedding '{self.name}': id {flat.max()} >= num_ids_or_buckets "
                                 f"{self.num_ids}; raise it or set hash_ids=True for raw ids")
            x = np.where(real, flat, 0)
        q = np.where(real, x // self.remainder_rows, self.num_rows).astype(np.int32)
        r = np.where(real, self.quotient_rows + x % self.remainder_rows, self.num_rows).astype(np.int32)
        if train:
            self._record(q[real], step)
            self._record(r[real], step)
        shape = np.shape(ids)
        return Lookup(q.reshape(shape), *_NO_INIT, self.num_rows, slots_r=r.reshape(shape))

    def combine(self, rows_q: np.ndarray, rows_r: np.ndarray) -> np.ndarray:
        """The numpy reference of the embedding from the two rows [..., row_dim] -> [..., dim]."""
        if self.combiner == "add":
            return rows_q + rows_r
        if self.combiner == "mul":
            return rows_q * rows_r
        return np.concatenate([rows_q, rows_r], axis=-1)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"row_step": self._row_step.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]):
        self._row_step = _check_state(self.name, state, {"row_step": ((self.num_rows,), np.int64)})["row_step"]

    def stats(self) -> dict:
        return {"kind": self.kind, "num_rows": self.num_rows, "quotient_rows": self.quotient_rows,
                "remainder_rows": self.remainder_rows, "row_dim": self.row_dim,
                "device_bytes": self.num_rows * self.row_dim * 4, "host_bytes": self._row_step.nbytes}


class CountingBloomFilter:
    """Lookup counts of ids without a row, in bounded memory (DeepRec's CBFFilter).

    m = ceil(-n ln p / (ln 2)^2) uint8 counters and k = max(1, round(m / n * ln 2)) hashes for n expected
    ids and false-positive probability p; an id's positions are h1 + i * h2 mod m (i < k, double hashing
    with hash64 seeds 1 and 2). Adding c adds c to each of its k counters, saturating at 255; an id's
    count estimate is the minimum of its counters: never below its true count (no false negatives).
    """

    def __init__(self, expected_ids: int, false_positive: float):
        expected_ids = _positive_int("cbf_expected_ids", expected_ids)
        if not 0.0 < false_positive < 1.0:
            raise ValueError(f"cbf_false_positive must be in (0, 1), got {false_positive!r}")
        self.m = math.ceil(-expected_ids * math.log(false_positive) / math.log(2) ** 2)
        self.k = max(1, round(self.m / expected_ids * math.log(2)))
        self.counters = np.zeros(self.m, np.uint8)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        h1, h2 = hash64(ids, 1)[:, None], (hash64(ids, 2) | np.uint64(1))[:, None]
        return ((h1 + np.arange(self.k, dtype=np.uint64) * h2) % np.uint64(self.m)).astype(np.int64)  # [n, k]

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count estimate of each id (int64), its counter positions [n, k] for `update`)."""
        positions = self._positions(ids)
        return self.counters[positions].min(axis=1).astype(np.int64), positions

    def update(self, ids: np.ndarray, counts: np.ndarray, keep: np.ndarray, step: int, positions: np.ndarray):
        """Add the counts of the ids kept waiting (`keep`); admitted ids leave the filter (as in DeepRec)."""
        del ids, step
        self.add(positions[keep], counts[keep])

    def add(self, positions: np.ndarray, counts: np.ndarray):
        """Add counts[i] lookups of the distinct id with counter positions [i, :]."""
        if counts.size == 0:
            return
        increments = np.minimum(counts, _CBF_MAX_COUNT).astype(np.int64)
        # Sort (position, increment) pairs packed in one int64, then sum increments per position.
        packed = np.sort((positions << 8 | increments[:, None]).reshape(-1))
        positions = packed >> 8
        starts = np.flatnonzero(np.concatenate(([True], positions[1:] != positions[:-1])))
        sums = np.add.reduceat(packed & 0xFF, starts)
        where = positions[starts]
        self.counters[where] = np.minimum(self.counters[where] + sums, _CBF_MAX_COUNT)


class _ExactCounts:
    """Lookup counts and last training step of ids without a row, exact (DeepRec's counter filter keeps
    them in the same hash map as admitted ids)."""

    def __init__(self):
        self.table = _IdTable(1024, count=np.int64, step=np.int64)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count of each id (int64), its table position for `update`)."""
        pos = self.table.find(ids)
        return np.where(pos >= 0, self.table.cols["count"][pos], 0), pos

    def update(self, ids: np.ndarray, counts: np.ndarray, keep: np.ndarray, step: int, pos: np.ndarray):
        """Add the counts of the ids kept waiting (`keep`); forget the others (they got rows)."""
        known = pos >= 0
        self.table.remove(pos[known & ~keep])
        grown = pos[known & keep]
        self.table.cols["count"][grown] += counts[known & keep]
        self.table.cols["step"][grown] = step
        new = ~known & keep
        self.table.insert(ids[new], count=counts[new], step=np.full(int(new.sum()), step, np.int64))

    def drop_stale(self, step: int, steps_to_live: int) -> int:
        """Forget ids not looked up for more than steps_to_live steps; returns how many."""
        pos = np.flatnonzero(self.table.keys >= 0)
        stale = pos[step - self.table.cols["step"][pos] > steps_to_live]
        self.table.remove(stale)
        self.table.compact()
        return stale.size


class _KeyedRows(IdMapping):
    """Ids keyed by their raw int64 value, with own rows [0, capacity) given on admission.

    Admission: an id gets a row in the training batch in which its lookup count reaches `admit_after`;
    counts are per occurrence (a batch with the id three times adds 3, as DeepRec counts with
    unique_with_counts). Until then its lookups go to `_fallback` and its count is kept by `_counts`.
    New ids of one batch are admitted in ascending id order and take the lowest free slots.
    """

    def __init__(self, name: str, capacity: int, dim: int, seed: int, initializer: str, on_full: str,
                 admit_after: int, counts: CountingBloomFilter | _ExactCounts | None, num_rows: int):
        self.name = name
        self.capacity = _positive_int("capacity", capacity)
        self.dim = _positive_int("dim", dim)
        if initializer not in INITIALIZERS:
            raise ValueError(f"embedding '{name}': unknown initializer {initializer!r}; choose one of {INITIALIZERS}")
        self.seed, self.initializer, self.on_full = seed, initializer, on_full
        self.admit_after, self._counts = admit_after, counts
        self.num_rows = num_rows
        self._row_step = np.full(num_rows, -1, np.int64)
        self._slot_ids = np.full(self.capacity, -1, np.int64)  # id holding each own row, -1 free
        self._index = _IdTable(self.capacity, slot=np.int32)
        self._alias_slots = _NO_ALIASES  # own row of each alias met (map's aliases), -1 unknown
        self._free = np.zeros(0, np.int64)  # free slots below _next, ascending
        self._next = 0  # slots >= _next were never taken or are free
        self._admitted = self._fallback_lookups = self._evicted = 0

    # -- the hooks of each kind
    def _fallback(self, ids: np.ndarray) -> np.ndarray:
        """Slot of lookups of ids without an own row."""
        raise NotImplementedError

    def _init_sources(self, ids: np.ndarray) -> np.ndarray:
        """init_sources of newly admitted ids."""
        return -default_rows(ids) - 1

    def _grow(self, capacity: int):
        raise NotImplementedError

    # -- mapping
    def default_matrix(self) -> np.ndarray:
        """This feature's fixed default matrix [4096, dim]."""
        return default_matrix(self.seed, self.dim, self.initializer)

    def map(self, ids: np.ndarray, step: int, train: bool, aliases: np.ndarray | None = None) -> Lookup:
        flat = _flat_ids(ids)
        real = np.flatnonzero(flat >= 0)
        real_ids = flat[real]
        real_aliases = None if aliases is None else _flat_ids(aliases)[real]
        slots = self._own_slots(real_ids, real_aliases)
        init = _NO_INIT
        miss = np.flatnonzero(slots < 0)
        if train and miss.size:
            init = self._admit(real_ids[miss], step)
            if init[0].size:  # the admitted ids' rows (and, with aliases, remembered from now on)
                slots[miss] = self._own_slots(real_ids[miss], None if aliases is None else real_aliases[miss])
                miss = miss[slots[miss] < 0]
        slots[miss] = self._fallback(real_ids[miss])
        if train:
            self._fallback_lookups += miss.size
            self._record(slots[slots < self.num_rows], step)
        out = np.full(flat.size, self.num_rows, np.int32)
        out[real] = slots
        return Lookup(out.reshape(np.shape(ids)), *init, self.num_rows)

    def _own_slots(self, ids: np.ndarray, aliases: np.ndarray | None = None) -> np.ndarray:
        """The own row of each id, -1 where it has none: probed in the hash table, or with aliases through the
        alias memo, one gather for ids met before and a probe only for the others (whose rows it then remembers).
        The memo holds own rows only, so it stays right until rows are freed."""
        if aliases is None:
            pos = self._index.find(ids)
            return np.where(pos >= 0, self._index.cols["slot"][pos], -1)
        if aliases.size and aliases.max() >= self._alias_slots.size:
            grown = np.full(max(int(aliases.max()) + 1, self._alias_slots.size * 5 // 4), -1, np.int32)
            grown[:self._alias_slots.size] = self._alias_slots
            self._alias_slots = grown
        slots = self._alias_slots[aliases]
        unknown = np.flatnonzero(slots < 0)
        if unknown.size:
            slots[unknown] = self._own_slots(ids[unknown])
            self._alias_slots[aliases[unknown]] = slots[unknown]
        return slots

    def _admit(self, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Count the lookups of ids without a row, give rows to those that reach admit_after."""
        unique, counts = _unique_counts(ids)
        seen, where = self._counts.lookup(unique) if self._counts is not None else (0, None)
        ready = np.flatnonzero(seen + counts >= self.admit_after)
        admit = ready[:self._room(ready.size, step)]
        if self._counts is not None:
            keep = np.ones(unique.size, bool)
            keep[admit] = False
            self._counts.update(unique, counts, keep, step, where)
        if admit.size == 0:
            return _NO_INIT
        new, slots = unique[admit], self._take_slots(admit.size)
        self._index.insert(new, slot=slots)
        self._slot_ids[slots] = new
        self._admitted += new.size
        return slots.astype(np.int32), self._init_sources(new).astype(np.int32)

    def _room(self, wanted: int, step: int) -> int:
        """How many of `wanted` new ids get rows: all (growing if allowed), or as many as are free."""
        free = self._free.size + self.capacity - self._next
        if wanted <= free or self.on_full == "share":
            return min(wanted, free)
        if self.on_full == "error":
            remedy = (f"Raise {self.capacity_field} (0: a row for every distinct id of the data) or evict ids "
                      "(config.ev_elimination 'gstep' or 'l2')" if self.capacity_field.startswith("config.") else
                      f"Raise its capacity (config field '{self.capacity_field}'), evict ids (ev_elimination 'gstep' "
                      "or 'l2') or set on_full='grow'")
            raise CapacityError(f"embedding '{self.name}' is full: all {self.capacity} rows hold admitted ids and "
                                f"{wanted - free} more ids need rows at step {step}. {remedy}.")
        capacity = self.capacity
        while capacity - self.capacity + free < wanted:
            capacity *= 2
        self._grow(capacity)
        return wanted

    def _take_slots(self, n: int) -> np.ndarray:
        """The n lowest free own slots."""
        reused = self._free[:n]
        self._free = self._free[reused.size:]
        fresh = np.arange(self._next, self._next + n - reused.size)
        self._next += fresh.size
        return np.concatenate([reused, fresh])

    # -- eviction (DeepRec's feature eviction, run when a checkpoint is saved)
    def evict_stale(self, step: int, steps_to_live: int) -> Eviction:
        """gstep: drop ids whose rows no training step looked up for more than steps_to_live steps
        (DeepRec's GlobalStepShrinkPolicy: global_step - version > steps_to_live). Waiting counts of
        ids not seen for that long are dropped too. Evicted ids come back as new ids."""
        held = np.flatnonzero(self._slot_ids >= 0)
        evicted = self._evict(held[step - self._row_step[held] > steps_to_live])
        if isinstance(self._counts, _ExactCounts):
            self._counts.drop_stale(step, steps_to_live)
        return evicted

    def evict_small(self, row_norms: np.ndarray, threshold: float) -> Eviction:
        """l2: drop ids whose row measure is below threshold. row_norms [num_rows] is computed by the
        caller from the device table; DeepRec's l2 policy measures `l2_weight` = 0.5 * ||v||^2."""
        row_norms = np.asarray(row_norms)
        if row_norms.shape != (self.num_rows,):
            raise ValueError(f"embedding '{self.name}': row_norms has shape {row_norms.shape}, expected "
                             f"({self.num_rows},), one value per row of the device table")
        held = np.flatnonzero(self._slot_ids >= 0)
        return self._evict(held[row_norms[held] < threshold])

    def _evict(self, slots: np.ndarray) -> Eviction:
        ids = self._slot_ids[slots]
        if slots.size == 0:
            return Eviction(slots.astype(np.int32), ids)
        self._index.remove(self._index.find(ids))
        self._index.compact()
        self._alias_slots = _NO_ALIASES  # freed rows may go to other ids
        self._slot_ids[slots] = -1
        self._clear_rows(slots)
        self._free = np.union1d(self._free, slots).astype(np.int64)
        self._evicted += slots.size
        return Eviction(slots.astype(np.int32), ids)

    def _clear_rows(self, slots: np.ndarray):
        """Forget the per-row records of freed rows."""
        self._row_step[slots] = -1

    # -- state
    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"slot_ids": self._slot_ids.copy(), "row_step": self._row_step.copy(),
                 "counters": np.array([self._admitted, self._fallback_lookups, self._evicted], np.int64)}
        if isinstance(self._counts, CountingBloomFilter):
            state["cbf_counters"] = self._counts.counters.copy()
        elif isinstance(self._counts, _ExactCounts):
            ids, values = self._counts.table.entries()
            state.update(pending_ids=ids, pending_counts=values["count"], pending_steps=values["step"])
        return state

    def _state_layout(self) -> dict:
        layout = {"slot_ids": ((self.capacity,), np.int64), "row_step": ((self.num_rows,), np.int64),
                  "counters": ((3,), np.int64)}
        if isinstance(self._counts, CountingBloomFilter):
            layout["cbf_counters"] = ((self._counts.m,), np.uint8)
        elif isinstance(self._counts, _ExactCounts):
            layout.update(pending_ids=(None, np.int64), pending_counts=(None, np.int64),
                          pending_steps=(None, np.int64))
        return layout

    def load_state_dict(self, state: dict[str, np.ndarray]):
        capacity = np.asarray(state.get("slot_ids", self._slot_ids)).shape[0]
        if capacity != self.capacity and self.on_full == "grow":
            self._grow(capacity)  # a grown table: resize before checking shapes
        state = _check_state(self.name, state, self._state_layout())
        self._load_arrays(state)

    def _load_arrays(self, state: dict[str, np.ndarray]):
        self._slot_ids, self._row_step = state["slot_ids"], state["row_step"]
        self._admitted, self._fallback_lookups, self._evicted = (int(v) for v in state["counters"])
        held = np.flatnonzero(self._slot_ids >= 0)
        self._next = int(held[-1]) + 1 if held.size else 0
        self._free = np.flatnonzero(self._slot_ids[:self._next] < 0).astype(np.int64)
        self._index = _IdTable(self.capacity, slot=np.int32)
        self._index.insert(self._slot_ids[held], slot=held)
        self._alias_slots = _NO_ALIASES
        if isinstance(self._counts, CountingBloomFilter):
            self._counts.counters = state["cbf_counters"]
        elif isinstance(self._counts, _ExactCounts):
            self._counts = _ExactCounts()
            self._counts.table.insert(state["pending_ids"], count=state["pending_counts"], step=state["pending_steps"])

    def _host_arrays(self) -> list[np.ndarray]:
        arrays = [self._slot_ids, self._row_step, self._free]
        if isinstance(self._counts, CountingBloomFilter):
            arrays.append(self._counts.counters)
        return arrays

    def stats(self) -> dict:
        """rows_held (own rows with an id), capacity, num_rows, waiting_ids (ids counted but without a
        row: 'counter' and adaptive), host_bytes (this object's arrays; not the alias memo, a cache of 4 bytes per
        vocabulary index beside the 8 of HostEmbeddings' raw ids, so that a resumed run reports what a straight
        one does), device_bytes_held /
        device_bytes (float32 rows held / allocated, before optimizer slots), admitted, evicted,
        fallback_lookups (training lookups without an own row: EV reads zero, adaptive its shared row)."""
        rows_held = int((self._slot_ids >= 0).sum())
        pending = self._counts.table if isinstance(self._counts, _ExactCounts) else None
        host = sum(a.nbytes for a in self._host_arrays()) + self._index.nbytes + (pending.nbytes if pending else 0)
        return {"kind": self.kind, "rows_held": rows_held, "capacity": self.capacity, "num_rows": self.num_rows,
                "waiting_ids": pending.live if pending else None, "host_bytes": host,
                "device_bytes_held": rows_held * self.dim * 4, "device_bytes": self.num_rows * self.dim * 4,
                "admitted": self._admitted, "evicted": self._evicted, "fallback_lookups": self._fallback_lookups}


class EmbeddingVariable(_KeyedRows):
    """DeepRec's EmbeddingVariable: every admitted id owns a row, keyed by its raw int64 id.

    A new id's row starts as row hash64(id) mod 4096 of the default matrix; the id keeps its slot until
    evicted. Admission filters (Feature-Filter.md): None admits on the first training lookup; 'counter'
    and 'cbf' admit in the training batch in which the id's count of lookups reaches filter_freq (per
    occurrence), counts kept exactly ('counter') or in a CountingBloomFilter ('cbf', bounded memory).
    Not-yet-admitted lookups read no row (DeepRec's default_value_no_permission = 0). DeepRec's
    forward pass of the admitting step still reads 0 and its backward creates the row; here the
    admitting step already reads the fresh default row and updates it.
    On eviction an id forgets everything, except that 'cbf' keeps the pre-admission counts in the
    filter (counting Bloom filters cannot forget one id without risking false negatives for others; DeepRec
    never clears its filter either): an evicted id is re-admitted after filter_freq minus those lookups.
    Full table: on_full='error' raises CapacityError; 'grow' doubles capacity (= num_rows, see Lookup).
    """

    kind = "ev"

    def __init__(self, capacity: int, dim: int, seed: int = 0, filter: str | None = None, filter_freq: int = 3,
                 cbf_false_positive: float = 0.01, cbf_expected_ids: int | None = None, on_full: str = "error",
                 initializer: str = "truncated_normal", name: str = "embedding", capacity_field: str = "capacity"):
        if filter not in FILTERS:
            raise ValueError(f"embedding '{name}': unknown ev filter {filter!r}; choose one of {FILTERS}")
        if on_full not in ("error", "grow"):
            raise ValueError(f"embedding '{name}': on_full must be 'error' or 'grow', got {on_full!r}")
        filter_freq = _positive_int("filter_freq", filter_freq) if filter else 1
        if filter == "cbf" and filter_freq > _CBF_MAX_COUNT:
            raise ValueError(f"embedding '{name}': filter_freq {filter_freq} > {_CBF_MAX_COUNT}, the most the "
                             "Bloom filter's uint8 counters hold; use filter 'counter'")
        counts = None
        if filter == "counter":
            counts = _ExactCounts()
        elif filter == "cbf":  # expected not-yet-admitted ids: 10x the rows unless told
            counts = CountingBloomFilter(cbf_expected_ids or 10 * capacity, cbf_false_positive)
        self.filter, self.filter_freq, self.capacity_field = filter, filter_freq, capacity_field
        super().__init__(name, capacity, dim, seed, initializer, on_full, filter_freq, counts, capacity)

    def _fallback(self, ids: np.ndarray) -> np.ndarray:
        return np.full(ids.size, self.num_rows, np.int32)

    def _grow(self, capacity: int):
        extra = capacity - self.capacity
        self._slot_ids = np.concatenate([self._slot_ids, np.full(extra, -1, np.int64)])
        self._row_step = np.concatenate([self._row_step, np.full(extra, -1, np.int64)])
        self.capacity = self.num_rows = capacity
        self._index.compact(capacity)


class DynamicDimension(EmbeddingVariable):
    """DeepRec's dynamic-dimension EmbeddingVariable: an id's vector is dim / block_size blocks, of which
    the leading `blocks` are live (the device zeroes the others; their stored values stay, and resume
    when the block comes back).

    Rule, per admitted id: at each training step that looks it up c times,
        freq <- freq * decay ** (step - last step it was looked up) + c      (freq = c on admission)
    and blocks = min(1 + #{t in thresholds: freq >= t}, dim / block_size). Evaluation (train=False) uses the
    frequency decayed to now, freq * decay ** (now - last) with now the latest step training looked anything up
    (or `step`, if later), without changing it: evaluation, export and predict, which pass no step, see the
    frequencies the next training step would. Lookups without a row get blocks = 0.
    """

    kind = "dynamic"

    def __init__(self, capacity: int, dim: int, block_size: int, thresholds: Sequence[float], decay: float = 1.0,
                 seed: int = 0, **ev_options):
        super().__init__(capacity, dim, seed, **ev_options)
        self.block_size = _positive_int("block_size", block_size)
        if dim % block_size:
            raise ValueError(f"embedding '{self.name}': dim {dim} is not a multiple of block_size {block_size}")
        self.max_blocks = dim // block_size
        self.thresholds = np.asarray(thresholds, np.float64)
        if self.thresholds.ndim != 1 or (self.thresholds.size and (np.diff(self.thresholds) <= 0).any()):
            raise ValueError(f"embedding '{self.name}': thresholds must be increasing numbers, got {thresholds!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"embedding '{self.name}': decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self._freq = np.zeros(self.capacity, np.float64)

    def _decayed(self, slots: np.ndarray, step: int) -> np.ndarray:
        last = self._row_step[slots]
        return np.where(last >= 0, self._freq[slots] * self.decay ** np.maximum(step - last, 0), 0.0)

    def _record(self, slots: np.ndarray, step: int):
        unique, counts = _unique_counts(slots)
        self._freq[unique] = self._decayed(unique, step) + counts
        super()._record(slots, step)

    def map(self, ids: np.ndarray, step: int, train: bool, aliases: np.ndarray | None = None) -> Lookup:
        lookup = super().map(ids, step, train, aliases)
        live = lookup.slots < lookup.num_rows
        slots = lookup.slots[live]
        freq = self._freq[slots] if train else self._decayed(slots, max(step, int(self._row_step.max(initial=-1))))
        blocks = np.zeros(lookup.slots.shape, np.int8)
        blocks[live] = np.minimum(1 + np.searchsorted(self.thresholds, freq, side="right"), self.max_blocks)
        return lookup._replace(blocks=blocks)

    def _clear_rows(self, slots: np.ndarray):
        super()._clear_rows(slots)
        self._freq[slots] = 0.0

    def _grow(self, capacity: int):
        self._freq = np.concatenate([self._freq, np.zeros(capacity - self.capacity)])
        super()._grow(capacity)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**super().state_dict(), "freq": self._freq.copy()}

    def _state_layout(self) -> dict:
        return {**super()._state_layout(), "freq": ((self.capacity,), np.float64)}

    def _load_arrays(self, state: dict[str, np.ndarray]):
        super()._load_arrays(state)
        self._freq = state["freq"]

    def _host_arrays(self) -> list[np.ndarray]:
        return super()._host_arrays() + [self._freq]


class AdaptiveEmbedding(_KeyedRows):
    """DeepRec's Adaptive Embedding: frequent ids own collision-free rows, the others share hashed rows.

    DeepRec takes the hot/cold choice as a per-lookup mask from the user (adaptive_mask_tensors) and
    copies the hashed row into the EV on migration; here the choice is the promotion rule below.

    Rows [0, capacity) are own rows; row capacity + hash64(id) mod hash_bucket_size is an id's shared
    row. An id is promoted in the training batch in which its lookup count (per occurrence, exact)
    reaches promote_freq; its own row starts as a copy of the shared row it was using (init_sources =
    that shared slot). When own rows run out, ids stay on their shared rows and are promoted as rows
    free up (eviction). Evicted ids go back to their shared row with a count of 0. Every lookup reads a
    row, in evaluation too: unknown ids read their shared row.
    """

    kind = "adaptive"

    def __init__(self, capacity: int, hash_bucket_size: int, dim: int, seed: int = 0, promote_freq: int = 3,
                 initializer: str = "truncated_normal", name: str = "embedding", shard: tuple[int, int] = (0, 1)):
        self.hash_bucket_size = _positive_int("hash_bucket_size", hash_bucket_size)
        self.promote_freq = _positive_int("promote_freq", promote_freq)
        # One of `count` shards (din_jax.owned_ids) holds the buckets b = index (mod count), bucket b as its b // count.
        self.shard_index, self.shard_count = shard
        self.local_buckets = -(-self.hash_bucket_size // self.shard_count)
        super().__init__(name, capacity, dim, seed, initializer, "share", self.promote_freq, _ExactCounts(),
                         _positive_int("capacity", capacity) + self.local_buckets)

    def bucket(self, ids: np.ndarray) -> np.ndarray:
        """Each id's hashed bucket among all hash_bucket_size of them: hash64(id) mod hash_bucket_size."""
        return (hash64(ids) % np.uint64(self.hash_bucket_size)).astype(np.int64)

    @staticmethod
    def shared_rows(buckets: np.ndarray, capacity: int, shards: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each hashed bucket when the table is `shards` shards of `capacity` own rows each: bucket b
        is shard b mod shards' row capacity + b // shards (one shard: row capacity + b)."""
        return buckets % shards, capacity + buckets // shards

    def _fallback(self, ids: np.ndarray) -> np.ndarray:
        return self.shared_rows(self.bucket(ids), self.capacity, self.shard_count)[1].astype(np.int32)

    def _init_sources(self, ids: np.ndarray) -> np.ndarray:
        return self._fallback(ids)

    def initial_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The shared rows (this shard's buckets), from default-matrix row hash64(bucket) mod 4096."""
        buckets = np.arange(self.shard_index, self.hash_bucket_size, self.shard_count)
        _, slots = self.shared_rows(buckets, self.capacity, self.shard_count)
        return slots.astype(np.int32), (-default_rows(buckets) - 1).astype(np.int32)


def table_state(arrays: Mapping[str, np.ndarray], table: str) -> dict[str, np.ndarray]:
    """One table's mapping state out of named arrays saved as 'embedding/<table>/<name>' (HostEmbeddings.state_dict,
    owned_ids.device_states, an export's embeddings.npz), by name; empty when none were saved."""
    prefix = f"embedding/{table}/"
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


KINDS: dict[str, type[IdMapping]] = {"dense": DenseVocabulary, "ev": EmbeddingVariable,
                                     "adaptive": AdaptiveEmbedding, "multihash": MultiHash,
                                     "dynamic": DynamicDimension}


def create(kind: str, **options) -> IdMapping:
    """The mapping of one embedding feature: create('ev', capacity=..., dim=..., filter='cbf', ...)."""
    if kind not in KINDS:
        raise ValueError(f"unknown embedding kind {kind!r}; choose one of {sorted(KINDS)}")
    cls = KINDS[kind]
    params = dict(inspect.signature(cls).parameters)
    if cls is DynamicDimension:
        params.pop("ev_options")
        params.update(inspect.signature(EmbeddingVariable).parameters)
    unknown = sorted(set(options) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options)
    if unknown or missing:
        raise ValueError(f"embedding kind {kind!r}: unknown options {unknown}, missing options {missing}; "
                         f"it takes {sorted(params)}")
    return cls(**options)
