"""Data preparation at Amazon Books scale: reviews/s and peak memory, against line-by-line Python.

Generates (once, kept under --data_dir) raw files of Books' size with input_pipeline.synthetic:
603k users, 368k reviewed items, ~8.9M reviews, 2.3M meta lines, review texts and item descriptions
of real length (--text_bytes), gzip-compressed. Then it times `python -m input_pipeline.amazon` on
them in a subprocess (wall time, and the peak RSS the kernel recorded for it), and times the
straightforward implementation below - gzip.open, json.loads / ast.literal_eval per line, dicts,
sorted() per user, the same outputs - on the files' first --reference_reviews reviews and the same
fraction of the meta lines, scaled to the full size per review. Both read the same compressed files,
so decompression counts for both.

    python benchmarks/prepare.py                      # Books scale (generating takes ~2-3 minutes once)
    python benchmarks/prepare.py --num_users 20000 --num_items 12000 --extra_meta_items 60000  # a quick look
"""

from __future__ import annotations

import ast
import collections
import gzip
import json
import os
import pickle
import random
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import synthetic  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("data_dir", "/tmp/din_prepare_bench", "Where the raw files are generated (kept) and prepared.")
flags.DEFINE_integer("num_users", 603_000, "Users (Amazon Books 5-core: 603,668).")
flags.DEFINE_integer("num_items", 368_000, "Reviewed items (Books 5-core: 367,982).")
flags.DEFINE_integer("num_categories", 1_600, "Categories (DIEN's Books cat_voc: 1,601).")
flags.DEFINE_float("mean_reviews", 14.74, "Mean reviews per user (Books 5-core: 8,898,041 / 603,668).")
flags.DEFINE_integer("extra_meta_items", 1_932_000, "Meta lines of unreviewed items (Books meta: ~2.3M lines).")
flags.DEFINE_integer("text_bytes", 750, "Mean reviewText / description length.")
flags.DEFINE_enum("format", "text", ["text", "parquet"], "Sample file format of the timed preparation.")
flags.DEFINE_integer("reference_reviews", 300_000, "Reviews the line-by-line reference reads (0: skip it).")
flags.DEFINE_integer("seed", 3, "Preparation seed.")


