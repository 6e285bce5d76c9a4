"""A seeded generator of Amazon-like raw data (McAuley review + meta files) with multi-interest users.

The files have the same fields and layout as the real `reviews_<Cat>_5.json.gz` (one JSON object a
line) and `meta_<Cat>.json.gz` (one Python-literal dict a line), so they go through the real DIEN
preparation (`input_pipeline.amazon`) unchanged. This is the built-in default's data source;
`input_pipeline.behavior_log` writes the same users' behaviour as a Taobao UserBehavior.csv
(`--format taobao --rows N`).

Why the history matters on it: every user holds `interests_per_user` unrelated interests (categories,
popular ones more often), one of them dominant. Each minor interest is mentioned `minor_mentions` times
among the earlier reviews and the dominant one fills the rest, but the user's last review - the positive
that DIEN's preparation turns into the labelled pair - comes from a minor interest with probability
`minor_last_prob`, and then often from the same item *series* as the earlier review of that interest
(books of a series, parts of a kit). So the signal is one or two history items among many: a plain
sum of the history is dominated by the major interest, while DIN's candidate-aware terms can pick the
related items out; and the series make item identity matter beyond the category. The negative of each
pair is a popularity-weighted random item (DIEN's rule), mostly unrelated to the user.
`python benchmarks/sweep.py --field model.attention --values softmax,none` measures the effect (README,
"What DIN's history modelling buys").

Why it is not learned perfectly: any review, the last included, is with probability `explore_prob` a
popular item of any category (real users wander), and a user reviews an item once (repeats are redrawn)
unless `repeat_prob` repeats one on purpose, as Taobao's page views do. `explore_prob` sets how far from
separable the labels are: one epoch of DIN reaches a test AUC of ~0.66 at 50k users and ~0.75 at Books
size (`benchmarks/generator_difficulty.py`), where real Books gives 0.70-0.77.
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

from input_pipeline import review_text
from input_pipeline.textio import atomic_write

FORMAT_VERSION = 2  # bump when the generator's output for a given spec and seed changes
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
    explore_prob: float = 0.2           # P(a review, the last included, is a popular item outside the interests)
    repeat_prob: float = 0.0            # P(a review repeats one of the user's earlier items)
    mean_reviews: float = 14.0          # mean reviews per user (5-core: at least 5)
    min_reviews: int = 5
    max_reviews: int = 120
    zipf_exponent: float = 1.1          # item popularity (global rank)
    category_zipf_exponent: float = 0.8  # how users' interests concentrate on popular categories

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
        for field in ("minor_last_prob", "same_series_prob", "explore_prob", "repeat_prob"):
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


def _catalogue(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[_ItemSampler, np.ndarray]:
    """The items (category, series, popularity) as a sampler, and the categories' weights as interests."""
    series_count = spec.num_items // spec.series_length
    series_category = np.concatenate([
        np.arange(spec.num_categories),  # every category holds at least one series
        rng.integers(0, spec.num_categories, series_count - spec.num_categories),
    ])
    item_series = np.repeat(np.arange(series_count), spec.series_length)
    item_series = np.concatenate([item_series, rng.integers(0, series_count, spec.num_items - len(item_series))])
    item_category = series_category[item_series]
    sampler = _ItemSampler(item_category, item_series, _zipf_weights(spec.num_items, spec.zipf_exponent, rng))
    return sampler, _zipf_weights(spec.num_categories, spec.category_zipf_exponent, rng)


