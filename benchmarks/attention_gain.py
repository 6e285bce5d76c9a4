"""DIN's attention versus uniform weights (sum/mean pooling) on the built-in multi-interest data.

Trains the default config twice on the same prepared data - attention 'softmax' (DeepRec) and 'mean'
(no attention unit) - and prints test AUC, GAUC and samples/s side by side.

  python benchmarks/attention_gain.py [--workdir /tmp/attention_gain] [--config.field=value ...]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from din_jax import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file; override fields as --config.field=value.")
flags.DEFINE_string("workdir", "/tmp/din_attention_gain", "Where data and runs go.")
flags.DEFINE_list("attention", ["softmax", "mean"], "Attention modes to compare.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    config.progress_bar = False
    if config.dataset == "synthetic" and not config.data_dir:
        config.data_dir = os.path.join(flags.FLAGS.workdir, "data")
    rows = []
    for mode in flags.FLAGS.attention:
        config.model.attention = mode
        results = train.train_and_evaluate(config, os.path.join(flags.FLAGS.workdir, mode))
        rows.append((mode, results["eval"]["auc"], results["eval"]["gauc"], results["train"]["samples_per_sec"]))
    print(f"{'attention':<14}{'test AUC':>10}{'GAUC':>10}{'samples/s':>12}")
    for mode, auc, gauc, rate in rows:
        print(f"{mode:<14}{auc:>10.4f}{gauc:>10.4f}{rate:>12,.0f}")
    if len(rows) == 2:
        print(f"AUC gain of {rows[0][0]} over {rows[1][0]}: {rows[0][1] - rows[1][1]:+.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
