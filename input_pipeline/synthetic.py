"""A seeded generator of Amazon-like raw data (McAuley review + meta files) with multi-interest users.

The files have the same fields and layout as the real `reviews_<Cat>_5.json.gz` (one JSON object a
line) and `meta_<Cat>.json.gz` (one Python-literal dict a line), so they go through the real DIEN
preparation (`input_pipeline.amazon`) unchanged. This is the built-in default's data source.

Why the history matters on it: every user holds `interests_per_user` unrelated interests (categories),
one of them dominant. Each minor interest is mentioned `minor_mentions` times among the earlier
reviews and the dominant one fills the rest, but the user's last review - the positive that DIEN's
preparation turns into the labelled pair - comes from a minor interest with probability
`minor_last_prob`, and then often from the same item *series* as the earlier review of that interest
(books of a series, parts of a kit). So the signal is one or two history items among many: a plain
sum of the history is dominated by the major interest, while DIN's candidate-aware terms can pick the
related items out. The negative of each pair is a popularity-weighted random item (DIEN's rule),
mostly unrelated to the user. `python benchmarks/sweep.py --field model.attention --values softmax,none`
measures the effect (README, "What DIN's history modelling buys").
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import os
import sys
import time as time_module

import numpy as np

from input_pipeline.textio import atomic_write

FORMAT_VERSION = 1  # bump when the generator's output for a given spec and seed changes
REVIEWS_FILE = "reviews_Synthetic_5.json.gz"
META_FILE = "meta_Synthetic.json.gz"
_FIRST_REVIEW_TIME = 946_684_800  # 2000-01-01
_DAY = 86_400
_ID_ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and shape of the generated data; the defaults keep the default run to a few minutes."""

    num_users: int = 100_000
    num_items: int = 20_000
    num_categories: int = 400
    series_length: int = 6              # items per series; a series lives inside one category
    interests_per_user: tuple[int, int] = (2, 4)   # inclusive range
    minor_mentions: int = 1             # earlier reviews per minor interest; the rest are the dominant one
    minor_last_prob: float = 0.8        # P(the last review comes from a minor interest)
    same_series_prob: float = 0.8       # P(a minor-interest last review continues a series in the history)
    mean_reviews: float = 14.0          # mean reviews per user (5-core: at least 5)
    min_reviews: int = 5
    max_reviews: int = 120
    zipf_exponent: float = 1.1          # item popularity within a category

    def validate(self) -> None:
        """Raises ValueError naming the field when a size cannot produce a data set."""
        low, high = self.interests_per_user
        checks = {
            "num_users": self.num_users >= 2,
            "num_categories": self.num_categories >= high + 1,
            "num_items": self.num_items >= self.num_categories * self.series_length,
            "series_length": self.series_length >= 2,
            "interests_per_user": 2 <= low <= high,
            "min_reviews": 2 <= self.min_reviews <= self.mean_reviews <= self.max_reviews,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"synthetic.{field}={getattr(self, field)!r} cannot produce a data set; "
                                 "see SyntheticSpec in input_pipeline/synthetic.py for the constraints")
        if self.minor_mentions < 1:
            raise ValueError(f"synthetic.minor_mentions must be at least 1, got {self.minor_mentions}")
        for field in ("minor_last_prob", "same_series_prob"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"synthetic.{field} must lie in [0, 1], got {getattr(self, field)}")


def _codes(prefix: bytes, numbers: np.ndarray, width: int, salt: int) -> list[str]:
    """Distinct, Amazon-looking identifiers: `prefix` + base-36 digits of a bijective scramble of `numbers`."""
    modulus = 36 ** width  # width <= 12 keeps the arithmetic inside int64
    scrambled = (numbers.astype(np.int64) * 2_654_435_761 + 1_000_003 * (salt + 7)) % modulus  # odd multiplier: bijective mod 36^w
    digits = np.empty((len(numbers), width), dtype=np.uint8)
    for position in range(width - 1, -1, -1):
        digits[:, position] = _ID_ALPHABET[scrambled % 36]
        scrambled //= 36
    return [prefix.decode() + row.tobytes().decode() for row in digits]