def _zipf_weights(count: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Weights 1 / rank^exponent, ranks in random order."""
    return (1.0 / np.arange(1, count + 1) ** exponent)[rng.permutation(count)]


class _ItemSampler:
    """Draws popularity-weighted items (of all, or of a category) and items of a given series."""

    def __init__(self, item_category: np.ndarray, item_series: np.ndarray, popularity: np.ndarray):
        order = np.argsort(item_category, kind="stable")
        self.items_by_category = order
        self.category_start = np.searchsorted(item_category[order], np.arange(item_category.max() + 2))
        self.cumulative = np.cumsum(popularity[order])
        series_order = np.argsort(item_series, kind="stable")
        self.items_by_series = series_order
        self.series_start = np.searchsorted(item_series[series_order], np.arange(item_series.max() + 2))
        self.series_position = np.empty_like(series_order)
        self.series_position[series_order] = np.arange(len(series_order))
        self.item_category, self.item_series = item_category, item_series

    def from_categories(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One popularity-weighted item per entry of `categories`."""
        start, end = self.category_start[categories], self.category_start[categories + 1]
        low = np.where(start > 0, self.cumulative[np.maximum(start - 1, 0)], 0.0)
        high = self.cumulative[end - 1]
        position = np.searchsorted(self.cumulative, low + rng.random(len(categories)) * (high - low), side="right")
        return self.items_by_category[np.clip(position, start, end - 1)]

    def popular(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` popularity-weighted items of the whole catalogue."""
        position = np.searchsorted(self.cumulative, rng.random(count) * self.cumulative[-1], side="right")
        return self.items_by_category[np.minimum(position, len(self.cumulative) - 1)]

    def same_series(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per entry of `items`, another item of its series, uniformly drawn."""
        series = self.item_series[items]
        start, length = self.series_start[series], self.series_start[series + 1] - self.series_start[series]
        offset = self.series_position[items] - start + 1 + (rng.random(len(items)) * (length - 1)).astype(np.int64)
        return self.items_by_series[start + offset % length]

    def distinct_per_user(self, user: np.ndarray, items: np.ndarray, rng: np.random.Generator, rounds: int = 8) -> None:
        """Redraws an item a user already had uniformly from its category, a few rounds (a category may run out)."""
        for _ in range(rounds):
            order = np.argsort(user * len(self.item_category) + items, kind="stable")
            again = order[1:][(user[order[1:]] == user[order[:-1]]) & (items[order[1:]] == items[order[:-1]])]
            if not len(again):
                return
            start, end = (self.category_start[self.item_category[items[again]] + k] for k in (0, 1))
            items[again] = self.items_by_category[start + (rng.random(len(again)) * (end - start)).astype(np.int64)]


def _user_histories(spec: SyntheticSpec, rng: np.random.Generator, sampler: _ItemSampler, category_weights: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(user index, item index) of every review of `num_users` users, each user's reviews in time order."""
    low, high = spec.interests_per_user
    counts = np.clip(spec.min_reviews + rng.geometric(1.0 / (spec.mean_reviews - spec.min_reviews + 1),
                                                      num_users) - 1, spec.min_reviews, spec.max_reviews)
    num_interests = rng.integers(low, high + 1, num_users)
    # Distinct interests per user, popular categories more often; slot 0 is the dominant one.
    interests = _distinct_rows(rng, num_users, high, np.cumsum(category_weights))
    user = np.repeat(np.arange(num_users), counts)
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
    last_from_minor = rng.random(num_users) < spec.minor_last_prob
    slot[is_last] = np.where(last_from_minor, minor_slot[is_last], 0)
    items = sampler.from_categories(interests[user, slot], rng)
    _continue_series(spec, rng, sampler, user, slot, is_last, last_from_minor, items)

    # Exploration: any review, the last included, may be a popular item of any category. Then each
    # user's items are made distinct, and `repeat_prob` of the reviews repeat one on purpose.
    explore = rng.random(len(user)) < spec.explore_prob
    items[explore] = sampler.popular(int(explore.sum()), rng)
    sampler.distinct_per_user(user, items, rng)
    _repeat_earlier(rng.random(len(user)) < spec.repeat_prob, position, items, rng)
    return user, items


def _continue_series(spec: SyntheticSpec, rng: np.random.Generator, sampler: _ItemSampler, user: np.ndarray, slot: np.ndarray, is_last: np.ndarray, last_from_minor: np.ndarray,
                     items: np.ndarray) -> None:
    """A minor-interest last review usually continues a series the user already read in that interest."""
    last_index = np.flatnonzero(is_last)
    continuing = last_from_minor & (rng.random(len(last_index)) < spec.same_series_prob)
    candidate = ~is_last & continuing[user] & (slot == slot[last_index][user])
    keys = np.where(candidate, rng.random(len(user)), -1.0)  # a random earlier review of the interest per user
    pick = np.lexsort((keys, user))[last_index]  # each user's largest key: users are contiguous
    found = keys[pick] >= 0
    items[last_index[found]] = sampler.same_series(items[pick[found]], rng)


def _repeat_earlier(repeat: np.ndarray, position: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> None:
    """Each review marked `repeat` (but a user's first) takes the item of a uniformly drawn earlier review."""
    rows = np.flatnonzero(repeat & (position > 0))
    source = np.full(len(items), -1)
    source[rows] = rows - 1 - (rng.random(len(rows)) * position[rows]).astype(np.int64)
    root = source[rows]
    while (chained := source[root] >= 0).any():  # the source repeats too: follow it to an original review
        root[chained] = source[root[chained]]
    items[rows] = items[root]


def _rank_within_user(user: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank of each review's key among its user's reviews (users contiguous in `user`)."""
    order = np.lexsort((keys, user))
    starts = np.searchsorted(user[order], user[order], side="left")
    rank = np.empty(len(user), np.int64)
    rank[order] = np.arange(len(user)) - starts
    return rank


def _distinct_rows(rng: np.random.Generator, rows: int, width: int, cumulative: np.ndarray) -> np.ndarray:
    """`rows` rows of `width` distinct indices of `cumulative` (weights' cumsum), drawn by weight, collisions redrawn."""
    def draw(shape):
        return np.minimum(np.searchsorted(cumulative, rng.random(shape) * cumulative[-1], side="right"),
                          len(cumulative) - 1)

    draws = draw((rows, width))
    while True:
        ordered = np.sort(draws, axis=1)
        duplicate_rows = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if len(duplicate_rows) == 0:
            return draws
        draws[duplicate_rows] = draw((len(duplicate_rows), width))


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
    sampler, category_weights = _catalogue(spec, rng)
    user, items = _user_histories(spec, rng, sampler, category_weights, spec.num_users)

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
    meta_category = np.concatenate([sampler.item_category, extra_rng.integers(0, spec.num_categories, extra_meta_items)])
    texts = review_text.Texts(extra_rng) if text_bytes else None

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
        return "".join([review_text.rich_meta_line(asins, i, category_names[meta_category[i]], description)
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


def _define_flags() -> None:
    """One flag per SyntheticSpec field plus the output's; defined only when run as a program."""
    from absl import flags

    flags.DEFINE_string("out_dir", None, "Directory for the raw files.", required=True)
    flags.DEFINE_enum("format", "amazon", ["amazon", "taobao"],
                      "amazon: McAuley review + meta files; taobao: a UserBehavior.csv (input_pipeline.behavior_log).")
    flags.DEFINE_integer("rows", 100_150_807, "taobao: about this many rows, at Taobao's shape (the default: its size).")
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


def _write(args) -> str:
    """Writes the files the flags ask for; returns what was written, in words."""
    from input_pipeline import behavior_log

    values = {f.name: args[f.name].value for f in dataclasses.fields(SyntheticSpec)}
    values["interests_per_user"] = tuple(int(v) for v in values["interests_per_user"])
    if args.format == "amazon":
        paths = generate(args.out_dir, SyntheticSpec(**values), args.seed,
                         extra_meta_items=args.extra_meta_items, text_bytes=args.text_bytes)
        return f"{paths[0]} and {paths[1]}"
    given = {name: value for name, value in values.items() if args[name].present}  # the rest: Taobao's shape
    spec = behavior_log.taobao_spec(args.rows, **given)
    return f"{behavior_log.write_taobao(args.out_dir, spec, args.seed)} ({spec.num_users:,} users)"


def main(argv: list[str]) -> None:
    """Writes reviews_Synthetic_5.json.gz and meta_Synthetic.json.gz, or UserBehavior.csv, into --out_dir."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        start = time_module.perf_counter()
        written = _write(flags.FLAGS)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {written} in {time_module.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
