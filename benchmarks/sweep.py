"""Trains the same prepared data once per value of one config field and prints AUC and samples/s side by side.

  python benchmarks/sweep.py --field model.attention --values softmax,unnormalized,mean,none
  python benchmarks/sweep.py --field precision --values fp32,mixed_bf16,bf16
  python benchmarks/sweep.py --field pack_granularity --values 0,1024 --config.optimizer=adagrad

Every run uses configs/default.py (or --config) with its overrides; the built-in data is prepared
once under --workdir/data and shared. With --repeats N the values run N times, interleaved (a, b, a, b, ...),
and samples/s is the median: on a shared 2-core machine one run's throughput varies by 10% or more.
"""

from __future__ import annotations

import ast
import os
import shutil
import statistics

from absl import app, flags, logging
from ml_collections import config_flags

from din_jax import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file; override fields as --config.field=value.")
flags.DEFINE_string("workdir", "/tmp/din_sweep", "Where data and runs go.")
flags.DEFINE_string("field", "model.attention", "The dotted config field to sweep.")
flags.DEFINE_list("values", ["softmax", "mean"], "Values of --field, one run each.")
flags.DEFINE_integer("repeats", 1, "Runs per value, interleaved; samples/s is their median.", lower_bound=1)


def _parse(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config[part]
    config[leaf] = value


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    config.progress_bar = False
    if config.dataset == "synthetic" and not config.data_dir:
        config.data_dir = os.path.join(flags.FLAGS.workdir, "data")
    runs: dict[str, list[dict]] = {text: [] for text in flags.FLAGS.values}
    for _ in range(flags.FLAGS.repeats):
        for text in flags.FLAGS.values:
            _set(config, flags.FLAGS.field, _parse(text))
            workdir = os.path.join(flags.FLAGS.workdir, f"{flags.FLAGS.field}={text}")
            shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
            runs[text].append(train.train_and_evaluate(config, workdir))
    rows = []
    for text, results in runs.items():
        summary = {**results[0]["train"], "samples_per_sec": statistics.median(
            r["train"]["samples_per_sec"] for r in results)}
        rows.append((text, results[0]["eval"], summary))  # the metrics are the same in every repeat
    base = rows[0][2]["samples_per_sec"]
    print(f"| {flags.FLAGS.field} | test AUC | GAUC | logloss | train samples/s | vs first | compile s | table MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for text, evaluation, summary in rows:
        print(f"| {text} | {evaluation['auc']:.4f} | {evaluation['gauc']:.4f} | {evaluation['logloss']:.4f} "
              f"| {summary['samples_per_sec']:,.0f} | {summary['samples_per_sec'] / base:.2f}x "
              f"| {summary['compile_seconds']:.1f} | {summary['table_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    app.run(main)
