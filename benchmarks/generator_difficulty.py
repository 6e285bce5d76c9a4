"""How hard the built-in generator's data is: one epoch of DIN, its learning curve, and what item identity adds.

  python benchmarks/generator_difficulty.py --num_users=50000 --num_items=40000 --num_categories=800
  python benchmarks/generator_difficulty.py --format=taobao --rows=20000000     # Taobao-shaped log, pv positives
  python benchmarks/generator_difficulty.py --format=taobao --csv=/tmp/din_big_data/log100150807/UserBehavior.csv
  python benchmarks/generator_difficulty.py --explore_prob=0.2                  # any SyntheticSpec field

Generates the data (Amazon review files, or a Taobao UserBehavior.csv), prepares it the DIEN way, trains
configs/books.py (batch 512, one epoch, Adam) on it, and prints the test AUC and the training loss at ten
points of the epoch. With --collapse (default on) it trains a second time (run 'categories') on a copy of the prepared data in
which every item is replaced by its category (mid = cat, hist_mids = hist_cats): what the model learns
there comes from categories alone, so the AUC difference is what item identity is worth on this data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import books  # noqa: E402
from din_jax import plots, train  # noqa: E402
from input_pipeline import amazon, behavior_log, synthetic, taobao  # noqa: E402

flags.DEFINE_enum("format", "amazon", ["amazon", "taobao"], "Generated raw format.")
flags.DEFINE_string("workdir", "/tmp/din_generator_difficulty", "Data and run directories (recreated).")
flags.DEFINE_boolean("collapse", True, "Also train with items collapsed to their categories.")
flags.DEFINE_integer("rows", 5_000_000, "taobao: rows of the log (Taobao's shape scaled, as behavior_log.taobao_spec).")
flags.DEFINE_integer("seed", 0, "Generator seed.")
flags.DEFINE_string("csv", "", "taobao: an existing UserBehavior.csv to prepare instead of generating one (e.g. the "
                    "log big_data.py keeps; the same as generating it when it came from --rows and --seed).")
flags.DEFINE_integer("steps", 0, "Train steps (0: one epoch).")
for _field in dataclasses.fields(synthetic.SyntheticSpec):
    if _field.type in ("int", "float"):
        (flags.DEFINE_float if _field.type == "float" else flags.DEFINE_integer)(
            _field.name, None, f"SyntheticSpec.{_field.name} (default: the format's spec).")


def spec() -> synthetic.SyntheticSpec:
    """The format's spec (taobao: scaled to --rows) with the fields given on the command line."""
    given = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(synthetic.SyntheticSpec)
             if f.name in flags.FLAGS and flags.FLAGS[f.name].value is not None}
    if flags.FLAGS.format == "taobao":
        return behavior_log.taobao_spec(flags.FLAGS.rows, **given)
    return dataclasses.replace(synthetic.SyntheticSpec(), **given)


def prepared(directory: str) -> str:
    """Generates and prepares the data set into `directory`/prepared."""
    raw, out = os.path.join(directory, "raw"), os.path.join(directory, "prepared")
    if flags.FLAGS.format == "taobao":
        path = flags.FLAGS.csv or behavior_log.write_taobao(raw, spec(), flags.FLAGS.seed)
        print(taobao.prepare(path, out), file=sys.stderr)
    else:
        reviews, meta = synthetic.generate(raw, spec(), flags.FLAGS.seed)
        amazon.prepare(reviews, meta, out)
    return out


def collapsed(directory: str) -> str:
    """A copy of the prepared text samples with every item replaced by its category, and cat_voc as mid_voc."""
    out = directory + "_collapsed"
    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        with open(os.path.join(directory, f"local_{split}_splitByUser"), "rb") as f, \
                open(os.path.join(out, f"local_{split}_splitByUser"), "wb") as g:
            for line in f:
                label, uid, _, cat, _, hist_cats = line.rstrip(b"\n").split(b"\t")
                g.write(b"\t".join((label, uid, cat, cat, hist_cats, hist_cats)) + b"\n")
    for name, source in (("uid_voc", "uid_voc"), ("mid_voc", "cat_voc"), ("cat_voc", "cat_voc")):
        shutil.copy(os.path.join(directory, f"{source}.pkl"), os.path.join(out, f"{name}.pkl"))
    return out


def run(data_dir: str, workdir: str) -> dict:
    """One epoch of configs/books.py on `data_dir`: test AUC, samples/s and the loss curve."""
    config = books.get_config()
    config.data_dir = data_dir
    config.steps = flags.FLAGS.steps
    config.progress_bar = False
    config.log_every_steps = 20
    results = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, plots.HISTORY_FILE)) as f:
        losses = [record["loss"] for record in map(json.loads, f) if "loss" in record]
    tenth = max(len(losses) // 10, 1)
    return {"auc": round(results["eval"]["auc"], 4), "steps": results["train"]["steps"],
            "loss_curve": [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 3)
                           for i in range(0, len(losses), tenth)]}


def main(argv: list[str]) -> None:
    """Prepares, trains (and trains on the collapsed copy), prints one JSON line per run."""
    del argv
    if flags.FLAGS.csv and flags.FLAGS.format != "taobao":
        raise app.UsageError(f"--csv={flags.FLAGS.csv} is a Taobao UserBehavior.csv: add --format=taobao")
    logging.set_verbosity(logging.WARNING)
    shutil.rmtree(flags.FLAGS.workdir, ignore_errors=True)
    print(flags.FLAGS.csv or spec(), file=sys.stderr)
    data_dir = prepared(flags.FLAGS.workdir)
    runs = {"items": data_dir}
    if flags.FLAGS.collapse:
        runs["categories"] = collapsed(data_dir)
    for name, directory in runs.items():
        print(json.dumps({"run": name, **run(directory, os.path.join(flags.FLAGS.workdir, "run_" + name))}), flush=True)


if __name__ == "__main__":
    app.run(main)
