"""The train-and-evaluate loop end to end on a small built-in data set: outputs, resume, determinism."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from configs import default
from din_jax import train
from din_jax.config_check import ConfigError, validate
from input_pipeline import batches as batches_lib
from input_pipeline.errors import DataError


def small_config(data_dir: str, **overrides):
    config = default.get_config()
    config.data_dir = data_dir
    config.synthetic.update(dict(num_users=1500, num_items=800, num_categories=40, mean_reviews=8.0, max_reviews=40))
    config.batch_size = 128
    config.eval_batch_size = 256
    config.log_every_steps = 5
    config.progress_bar = False
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("builtin"))


def test_run_writes_metrics_summary_checkpoint_and_tensorboard(tmp_path, data_dir, monkeypatch):
    workdir = str(tmp_path / "run")
    plans = []
    build_plan = batches_lib.train_plan
    monkeypatch.setattr(batches_lib, "train_plan", lambda *a, **k: plans.append(k["epoch"]) or build_plan(*a, **k))
    results = train.train_and_evaluate(small_config(data_dir, steps=12), workdir)
    # 12 steps of the first epoch: its permutation (4 bytes a sample) built for the packed size, then once for the
    # batches, however many passes over the plan (capacities, items) the loop makes.
    assert plans == [0, 0]
    with open(os.path.join(workdir, "eval_metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == {"auc", "auc_1000", "gauc", "accuracy", "logloss", "num_examples", "step"}
    assert metrics["step"] == 12 and metrics == results["eval"]
    data = train.load_data(small_config(data_dir), workdir)
    assert metrics["num_examples"] == len(data.test)  # every test example exactly once
    with open(os.path.join(workdir, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 12 and summary["samples_per_sec"] > 0 and summary["compile_seconds"] > 0
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["12"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))


def test_same_seed_gives_identical_metrics_and_other_seed_differs(tmp_path, data_dir):
    first = train.train_and_evaluate(small_config(data_dir, steps=8), str(tmp_path / "a"))["eval"]
    second = train.train_and_evaluate(small_config(data_dir, steps=8), str(tmp_path / "b"))["eval"]
    other = train.train_and_evaluate(small_config(data_dir, steps=8, seed=7), str(tmp_path / "c"))["eval"]
    assert first == second
    assert first["logloss"] != other["logloss"]


def test_resume_continues_from_latest_checkpoint_exactly(tmp_path, data_dir):
    straight = train.train_and_evaluate(small_config(data_dir, steps=10), str(tmp_path / "straight"))["eval"]
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(small_config(data_dir, steps=4, save_steps=2, keep_checkpoint_max=2), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # keep_checkpoint_max
    resumed = train.train_and_evaluate(small_config(data_dir, steps=10), workdir)
    assert resumed["train"]["steps_this_run"] == 6
    assert resumed["eval"] == straight


def strict_json(path) -> dict:
    """A JSON file parsed strictly: NaN / Infinity (which json.dump writes by default) are errors."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_rerun_of_a_finished_run_only_evaluates_and_keeps_its_summary(tmp_path, data_dir):
    workdir = tmp_path / "done"
    first = train.train_and_evaluate(small_config(data_dir, steps=4), str(workdir))
    summary = (workdir / "train_summary.json").read_bytes()
    assert strict_json(workdir / "train_summary.json")["steps_this_run"] == 4
    again = train.train_and_evaluate(small_config(data_dir, steps=4), str(workdir))
    assert (workdir / "train_summary.json").read_bytes() == summary  # the training run's summary, untouched
    assert again["train"]["evaluated_only"] and again["train"]["steps"] == 4 and again["eval"] == first["eval"]
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "eval" in r] == [4]  # re-evaluated, not recorded twice
    strict_json(workdir / "eval_metrics.json")
    (workdir / "train_summary.json").unlink()  # without the training run's summary, one that says what happened
    train.train_and_evaluate(small_config(data_dir, steps=4), str(workdir))
    written = strict_json(workdir / "train_summary.json")
    assert written["evaluated_only"] and written["steps_this_run"] == 0 and written["final_train_loss"] is None
    assert written["samples_per_sec"] is None


def test_one_epoch_by_default_covers_the_train_split(tmp_path, data_dir):
    config = small_config(data_dir, steps=0, no_eval=True)
    results = train.train_and_evaluate(config, str(tmp_path / "epoch"))
    data = train.load_data(config, str(tmp_path))
    widths = batches_lib.bucket_widths(data.train, config.max_seq_length, config.bucket_boundaries)
    assert results["train"]["steps"] == sum(-(-int((widths == w).sum()) // config.batch_size) for w in set(widths))
    assert results["eval"] == {} and not os.path.exists(tmp_path / "epoch" / "eval_metrics.json")


def test_trains_from_a_prepared_dien_directory(tmp_path, data_dir):
    copy = tmp_path / "dien"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("raw", ".din_cache", "builtin.json"))
    for pickled in copy.glob("*_voc.txt"):
        pickled.unlink()  # the .pkl vocabularies alone must do
    config = small_config(str(copy), dataset="dien", steps=3)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["train"]["steps"] == 3 and 0.0 <= results["eval"]["auc"] <= 1.0


def test_bad_config_and_missing_data_are_one_sentence_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config.model.batch_norm='moving' is not one of"):
        config = small_config(str(tmp_path))
        config.model.batch_norm = "moving"
        train.train_and_evaluate(config, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"config.shard_embeddings=True .* needs config.sparse_embeddings=True"):
        config = small_config(str(tmp_path))
        config.update(dict(shard_embeddings=True, sparse_embeddings=False))
        train.train_and_evaluate(config, str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"no such data directory; prepare one with `python -m input_pipeline.amazon"):
        train.train_and_evaluate(small_config(str(tmp_path / "missing"), dataset="dien"), str(tmp_path / "new_run"))
    assert os.listdir(tmp_path / "new_run") == []  # no empty checkpoints/ left behind by a run that failed on its data


@pytest.mark.parametrize("key, value, named", [
    ("adagrad_decay_rate", 1.0, r"config.adagrad_decay_rate=1.0 must lie strictly between 0 and 1"),
    ("adagrad_decay_rate", 0.0, r"config.adagrad_decay_rate=0.0 must lie strictly between 0 and 1"),
    ("adagrad_decay_rate", -0.5, r"config.adagrad_decay_rate=-0.5 must lie strictly between 0 and 1"),
    ("adagrad_decay_step", 0, r"config.adagrad_decay_step=0 must be positive")])
def test_adagrad_decay_settings_outside_deeprec_range_are_one_sentence_errors(key, value, named):
    """DeepRec's AdagradDecayOptimizer raises for these too (accumulator_decay_rate / _step)."""
    config = small_config("unused")
    config[key] = value
    with pytest.raises(ConfigError, match=named):
        validate(config)


def test_din_beats_plain_sum_pooling_on_the_multi_interest_data(tmp_path):
    """The built-in data is multi-interest: DIN must beat DIEN's BaseModel (sum pooling, no attention)."""
    config = small_config(str(tmp_path / "data"))
    config.synthetic.update(dict(num_users=6000, num_items=3000, num_categories=120, mean_reviews=12.0))
    config.update(dict(steps=0, batch_size=256))
    aucs = {}
    for attention in ("softmax", "none"):
        config.model.attention = attention
        aucs[attention] = train.train_and_evaluate(config, str(tmp_path / attention))["eval"]["auc"]
    assert aucs["softmax"] > 0.6, aucs
    assert aucs["softmax"] > aucs["none"] + 0.03, aucs
