"""DeepRec's embedding kinds side by side: AUC, throughput and memory of each, one epoch on the same data.

  python benchmarks/embedding_kinds.py                                  # 50k-user set, then the Books-size set
  python benchmarks/embedding_kinds.py --datasets=small --variants=dense,ev,multihash
  python benchmarks/embedding_kinds.py --seeds=2021,2022                # AUC and final loss of two seeds each
  python benchmarks/embedding_kinds.py --books_data_dir=/tmp/din_prepare_bench/prepared_text  # reuse a prepared dir

Every run is configs/books.py (DeepRec's benchmark setup: batch 512, one epoch, Adam 0.001) plus the
variant's embedding fields; --config.field=value overrides apply to every run. Data sets:

- small: the README's 50k generated users (40k items, 800 categories), generated and prepared once into
  --small_data_dir (input_pipeline.synthetic + input_pipeline.amazon, as datasets.builtin_data_dir does).
- books: Books-size generated data as benchmarks/prepare.py generates it (603k users, 368k items, 1.6k
  categories, 14.74 reviews per user; short review texts and no unreviewed meta items, which change no
  sample), prepared once into --books_data_dir. A directory that already holds prepared DIEN files is used
  as it is.

Each variant trains in a fresh run directory under --workdir/<data set>/<variant>. Memory columns:
"held" = rows that hold an id (dense and multihash: every row; adaptive: own rows + hash buckets) x row
width x 4 bytes x 3 (the row and Adam's two slots); "allocated" = the device tables as created (their row
count x width x 4 x 3); "host" = the id mappings' host arrays (din_jax.ev stats host_bytes). dynamic_dim's note
adds what its held rows' live blocks alone would take (din_jax stores every row at full width).

Eviction (ev+gstep, ev+l2) runs at each checkpoint save, including the final one before evaluation, so its
samples/s include the periodic saves. On the Books-size set most runs end the epoch at ~0.78 AUC, but a run can
find the generator's series structure at a point that depends on the seed and the kind, and its loss then falls
further (0.57 -> 0.34 in one README run, AUC 0.89; see the final train loss column), so compare kinds over
several --seeds.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from din_jax import ev, train  # noqa: E402
from input_pipeline import datasets  # noqa: E402
from input_pipeline.synthetic import SyntheticSpec  # noqa: E402

_BOOKS_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "books.py")
config_flags.DEFINE_config_file("config", _BOOKS_CONFIG, "Base config of every run; override as --config.field=value.")
flags.DEFINE_string("workdir", "/tmp/din_embedding_kinds", "Run directories (recreated per variant).")
flags.DEFINE_list("datasets", ["small", "books"], "Data sets to run: small (50k users), books (Books size).")
flags.DEFINE_string("small_data_dir", "/tmp/din_embedding_kinds/data_50k", "Prepared 50k-user set (built if missing).")
flags.DEFINE_string("books_data_dir", "/tmp/din_embedding_kinds/data_books",
                    "Prepared Books-size set (built if missing).")
flags.DEFINE_list("variants", None, "Variants to run (default: all); see variants().")
flags.DEFINE_list("books_variants", None, "Variants on the Books-size set (default: --variants).")
flags.DEFINE_list("seeds", None, "config.seed of each run (default: the config's); AUC and loss are shown per seed.")
flags.DEFINE_integer("books_steps", 0, "Train steps on the Books-size set (0: one epoch).")
flags.DEFINE_integer("gstep_save_steps", 100, "ev+gstep / ev+l2: checkpoint (and so eviction) every N steps.")
flags.DEFINE_integer("small_steps_to_live", 50, "ev+gstep on the small set: evict ids unseen for more steps.")
flags.DEFINE_integer("books_steps_to_live", 500, "ev+gstep on the Books-size set: evict ids unseen for more steps.")
# l2: about the 10th percentile of the item rows' 0.5 * |row|^2 after an EV epoch without eviction (user rows start
# ~1000x larger and category rows are trained every step, so only item rows fall below). The rows' initial scale
# shrinks with the table (glorot-uniform: 0.5 * E * 2 / (rows + E)), hence one threshold per data set.
flags.DEFINE_float("small_l2_threshold", 3.5e-4, "ev+l2 on the small set: evict ids with 0.5 * |row|^2 below this.")
flags.DEFINE_float("books_l2_threshold", 2e-4, "ev+l2 on the Books-size set: evict ids with 0.5 * |row|^2 below this.")
flags.DEFINE_enum("uid_kind", "", ["", "dense", "ev", "multihash", "dynamic"],
                  "Diagnostic: uid on this kind in every variant but adaptive (the kinds then apply to mid and cat).")
flags.DEFINE_integer("small_adaptive_buckets", 5_000, "adaptive on the small set: uid hash buckets.")
flags.DEFINE_integer("books_adaptive_buckets", 100_000, "adaptive on the Books-size set: uid hash buckets (seed's).")

FEATURES = ("uid", "mid", "cat")
ADAM_SLOTS = 3  # the row itself plus Adam's two moments, all float32 and as wide as the row


def variants(dataset: str) -> dict[str, dict]:
    """Each variant's config fields (on top of configs/books.py)."""
    args = flags.FLAGS
    live = args.small_steps_to_live if dataset == "small" else args.books_steps_to_live
    buckets = args.small_adaptive_buckets if dataset == "small" else args.books_adaptive_buckets
    threshold = args.small_l2_threshold if dataset == "small" else args.books_l2_threshold
    return {
        "dense": {},
        "ev": dict(ev=True),
        "ev+counter": dict(ev=True, ev_filter="counter", ev_filter_freq=3),
        "ev+cbf": dict(ev=True, ev_filter="cbf", ev_filter_freq=3, ev_cbf_false_positive=0.01),
        "ev+gstep": dict(ev=True, ev_elimination="gstep", ev_steps_to_live=live, save_steps=args.gstep_save_steps),
        "ev+l2": dict(ev=True, ev_elimination="l2", ev_l2_threshold=threshold,
                      save_steps=args.gstep_save_steps),
        "adaptive": dict(adaptive_emb=True, adaptive_hash_bucket_size=buckets, adaptive_promote_freq=3),
        "multihash": dict(multihash=True, multihash_combiner="add"),
        "dynamic_dim": dict(dynamic_ev=True),
    }


