"""Taobao-format behaviour logs (`UserBehavior.csv`) from the built-in generator, at any size up to Taobao's.

`write_taobao(out_dir, taobao_spec(rows))` writes `user_id,item_id,category_id,behavior_type,timestamp`
lines, no header, grouped by user and in time order within a user, as Alibaba's file is; it goes through
`input_pipeline.taobao` unchanged. The users' item choices are those of `input_pipeline.synthetic`
(interests, series, exploration, repeats); on top of them each row gets a behaviour type in Taobao's shares
(pv 89.5%, cart 5.5%, fav 2.9%, buy 2.1%), a cart/fav/buy row is an item the user met earlier, each user's
last row is a pv, and times are spread over Taobao's nine days (2017-11-25 to 2017-12-03, China time).
Ids are integers scattered over [1, 5.2M) as Taobao's are.

Speed and memory: users are generated in chunks of `chunk_users` with vectorised numpy and written by
pyarrow's CSV writer, so memory is the catalogue (about 60 bytes per item) plus one chunk (about 120 bytes
per row), whatever the number of rows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from input_pipeline import synthetic
from input_pipeline.textio import atomic_write

TAOBAO_FILE = "UserBehavior.csv"
TAOBAO_ROWS = 100_150_807
BEHAVIORS = ("pv", "cart", "fav", "buy")
BEHAVIOR_SHARES = (0.895, 0.055, 0.029, 0.021)  # the public UserBehavior statistics
_FIRST_TIME, _LAST_TIME = 1_511_539_200, 1_512_316_799  # 2017-11-25 00:00 to 2017-12-03 23:59, UTC+8
_ID_SPACE = 5_200_000  # Taobao's item and category ids lie below 5.2M

# Taobao's sizes: 987,994 users with 101.4 rows each, 4,162,024 items, 9,439 categories; a user's rows
# spread over ~24 categories (the first 815 users of the real file), about a fifth of pv rows repeat an item.
TAOBAO_SPEC = synthetic.SyntheticSpec(
    num_users=987_994, num_items=4_162_024, num_categories=9_439, series_length=8, interests_per_user=(4, 12),
    minor_mentions=20, explore_prob=0.25, repeat_prob=0.2, mean_reviews=101.37, min_reviews=8, max_reviews=1_000,
    zipf_exponent=0.8, category_zipf_exponent=0.8)


def taobao_spec(rows: int = TAOBAO_ROWS, **fields) -> synthetic.SyntheticSpec:
    """TAOBAO_SPEC with `fields`, scaled to about `rows` rows unless `fields` give the sizes.

    Users scale with the rows; items and categories with their square root, as in samples of Taobao's users
    (its first 815 users met 55k items in 2,914 categories), so a small log's users still find distinct items.
    """
    if rows < 100:
        raise ValueError(f"rows must be at least 100, got {rows}")
    fraction = rows / TAOBAO_ROWS
    spec = dataclasses.replace(TAOBAO_SPEC, **fields)
    scaled = dataclasses.replace(
        spec, num_users=max(round(rows / mean_rows(spec)), 2),
        num_categories=max(round(spec.num_categories * fraction ** 0.5), spec.interests_per_user[1] + 1),
        num_items=max(round(spec.num_items * fraction ** 0.5), 2_000))
    return dataclasses.replace(scaled, **fields)


def mean_rows(spec: synthetic.SyntheticSpec) -> float:
    """Expected rows per user: min_reviews - 1 plus a geometric count capped at max_reviews - min_reviews + 1."""
    p = 1.0 / (spec.mean_reviews - spec.min_reviews + 1)
    return spec.min_reviews - 1 + (1 - (1 - p) ** (spec.max_reviews - spec.min_reviews + 1)) / p


def write_taobao(out_dir: str | os.PathLike, spec: synthetic.SyntheticSpec = TAOBAO_SPEC, seed: int = 0, *,
                 chunk_users: int = 20_000) -> str:
    """Writes `out_dir`/UserBehavior.csv for `spec` and returns its path. Same spec, seed and chunk, same bytes."""
    spec.validate()
    rng = np.random.default_rng(seed)
    sampler, category_weights = synthetic._catalogue(spec, rng)
    item_ids = _scattered_ids(spec.num_items, rng)
    category_ids = _scattered_ids(spec.num_categories, rng)
    behaviors = pa.array(BEHAVIORS)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TAOBAO_FILE)
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none", batch_size=1 << 16)
    with atomic_write(path) as f, pa_csv.CSVWriter(f, _SCHEMA, write_options=options) as writer:
        for first_user in range(0, spec.num_users, chunk_users):
            users = min(chunk_users, spec.num_users - first_user)
            user, items = synthetic._user_histories(spec, rng, sampler, category_weights, users)
            behavior, times = _behaviors_and_times(user, items, rng)
            writer.write_table(pa.table([
                pa.array(user + first_user + 1), pa.array(item_ids[items]), pa.array(category_ids[sampler.item_category[items]]),
                behaviors.take(pa.array(behavior)), pa.array(times)], schema=_SCHEMA))
    return path


_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("category_id", pa.int64()),
                     ("behavior_type", pa.string()), ("timestamp", pa.int64())])


def _scattered_ids(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct ids drawn from [1, max(5.2M, count)], in random order."""
    return rng.choice(max(_ID_SPACE, count), count, replace=False).astype(np.int64) + 1


def _behaviors_and_times(user: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row a behaviour index (non-pv rows take an earlier item of the user; last rows are pv) and a time."""
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    position = np.arange(len(user)) - first[user]
    is_last = np.r_[np.diff(user) != 0, True]
    behavior = np.searchsorted(np.cumsum(BEHAVIOR_SHARES), rng.random(len(user)) * sum(BEHAVIOR_SHARES), side="right")
    behavior = np.where(is_last, 0, np.minimum(behavior, len(BEHAVIORS) - 1)).astype(np.int8)
    synthetic._repeat_earlier(behavior > 0, position, items, rng)
    times = rng.integers(_FIRST_TIME, _LAST_TIME + 1, len(user))
    return behavior, times[np.lexsort((times, user))]
