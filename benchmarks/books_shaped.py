"""Data for the peer benchmarks: an in-memory split shaped like Amazon Books, and the built-in learnable data.

`books_shaped_split` is for throughput: no signal, but the sizes that set a DIN step's cost on DeepRec's
benchmark data (DIEN's Books preparation): embedding tables of 543,060 users, 367,983 items (id 0 =
`default_mid`) and 1,601 categories (id 0 = `default_cat`); one (negative, positive) pair per user, labels
0, 1, 0, 1, ...; item popularity and history lengths drawn as below (Books' short histories, or long ones like
real behaviour logs). `learnable_split` is the project's own built-in data (configs/default.py: generated,
then prepared the DIEN way), for comparing test AUC.

Needs only numpy and input_pipeline, so the peer frameworks' interpreters can import it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from input_pipeline import datasets, dien
from input_pipeline.synthetic import SyntheticSpec

# Vocabulary sizes of DeepRec's prepared Books data (uid_voc, mid_voc, cat_voc).
BOOKS_VOCAB_SIZES = {"uid": 543_060, "mid": 367_983, "cat": 1_601}
BOOKS_TRAIN_PAIRS = 543_060  # one (negative, positive) pair per train user: 1,086,120 train lines

# Item popularity: P(item of frequency rank r) ~ r^-0.5 over the 367,982 real items. Vocabularies are
# ordered most frequent first, so rank r is id r. Exponent 0.5 gives the most popular item ~0.08% of all
# mentions and the least popular ~12 of Books' 8.9M 5-core reviews (>= 5, as the 5-core filter requires).
ITEM_ZIPF_EXPONENT = 0.5
# An item's category: P(category rank c) ~ c^-1 over the 1,600 real categories.
CATEGORY_ZIPF_EXPONENT = 1.0


@dataclasses.dataclass(frozen=True)
class HistoryShape:
    """History lengths = minimum + floor(lognormal(log_mu, log_sigma)), clipped to [1, maximum]."""

    minimum: int
    log_mu: float
    log_sigma: float
    maximum: int


# Books (5-core users have >= 5 reviews and the last is the labelled one, so histories start at 4; the
# lognormal gives the long right tail of review counts): mean 13.9, median 10 (Books: 8.9M reviews / 604k
# users = 14.8 per user, one of them the target); 2.3% of histories are longer than max_seq_length = 50,
# 0.3% reach the clip at 100. A batch of 512 truncated to 50 uses ~27% of its 25.6k positions.
BOOKS_HISTORY = HistoryShape(minimum=4, log_mu=1.85, log_sigma=1.0, maximum=100)
# Real behaviour logs (issue 15: held-out DIEN-format data, mean history 154 entries, 65% of samples with
# >= 50): mean 154, median 76, 65% >= 50; truncated to 50, a batch uses ~84% of its positions.
LONG_HISTORY = HistoryShape(minimum=4, log_mu=4.29, log_sigma=1.2, maximum=5000)
HISTORY_SHAPES = {"books": BOOKS_HISTORY, "long": LONG_HISTORY}


def _zipf_sampler(num: int, exponent: float, rng: np.random.Generator):
    """A function drawing ids 1..num with P(id = r) ~ r^-exponent (inverse-CDF lookup)."""
    cdf = np.cumsum(np.arange(1, num + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return lambda size: (np.searchsorted(cdf, rng.random(size), side="right") + 1).astype(np.int32)


def history_lengths(num: int, rng: np.random.Generator, shape: HistoryShape = BOOKS_HISTORY) -> np.ndarray:
    """`num` history lengths drawn as `shape` says; int64 [num]."""
    lengths = shape.minimum + np.floor(rng.lognormal(shape.log_mu, shape.log_sigma, num))
    return np.clip(lengths, 1, shape.maximum).astype(np.int64)


def books_shaped_split(num_pairs: int = BOOKS_TRAIN_PAIRS, seed: int = 0,
                       vocab_sizes: dict[str, int] = BOOKS_VOCAB_SIZES,
                       history: HistoryShape = BOOKS_HISTORY) -> dien.EncodedSplit:
    """`num_pairs` users' (negative, positive) pairs with Books' vocabulary sizes and popularity, and `history`'s
    lengths (Books' by default)."""
    if not 1 <= num_pairs <= vocab_sizes["uid"]:
        raise ValueError(f"num_pairs must be in [1, {vocab_sizes['uid']}] (one pair per user), got {num_pairs}")
    rng = np.random.default_rng(seed)
    draw_item = _zipf_sampler(vocab_sizes["mid"] - 1, ITEM_ZIPF_EXPONENT, rng)
    item_category = np.zeros(vocab_sizes["mid"], np.int32)  # default_mid -> default_cat
    item_category[1:] = _zipf_sampler(vocab_sizes["cat"] - 1, CATEGORY_ZIPF_EXPONENT, rng)(vocab_sizes["mid"] - 1)

    users = rng.permutation(vocab_sizes["uid"])[:num_pairs].astype(np.int32)
    lengths = history_lengths(num_pairs, rng, history)
    pair_offsets = np.concatenate([[0], np.cumsum(lengths)])
    pair_history = draw_item(int(pair_offsets[-1]))          # one history per pair, shared by its two lines
    candidates = draw_item(2 * num_pairs)                     # negative then positive, both popularity-weighted

    # Both lines of a pair repeat the pair's history: line 2p and 2p+1 read pair p's run.
    line_lengths = np.repeat(lengths, 2)
    offsets = np.concatenate([[0], np.cumsum(line_lengths)])
    pair_starts = np.repeat(pair_offsets[:-1], 2)
    gather = np.repeat(pair_starts - offsets[:-1], line_lengths) + np.arange(offsets[-1])
    hist_mids = pair_history[gather]
    return dien.EncodedSplit.from_offsets(
        offsets,
        label=np.tile(np.array([0.0, 1.0], np.float32), num_pairs),
        uid=np.repeat(users, 2),
        mid=candidates,
        cat=item_category[candidates],
        hist_mids=hist_mids,
        hist_cats=item_category[hist_mids],
        user=np.repeat(np.arange(num_pairs, dtype=np.int32), 2),
    )


@dataclasses.dataclass(frozen=True)
class LearnableData:
    """The built-in data, prepared: vocabulary sizes and the encoded train and test splits."""

    data_dir: str
    vocab_sizes: dict[str, int]
    train: dien.EncodedSplit
    test: dien.EncodedSplit


def prepare_learnable(data_dir: str, num_users: int = 100_000, seed: int = 0, prepare_seed: int = 3) -> str:
    """Generates and prepares the built-in data (configs/default.py's spec and seeds) in `data_dir` once."""
    return datasets.builtin_data_dir(data_dir, SyntheticSpec(num_users=num_users), seed, prepare_seed)


def learnable_split(data_dir: str) -> LearnableData:
    """The prepared built-in data in `data_dir` (see `prepare_learnable`), encoded and cached."""
    vocabs = dien.load_vocabularies(data_dir)
    return LearnableData(data_dir, vocabs.sizes, dien.load_split(data_dir, "train", vocabs),
                         dien.load_split(data_dir, "test", vocabs))