def describe(dataset: str, name: str) -> str:
    """The variant's settings in words, for the table's footnote."""
    fields = variants(dataset)[name]
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "plain vocabulary tables"


def _prepared(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f"local_train_splitByUser{s}")) for s in ("", ".parquet"))


def data_dir(dataset: str) -> str:
    """The prepared directory of `dataset`, generated and prepared on first use."""
    if dataset == "small":
        directory = flags.FLAGS.small_data_dir
        spec = SyntheticSpec(num_users=50_000, num_items=40_000, num_categories=800)
    else:
        directory = flags.FLAGS.books_data_dir
        spec = SyntheticSpec(num_users=603_000, num_items=368_000, num_categories=1_600, mean_reviews=14.74)
    if not _prepared(directory):
        start = time.perf_counter()
        print(f"[{dataset}] generating and preparing {spec} into {directory} ...", file=sys.stderr, flush=True)
        datasets.builtin_data_dir(directory, spec, seed=0, prepare_seed=3)
        print(f"[{dataset}] prepared in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return directory


_captured: dict = {}


def _capture_trainer(create):
    """Wraps train.create_trainer to keep the last trainer (its host mappings hold the final id maps)."""
    def wrapper(*args, **kwargs):
        _captured["trainer"] = trainer = create(*args, **kwargs)
        return trainer
    return wrapper


def dynamic_blocks(mapping: ev.DynamicDimension, step: int) -> tuple[float, int]:
    """(mean live blocks of held rows at `step`, float32 values in live blocks summed over held rows)."""
    held = np.flatnonzero(mapping._slot_ids >= 0)
    if held.size == 0:
        return 0.0, 0
    freq = mapping._decayed(held, step)
    blocks = np.minimum(1 + np.searchsorted(mapping.thresholds, freq, side="right"), mapping.max_blocks)
    return float(blocks.mean()), int(blocks.sum()) * mapping.block_size


def measure(stats: dict) -> dict:
    """Rows held / allocated and their bytes (with Adam slots), host bytes, from one feature's mapping stats."""
    kind = stats["kind"]
    dim = flags.FLAGS.config.model.embedding_dim
    if kind == "dense":
        held, rows, width = stats["num_rows"], stats["num_rows"], dim
    elif kind == "multihash":
        held, rows, width = stats["num_rows"], stats["num_rows"], stats["row_dim"]
    elif kind == "adaptive":  # own rows with an id, plus every shared hash bucket (always live)
        held, rows, width = stats["rows_held"] + stats["num_rows"] - stats["capacity"], stats["num_rows"], dim
    else:
        held, rows, width = stats["rows_held"], stats["num_rows"], dim
    return dict(held=held, rows=rows, held_bytes=held * width * 4 * ADAM_SLOTS,
                alloc_bytes=rows * width * 4 * ADAM_SLOTS, host_bytes=stats.get("host_bytes") or 0)


def run_variant(dataset: str, name: str, directory: str, seed: int | None) -> dict:
    """Trains one variant with one seed in a fresh run directory; returns its results (or the error)."""
    config = flags.FLAGS.config.copy_and_resolve_references()
    config.dataset, config.data_dir, config.progress_bar = "dien", directory, False
    if seed is not None:
        config.seed = seed
    if dataset == "books" and flags.FLAGS.books_steps:
        config.steps = flags.FLAGS.books_steps
    config.update(variants(dataset)[name])
    suffix = ""
    if flags.FLAGS.uid_kind and name != "adaptive":
        config.embeddings.uid = flags.FLAGS.uid_kind
        suffix = f"_uid-{flags.FLAGS.uid_kind}"
    if seed is not None:
        suffix += f"_seed{seed}"
    workdir = os.path.join(flags.FLAGS.workdir, dataset + suffix, name.replace("+", "_"))
    shutil.rmtree(workdir, ignore_errors=True)  # a leftover checkpoint would resume instead of training
    start = time.perf_counter()
    row = dict(variant=name, wall=0.0)
    try:
        results = train.train_and_evaluate(config, workdir)
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
        traceback.print_exc()
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   wall=time.perf_counter() - start)
        return row
    row["wall"] = time.perf_counter() - start
    summary, evaluation = results["train"], results["eval"]
    per_feature = {f: measure(summary["embeddings"][f]) for f in FEATURES}
    notes = []
    admitted = sum(summary["embeddings"][f].get("admitted") or 0 for f in FEATURES)
    evicted = sum(summary["embeddings"][f].get("evicted") or 0 for f in FEATURES)
    if any(summary["embeddings"][f]["kind"] not in ("dense", "multihash") for f in FEATURES):
        notes.append(f"admitted {admitted:,}")
    if evicted:
        notes.append("evicted " + "/".join(f"{summary['embeddings'][f].get('evicted') or 0:,}" for f in FEATURES))
    fallback = [summary["embeddings"][f].get("fallback_lookups") for f in FEATURES]
    if any(fallback):
        notes.append("lookups without own row " + "/".join(f"{v or 0:,}" for v in fallback))
    trainer = _captured.pop("trainer", None)
    if trainer is not None:
        for table, mapping in trainer.host.mappings.items():
            if isinstance(mapping, ev.DynamicDimension):
                mean_blocks, values = dynamic_blocks(mapping, summary["steps"])
                notes.append(f"{table.removesuffix('_table')} live blocks {mean_blocks:.2f}/{mapping.max_blocks}")
                per_feature[table.removesuffix("_table")]["live_bytes"] = values * 4 * ADAM_SLOTS
    live = [p.get("live_bytes") for p in per_feature.values()]
    if any(v is not None for v in live):
        total = sum(v if v is not None else p["held_bytes"] for v, p in zip(live, per_feature.values()))
        notes.append(f"live-block bytes {total / 2**20:,.1f} MiB")
    row.update(auc=evaluation.get("auc"), gauc=evaluation.get("gauc"), rate=summary["samples_per_sec"],
               loss=summary["final_train_loss"],
               steps=summary["steps"], compile=summary["compile_seconds"], features=per_feature,
               notes="; ".join(notes))
    del trainer, results
    gc.collect()
    return row


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _count(n: int) -> str:
    return f"{n / 1e3:,.1f}k" if n >= 10_000 else f"{n:,}"