def _catalogue(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: category, series and within-category popularity weight."""
    series_count = spec.num_items // spec.series_length
    series_category = np.concatenate([
        np.arange(spec.num_categories),  # every category holds at least one series
        rng.integers(0, spec.num_categories, series_count - spec.num_categories),
    ])
    item_series = np.repeat(np.arange(series_count), spec.series_length)
    item_series = np.concatenate([item_series, rng.integers(0, series_count, spec.num_items - len(item_series))])
    item_category = series_category[item_series]
    popularity = 1.0 / np.arange(1, spec.num_items + 1) ** spec.zipf_exponent
    return item_category, item_series, popularity[rng.permutation(spec.num_items)]


class _ItemSampler:
    """Draws popularity-weighted items from a category, and items of a given series."""

    def __init__(self, item_category: np.ndarray, item_series: np.ndarray, popularity: np.ndarray):
        order = np.argsort(item_category, kind="stable")
        self.items_by_category = order
        self.category_start = np.searchsorted(item_category[order], np.arange(item_category.max() + 2))
        self.cumulative = np.cumsum(popularity[order])
        series_order = np.argsort(item_series, kind="stable")
        self.items_by_series = series_order
        self.series_start = np.searchsorted(item_series[series_order], np.arange(item_series.max() + 2))

    def from_categories(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One popularity-weighted item per entry of `categories`."""
        start, end = self.category_start[categories], self.category_start[categories + 1]
        low = np.where(start > 0, self.cumulative[np.maximum(start - 1, 0)], 0.0)
        high = self.cumulative[end - 1]
        position = np.searchsorted(self.cumulative, low + rng.random(len(categories)) * (high - low), side="right")
        return self.items_by_category[np.clip(position, start, end - 1)]

    def from_series(self, series: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn item per entry of `series`."""
        start, end = self.series_start[series], self.series_start[series + 1]
        return self.items_by_series[start + (rng.random(len(series)) * (end - start)).astype(np.int64)]


def _user_histories(spec: SyntheticSpec, rng: np.random.Generator, sampler: _ItemSampler,
                    item_series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user index, item index) of every review, each user's reviews in time order."""
    low, high = spec.interests_per_user
    counts = np.clip(spec.min_reviews + rng.geometric(1.0 / (spec.mean_reviews - spec.min_reviews + 1),
                                                      spec.num_users) - 1, spec.min_reviews, spec.max_reviews)
    num_interests = rng.integers(low, high + 1, spec.num_users)
    # Distinct interests per user; slot 0 is the dominant one, slots 1..num_interests-1 the minor ones.
    interests = _distinct_rows(rng, spec.num_users, high, spec.num_categories)
    user = np.repeat(np.arange(spec.num_users), counts)
    first = np.cumsum(counts) - counts
    position = np.arange(len(user)) - first[user]
    is_last = position == counts[user] - 1

    # Earlier reviews: each minor interest is mentioned `minor_mentions` times at random positions
    # (fewer when the history is too short); all other earlier reviews are the dominant interest.
    minors = num_interests[user] - 1
    rank = _rank_within_user(user, rng.random(len(user)) + is_last)  # the last review ranks last
    mentioned = (rank < minors * spec.minor_mentions) & ~is_last
    minor_slot = 1 + (rng.random(len(user)) * minors).astype(np.int64)
    slot = np.where(mentioned, 1 + rank % np.maximum(minors, 1), 0)
    last_from_minor = rng.random(spec.num_users) < spec.minor_last_prob
    slot[is_last] = np.where(last_from_minor, minor_slot[is_last], 0)
    items = sampler.from_categories(interests[user, slot], rng)

    # A minor-interest last review usually continues a series the user already read in that interest.
    last_index = np.flatnonzero(is_last)
    continue_series = last_from_minor & (rng.random(spec.num_users) < spec.same_series_prob)
    for u in np.flatnonzero(continue_series):
        lo, hi = first[u], last_index[u]
        earlier = np.flatnonzero(slot[lo:hi] == slot[hi])
        if len(earlier):
            series = item_series[items[lo + earlier[rng.integers(len(earlier))]]]
            items[hi] = sampler.from_series(np.array([series]), rng)[0]
    return user, items


def _rank_within_user(user: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank of each review's key among its user's reviews (users contiguous in `user`)."""
    order = np.lexsort((keys, user))
    starts = np.searchsorted(user[order], user[order], side="left")
    rank = np.empty(len(user), np.int64)
    rank[order] = np.arange(len(user)) - starts
    return rank


def _distinct_rows(rng: np.random.Generator, rows: int, width: int, upper: int) -> np.ndarray:
    """`rows` rows of `width` distinct integers in [0, upper), vectorised by redrawing collisions."""
    draws = rng.integers(0, upper, (rows, width))
    while True:
        ordered = np.sort(draws, axis=1)
        duplicate_rows = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if len(duplicate_rows) == 0:
            return draws
        draws[duplicate_rows] = rng.integers(0, upper, (len(duplicate_rows), width))


def generate(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0, *,
             extra_meta_items: int = 0, text_bytes: int = 0) -> tuple[str, str]:
    """Writes the review and meta files into `out_dir`; returns their paths. Same spec + seed, same bytes.

    `extra_meta_items` adds meta lines of items nobody reviewed (Amazon's meta files describe far more
    items than the 5-core reviews mention). `text_bytes` > 0 gives each review a `reviewText` and each
    item a `description` of about that many bytes on average, plus `related` lists and a `salesRank`,
    so the files have the size of real ones; 0 keeps the short fixed texts. Neither changes the
    reviews, items or categories drawn.
    """
    spec.validate()
    if extra_meta_items < 0 or text_bytes < 0:
        raise ValueError(f"extra_meta_items ({extra_meta_items}) and text_bytes ({text_bytes}) must be >= 0")
    rng = np.random.default_rng(seed)
    item_category, item_series, popularity = _catalogue(spec, rng)
    sampler = _ItemSampler(item_category, item_series, popularity)
    user, items = _user_histories(spec, rng, sampler, item_series)

    num_meta = spec.num_items + extra_meta_items
    asins = _codes(b"B", np.arange(num_meta), 9, salt=seed)
    reviewer_ids = _codes(b"A", np.arange(spec.num_users), 12, salt=seed + 1)
    category_names = [f"Topic {c // 20:02d} Subject {c:04d}" for c in range(spec.num_categories)]

    # Review times: per user a random start, then increasing gaps; some equal times (same day) on purpose.
    gaps = rng.integers(0, 60, len(user)) * _DAY
    starts = _FIRST_REVIEW_TIME + rng.integers(0, 3_000, spec.num_users) * _DAY
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    cumulative = np.cumsum(gaps)
    times = starts[user] + cumulative - cumulative[first][user]
    ratings = rng.integers(1, 6, len(user))

    # Drawn from their own generator, so the data above does not depend on these options.
    extra_rng = np.random.default_rng([seed, 1])
    meta_category = np.concatenate([item_category, extra_rng.integers(0, spec.num_categories, extra_meta_items)])
    texts = _Texts(extra_rng) if text_bytes else None

    # Real files are not grouped by user: write reviews in item order, as McAuley's dumps are.
    order = np.lexsort((times, items))
    os.makedirs(out_dir, exist_ok=True)
    reviews_path = os.path.join(out_dir, REVIEWS_FILE)
    meta_path = os.path.join(out_dir, META_FILE)
    days = (times - _FIRST_REVIEW_TIME) // _DAY
    dates = [time_module.strftime("%m %d, %Y", time_module.gmtime(_FIRST_REVIEW_TIME + d * _DAY))
             for d in range(int(days.max()) + 1)]

    def review_lines(rows: slice) -> str:
        index = order[rows]
        text = texts.pieces(len(index), text_bytes) if texts else ["Synthetic review."] * len(index)
        return "".join([
            '{"reviewerID": "%s", "asin": "%s", "reviewerName": "Reader %d", "helpful": [0, 0], '
            '"reviewText": "%s", "overall": %d.0, "summary": "synthetic", '
            '"unixReviewTime": %d, "reviewTime": "%s"}\n'
            % (reviewer_ids[u], asins[i], u, x, r, t, dates[d])
            for u, i, r, t, d, x in zip(user[index].tolist(), items[index].tolist(), ratings[index].tolist(),
                                        times[index].tolist(), days[index].tolist(), text)])

    def meta_lines(rows: slice) -> str:
        numbers = range(num_meta)[rows]
        if not texts:
            return "".join([
                "{'asin': '%s', 'title': 'Item %d', 'price': %.2f, 'categories': [['Books', '%s']]}\n"
                % (asins[i], i, 5 + (i % 50), category_names[meta_category[i]]) for i in numbers])
        return "".join([_rich_meta_line(asins, i, category_names[meta_category[i]], description)
                        for i, description in zip(numbers, texts.pieces(len(numbers), text_bytes, python=True))])

    _write_gzip(reviews_path, review_lines, len(order))
    _write_gzip(meta_path, meta_lines, num_meta)
    return reviews_path, meta_path


_CHUNK_LINES = 200_000  # lines formatted and compressed at a time, so memory stays bounded


def _write_gzip(path: str, lines, count: int) -> None:
    """Writes `lines(rows)` for consecutive row slices as gzip members, compressed on two threads."""
    slices = [slice(start, start + _CHUNK_LINES) for start in range(0, count, _CHUNK_LINES)] or [slice(0, 0)]
    with atomic_write(path) as f, concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending: collections.deque = collections.deque()
        for rows in slices:  # zlib releases the GIL: the next chunk is formatted while two compress
            pending.append(pool.submit(gzip.compress, lines(rows).encode(), 1, mtime=0))
            if len(pending) > 2:
                f.write(pending.popleft().result())
        for member in pending:
            f.write(member.result())


class _Texts:
    """Review and description texts: runs of pseudo-words, a few with quotes and accents."""

    def __init__(self, rng: np.random.Generator, words: int = 4_000, pool_words: int = 400_000):
        letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
        lengths = rng.integers(1, 10, words)
        vocabulary = [letters[rng.integers(0, 26, n)].tobytes().decode() for n in lengths.tolist()]
        vocabulary[:4] = ["it's", 'a "quoted" one', "caf\\u00e9", "well,"]
        drawn = rng.zipf(1.3, pool_words) % words
        self.json_pool = " ".join(vocabulary[w].replace('"', '\\"') for w in drawn.tolist()) + " "
        self.python_pool = " ".join(vocabulary[w].replace("'", "\\'").replace("\\u00e9", "\\xe9")
                                    for w in drawn.tolist()) + " "
        self.json_starts = _word_starts(self.json_pool)
        self.python_starts = _word_starts(self.python_pool)
        self.rng = rng

    def pieces(self, count: int, mean_bytes: int, python: bool = False) -> list[str]:
        """`count` texts of whole words, lengths exponential around `mean_bytes`, JSON- or Python-escaped."""
        pool, starts = (self.python_pool, self.python_starts) if python else (self.json_pool, self.json_starts)
        lengths = np.minimum(self.rng.exponential(mean_bytes, count).astype(np.int64) + 1, len(pool) // 2)
        begin = starts[self.rng.integers(0, np.searchsorted(starts, len(pool) // 2), count)]
        end = starts[np.searchsorted(starts, begin + lengths)] - 1  # the space before the next word
        return [pool[b:e] for b, e in zip(begin.tolist(), end.tolist())]


def _word_starts(pool: str) -> np.ndarray:
    """Offsets of the words of a space-separated pool."""
    spaces = np.flatnonzero(np.frombuffer(pool.encode(), dtype=np.uint8) == ord(" "))
    return np.r_[0, spaces + 1]


def _rich_meta_line(asins: list[str], item: int, category: str, description: str) -> str:
    """A meta line shaped like the real ones: related items, sales rank, categories before or after the text."""
    related = ", ".join("'%s'" % asins[(item * 7919 + k * 104_729) % len(asins)] for k in range(1 + item % 40))
    categories = "'categories': [['Books', '%s']]" % category
    head, tail = (categories + ", ", "") if item % 2 else ("", ", " + categories)
    return ("{'asin': '%s', %s'related': {'also_bought': [%s]}, 'title': 'Item %d', 'price': %.2f, "
            "'salesRank': {'Books': %d}, 'description': '%s'%s}\n"
            % (asins[item], head, related, item, 5 + (item % 50), 1 + item * 31 % 1_000_000, description, tail))


def _define_flags() -> None:
    """One flag per SyntheticSpec field plus --out_dir and --seed; defined only when run as a program."""
    from absl import flags

    flags.DEFINE_string("out_dir", None, "Directory for the raw review and meta files.", required=True)
    flags.DEFINE_integer("seed", 0, "Generator seed: the same spec and seed give the same bytes.")
    flags.DEFINE_integer("extra_meta_items", 0, "Meta lines of unreviewed items (Books: 2.3M meta, 368k reviewed).")
    flags.DEFINE_integer("text_bytes", 0, "Mean reviewText / description length, for real file sizes (0: short texts).")
    for field in dataclasses.fields(SyntheticSpec):
        default = field.default
        if isinstance(default, tuple):
            flags.DEFINE_list(field.name, [str(v) for v in default], f"SyntheticSpec.{field.name} (low,high).")
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, f"SyntheticSpec.{field.name}.")
        else:
            flags.DEFINE_integer(field.name, default, f"SyntheticSpec.{field.name}.")


def main(argv: list[str]) -> None:
    """Writes reviews_Synthetic_5.json.gz and meta_Synthetic.json.gz into --out_dir."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(SyntheticSpec)}
    values["interests_per_user"] = tuple(int(v) for v in values["interests_per_user"])
    try:
        spec = SyntheticSpec(**values)
        start = time_module.perf_counter()
        paths = generate(flags.FLAGS.out_dir, spec, flags.FLAGS.seed,
                         extra_meta_items=flags.FLAGS.extra_meta_items, text_bytes=flags.FLAGS.text_bytes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {paths[0]} and {paths[1]} in {time_module.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
