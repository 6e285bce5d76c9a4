"""Behaviour statistics of real and generated logs side by side, to calibrate the built-in generator against.

  python benchmarks/data_stats.py --taobao=../shared/data/taobao/UserBehavior_815users.csv,gen/UserBehavior.csv
  python benchmarks/data_stats.py --amazon_dirs=prepared_instruments,prepared_synthetic --users=1429

Inputs: Taobao UserBehavior files (user,item,category,behavior,timestamp; `--behavior` rows only, pv by
default, as `input_pipeline.taobao` takes positives) and directories prepared by `input_pipeline.amazon`
(their `reviews-info` holds every review, `item-info` every meta item's category). `--users=N` keeps each
input's first N users (in file order), so samples of equal size are compared: the item-popularity slope
and the categories seen depend on the sample's size.

Printed per input (a Markdown table row): users, events, events per user (mean, median, 10th / 90th
percentile, max), the item popularity Zipf exponent (slope of log count over log rank, items seen at least
twice), distinct categories per user, the share of a user's events in their top category, and the repeat
rate (events whose item the user already had).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from absl import app, flags

flags.DEFINE_list("taobao", [], "Taobao UserBehavior files.")
flags.DEFINE_list("amazon_dirs", [], "Directories prepared by input_pipeline.amazon (reviews-info, item-info).")
flags.DEFINE_list("behavior", ["pv"], "Taobao behaviour types counted as events.")
flags.DEFINE_integer("users", 0, "Keep each input's first N users (0: all).")


def _read_csv(path: str, names: list[str], delimiter: str, types: dict) -> pa.Table:
    """A header-less delimited file as a table of the named columns; a cut-off last line is skipped."""
    return pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(column_names=names),
                           parse_options=pa_csv.ParseOptions(delimiter=delimiter, quote_char=False,
                                                             invalid_row_handler=lambda row: "skip"),
                           convert_options=pa_csv.ConvertOptions(column_types=types))


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer codes of a column's values, in order of first appearance."""
    return column.combine_chunks().dictionary_encode().indices.to_numpy().astype(np.int64)


def taobao_events(path: str) -> tuple[np.ndarray, ...]:
    """(user, item, category, time) codes of the chosen behaviour rows of a UserBehavior file."""
    table = _read_csv(path, ["user", "item", "category", "behavior", "time"], ",",
                      {"behavior": pa.string(), "time": pa.int64()})
    table = table.filter(pc.is_in(table["behavior"], pa.array(flags.FLAGS.behavior)))
    return (_codes(table["user"]), _codes(table["item"]), _codes(table["category"]),
            table["time"].to_numpy())


def amazon_events(directory: str) -> tuple[np.ndarray, ...]:
    """(user, item, category, time) codes of every review of a prepared Amazon directory."""
    reviews = _read_csv(os.path.join(directory, "reviews-info"), ["user", "item", "rating", "time"], "\t",
                        {"user": pa.string(), "item": pa.string(), "time": pa.int64()})
    item_category = np.full(reviews.num_rows, -1)  # no meta: no categories
    info_path = os.path.join(directory, "item-info")
    if os.path.getsize(info_path):
        info = _read_csv(info_path, ["item", "category"], "\t", {"item": pa.string(), "category": pa.string()})
        category = pc.index_in(info["category"], info["category"].unique())
        item_category = category.take(pc.index_in(reviews["item"], info["item"])).fill_null(-1).to_numpy()
    return (_codes(reviews["user"]), _codes(reviews["item"]), item_category.astype(np.int64),
            reviews["time"].to_numpy())


def statistics(user: np.ndarray, item: np.ndarray, category: np.ndarray, time: np.ndarray) -> dict:
    """The calibration statistics of one log (codes as `taobao_events` returns them)."""
    if flags.FLAGS.users:
        keep = user < flags.FLAGS.users  # codes count users in order of first appearance
        user, item, category, time = user[keep], item[keep], category[keep], time[keep]
    order = np.lexsort((time, user))
    user, item, category = user[order], item[order], category[order]
    events = np.bincount(user)
    events = events[events > 0]
    counts = np.sort(np.bincount(item))[::-1]
    counts = counts[counts >= 2]
    slope = -np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0] if len(counts) > 2 else np.nan
    user_category, per_pair = np.unique(user * (category.max() + 2) + category + 1, return_counts=True)
    top = np.maximum.reduceat(per_pair, np.r_[0, np.flatnonzero(np.diff(user_category // (category.max() + 2))) + 1])
    first_seen = np.unique(user * (item.max() + 1) + item).size
    return {"users": len(events), "events": len(user), "mean": events.mean(), "median": np.median(events),
            "p10": np.percentile(events, 10), "p90": np.percentile(events, 90), "max": events.max(),
            "zipf": slope, "categories_per_user": len(user_category) / len(events),
            "top_category_share": top.sum() / len(user), "repeat_rate": 1 - first_seen / len(user)}


def main(argv: list[str]) -> None:
    """Prints one Markdown table row per input."""
    del argv
    print("| data | users | events | events/user mean / median / p10 / p90 / max | item Zipf exponent "
          "| categories/user | top-category share | repeat rate |")
    print("|---|---|---|---|---|---|---|---|")
    inputs = [(path, taobao_events) for path in flags.FLAGS.taobao]
    inputs += [(path, amazon_events) for path in flags.FLAGS.amazon_dirs]
    for path, read in inputs:
        s = statistics(*read(path))
        print(f"| {path} | {s['users']:,} | {s['events']:,} | {s['mean']:.1f} / {s['median']:.0f} / {s['p10']:.0f} / "
              f"{s['p90']:.0f} / {s['max']:,} | {s['zipf']:.2f} | {s['categories_per_user']:.1f} | "
              f"{s['top_category_share']:.2f} | {s['repeat_rate']:.3f} |")


if __name__ == "__main__":
    app.run(main)