def table(dataset: str, runs: dict[str, list[dict]]) -> str:
    """The markdown table of one data set: per variant, AUC / GAUC / final loss of each seed, mean samples/s, total
    wall seconds, and the memory and notes of the first seed's run."""
    lines = ["| variant | test AUC | GAUC | final train loss | train samples/s | rows held uid / mid / cat (sum) | "
             "embedding MiB held (allocated) | host mapping MiB | wall s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in runs.items():
        wall = sum(r["wall"] for r in seeds)
        failed = [r for r in seeds if "error" in r]
        if failed:
            lines.append(f"| {name} | failed | | | | | | | {wall:.0f} | {failed[0]['error']} |")
            continue
        row = seeds[0]
        features = row["features"]
        held = " / ".join(_count(features[f]["held"]) for f in FEATURES)
        total = sum(features[f]["held"] for f in FEATURES)
        held_bytes = sum(features[f]["held_bytes"] for f in FEATURES)
        alloc_bytes = sum(features[f]["alloc_bytes"] for f in FEATURES)
        host = sum(features[f]["host_bytes"] for f in FEATURES)
        rates = [r["rate"] for r in seeds if r["rate"]]
        rate = f"{sum(rates) / len(rates):,.0f}" if rates else "-"
        auc, gauc, loss = (" / ".join(f"{r[key]:.4f}" for r in seeds) for key in ("auc", "gauc", "loss"))
        lines.append(f"| {name} | {auc} | {gauc} | {loss} | {rate} | {held} ({_count(total)}) "
                     f"| {_mib(held_bytes)} ({_mib(alloc_bytes)}) | {_mib(host)} | {wall:.0f} | {row['notes']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    train.create_trainer = _capture_trainer(train.create_trainer)
    everything = list(variants("small"))
    chosen = args.variants or everything
    unknown = sorted(set(chosen + (args.books_variants or [])) - set(everything))
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; choose from {everything}")
    seeds = [int(s) for s in args.seeds] if args.seeds else [None]
    begin = time.perf_counter()
    outputs = []
    for dataset in args.datasets:
        if dataset not in ("small", "books"):
            raise app.UsageError(f"unknown data set {dataset!r}; choose small or books")
        directory = data_dir(dataset)
        names = (args.books_variants or chosen) if dataset == "books" else chosen
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for seed in seeds:  # seed-major: each seed's variants run side by side
            for name in names:
                print(f"[{dataset}] {name} seed {seed} ...", file=sys.stderr, flush=True)
                runs[name].append(run_variant(dataset, name, directory, seed))
                last = runs[name][-1]
                print(f"[{dataset}] {name} seed {seed}: " + (last.get("error") or
                      f"AUC {last['auc']:.4f}, loss {last['loss']:.4f}, {last['rate'] or 0:,.0f} samples/s, "
                      f"{last['wall']:.0f} s"), file=sys.stderr, flush=True)
        steps = next((r["steps"] for rs in runs.values() for r in rs if "steps" in r), "?")
        title = {"small": "50k generated users (40k items, 800 categories)",
                 "books": "Books-size generated set (603k users, 368k items, 1.6k categories)"}[dataset]
        epoch = "one epoch" if not (dataset == "books" and args.books_steps) else f"{args.books_steps} steps"
        uid = f"; uid on '{args.uid_kind}' in every variant but adaptive" if args.uid_kind else ""
        seed_text = " / ".join(str(s) for s in seeds) if seeds != [None] else str(args.config.seed)
        text = [f"### {title}: {epoch} ({steps} steps), batch 512, seeds {seed_text}, data {directory}{uid}", "",
                table(dataset, runs), ""]
        text += [f"- {name}: {describe(dataset, name)}" for name in names]
        outputs.append("\n".join(text))
        print("\n" + outputs[-1] + "\n", flush=True)
    print(f"total run time {time.perf_counter() - begin:.0f} s on {os.cpu_count()} cores "
          f"(1-min load average at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    app.run(main)