def raw_files(args) -> tuple[str, str]:
    """The generated review and meta files, generated unless the same recipe is already there."""
    recipe = {name: getattr(args, name) for name in
              ("num_users", "num_items", "num_categories", "mean_reviews", "extra_meta_items", "text_bytes")}
    recipe["version"] = synthetic.FORMAT_VERSION
    raw = os.path.join(args.data_dir, "raw")
    marker = os.path.join(raw, "recipe.json")
    paths = (os.path.join(raw, synthetic.REVIEWS_FILE), os.path.join(raw, synthetic.META_FILE))
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == recipe:
                return paths
    spec = synthetic.SyntheticSpec(num_users=args.num_users, num_items=args.num_items,
                                   num_categories=args.num_categories, mean_reviews=args.mean_reviews)
    start = time.perf_counter()
    synthetic.generate(raw, spec, seed=0, extra_meta_items=args.extra_meta_items, text_bytes=args.text_bytes)
    print(f"generated raw files in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    with open(marker, "w") as f:
        json.dump(recipe, f)
    return paths


def timed_preparation(reviews: str, meta: str, out_dir: str, format: str, seed: int) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS in GiB, printed counts) of `python -m input_pipeline.amazon` in a subprocess.

    The peak is the child's VmHWM, polled: the kernel's ru_maxrss of a child also counts the parent's
    memory at fork time.
    """
    command = [sys.executable, "-m", "input_pipeline.amazon", "--reviews", reviews, "--meta", meta,
               "--out_dir", out_dir, f"--format={format}", f"--seed={seed}", "--noprogress"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    peak_kib = 0
    while process.poll() is None:
        peak_kib = max(peak_kib, _high_water_kib(process.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"preparation failed with status {process.returncode}")
    counts = {}
    for line in output.splitlines():
        name, value = line.split(None, 1)
        counts[name] = value
    return seconds, peak_kib / 2**20, counts


def _high_water_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reference_prepare(reviews: str, meta: str, out_dir: str, max_reviews: int, max_meta: int, seed: int) -> int:
    """DIEN's preparation written the plain way, on the first lines of both files; returns the reviews read."""
    default_cat = "default_cat"
    category: dict[str, str] = {}
    item_info = []
    with gzip.open(meta, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f):
            if number == max_meta:
                break
            record = ast.literal_eval(line)
            paths = record.get("categories") or []
            leaf = paths[0][-1] if paths and paths[0] else default_cat
            category.setdefault(record["asin"], leaf)
            item_info.append(f"{record['asin']}\t{leaf}\n")
    by_user: dict[str, list[tuple[int, str]]] = {}
    all_items = []
    reviews_info = []
    with gzip.open(reviews, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f):
            if number == max_reviews:
                break
            record = json.loads(line)
            uid, asin, seconds = record["reviewerID"], record["asin"], int(record["unixReviewTime"])
            reviews_info.append(f"{uid}\t{asin}\t{float(record['overall'])}\t{seconds}\n")
            by_user.setdefault(uid, []).append((seconds, asin))
            all_items.append(asin)
    rng = random.Random(seed)
    samples: dict[str, list[str]] = {"train": [], "test": []}
    for uid, user_reviews in by_user.items():
        if len(user_reviews) < 2:
            continue
        items = [asin for _, asin in sorted(user_reviews, key=lambda review: review[0])]
        positive, history = items[-1], items[:-1]
        negative = positive
        while negative == positive:
            negative = rng.choice(all_items)
        hist_mids = "\x02".join(history)
        hist_cats = "\x02".join(category.get(asin, default_cat) for asin in history)
        split = "test" if rng.random() < 0.1 else "train"
        for label, target in (("0", negative), ("1", positive)):
            samples[split].append(f"{label}\t{uid}\t{target}\t{category.get(target, default_cat)}\t"
                                  f"{hist_mids}\t{hist_cats}\n")
    counts = {name: collections.Counter() for name in ("uid", "mid", "cat")}
    for line in samples["train"]:
        _, uid, mid, cat, hist_mids, hist_cats = line.rstrip("\n").split("\t")
        counts["uid"][uid] += 1
        counts["mid"].update([mid, *hist_mids.split("\x02")])
        counts["cat"].update([cat, *hist_cats.split("\x02")])
    os.makedirs(out_dir, exist_ok=True)
    for name, lines in (("local_train_splitByUser", samples["train"]), ("local_test_splitByUser", samples["test"]),
                        ("reviews-info", reviews_info), ("item-info", item_info)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.writelines(lines)
    for name, default in (("uid", None), ("mid", "default_mid"), ("cat", default_cat)):
        tokens = ([default] if default else []) + [t for t, _ in counts[name].most_common() if t != default]
        vocabulary = {token: index for index, token in enumerate(tokens)}
        with open(os.path.join(out_dir, f"{name}_voc.pkl"), "wb") as f:
            pickle.dump(vocabulary, f, protocol=4)
        with open(os.path.join(out_dir, f"{name}_voc.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{token}\n" for token in vocabulary)
    return len(reviews_info)


def main(argv: list[str]) -> None:
    """Generates the data if needed, times both preparations and prints a table."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    args = flags.FLAGS
    reviews, meta = raw_files(args)
    load_before = os.getloadavg()[0]
    seconds, rss, counts = timed_preparation(reviews, meta, os.path.join(args.data_dir, f"prepared_{args.format}"),
                                             args.format, args.seed)
    load_after = os.getloadavg()[0]
    n_reviews = int(counts["reviews"].replace(",", ""))
    n_meta = int(counts["meta_items"].replace(",", ""))
    sizes = " + ".join(f"{os.path.getsize(path) / 2**30:.2f} GiB" for path in (reviews, meta))
    print(f"input: {n_reviews:,} reviews, {counts['users']} users, {counts['items']} items, {n_meta:,} meta lines "
          f"({sizes} gzip); {os.cpu_count()} cores; 1-min load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    print("| preparation | reviews | seconds | reviews/s | peak RSS |")
    print("|---|---|---|---|---|")
    print(f"| input_pipeline.amazon ({args.format}) | {n_reviews:,} | {seconds:.1f} | {n_reviews / seconds:,.0f} "
          f"| {rss:.2f} GiB |")
    if args.reference_reviews:
        share = min(1.0, args.reference_reviews / n_reviews)
        start = time.perf_counter()
        read = reference_prepare(reviews, meta, os.path.join(args.data_dir, "prepared_reference"),
                                 args.reference_reviews, round(share * n_meta), args.seed)
        reference = (time.perf_counter() - start) / read * n_reviews
        print(f"| line-by-line Python, first {read:,} reviews and {share:.1%} of meta, scaled | {n_reviews:,} "
              f"| {reference:.0f} | {n_reviews / reference:,.0f} | - |")
        print(f"speed-up: {reference / seconds:.1f}x")


if __name__ == "__main__":
    app.run(main)
