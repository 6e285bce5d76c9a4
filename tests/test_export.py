"""Exported models: the same scores as the eval step, attention over the real history, loading without the
training code, the predict command's inputs and outputs, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, NamedTuple

import numpy as np
import pytest

from configs import default
from din_jax import checkpoint as checkpoint_lib
from din_jax import ev, load_model, predict, train
from din_jax.export import INPUTS, Encoder, Example, ExportError, export_model, make_batch
from input_pipeline import batches as batches_lib
from input_pipeline import dien
from input_pipeline.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEQ_LENGTH = 8  # short, so that many test histories are cut


def tiny_config(data_dir: str):
    config = default.get_config()
    config.data_dir = data_dir
    config.synthetic.update(dict(num_users=400, num_items=300, num_categories=20, mean_reviews=8.0, max_reviews=40))
    config.update(dict(batch_size=64, eval_batch_size=32, steps=3, max_seq_length=MAX_SEQ_LENGTH,
                       history_keep="last", progress_bar=False, no_eval=True))
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished training run: (config, workdir, its data)."""
    config = tiny_config(str(tmp_path_factory.mktemp("data")))
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, workdir)
    return config, workdir, train.load_data(config, workdir)


@pytest.fixture(scope="module")
def model_dir(run, tmp_path_factory):
    return export_model(run[1], str(tmp_path_factory.mktemp("export") / "model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def test_file(run):
    return dien.sample_path(run[2].data_dir, "test")


def eval_step_probabilities(run) -> np.ndarray:
    """The training code's probabilities of the test split, in file order, from the run's checkpoint."""
    config, workdir, data = run
    trainer = train.create_trainer(config, data.vocab_sizes)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 0, 1)
    state = trainer.readable(checkpointer.restore_latest(trainer.init_state(config)))  # as evaluation reads it
    checkpointer.close()
    out = [np.asarray(trainer.eval_step(state, batch))[batch["weight"] > 0]
           for batch in batches_lib.eval_batches(data.test, config.eval_batch_size, config.max_seq_length,
                                                 keep=config.history_keep)]
    return np.concatenate(out)


def read_examples(path) -> list[Example]:
    return [line.example for line in predict.read_lines(str(path))]


def write_json_lines(dien_path, path) -> None:
    with open(dien_path) as f, open(path, "w") as out:
        for line in f:
            example, label = predict.parse_dien_line(line.rstrip("\n"))
            out.write(json.dumps({**example._asdict(), "label": label}) + "\n")


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and all(f in lines[0] for f in fragments), lines[0]


def test_export_directory_layout_and_manifest(model_dir, run):
    assert sorted(os.listdir(model_dir)) == ["config.json", "inference.jaxexport", "manifest.json",
                                             "variables.npz", "vocabularies.json"]
    with open(os.path.join(model_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format_version"] == 1 and manifest["step"] == 3
    assert manifest["max_seq_length"] == MAX_SEQ_LENGTH and manifest["history_keep"] == "last"
    assert manifest["inputs"]["hist_mask"] == {"dtype": "bool", "shape": ["B", "T"]}
    assert manifest["inputs"]["weight"] == {"dtype": "float32", "shape": ["B"]}
    with open(os.path.join(model_dir, "vocabularies.json")) as f:
        tokens = json.load(f)
    assert {token: i for i, token in enumerate(tokens["mid"])} == dien.load_vocabularies(run[2].data_dir).mid
    assert not [name for name in os.listdir(os.path.dirname(model_dir)) if name != "model"]  # no temporary left


def test_predict_scores_equal_the_eval_step_on_the_test_split(model, run, test_file, tmp_path):
    out = tmp_path / "scores.txt"
    stats = predict.predict_file(model, test_file, str(out), batch_size=16)
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert stats.examples == len(rows) == len(run[2].test)
    assert max(run[2].test.hist_lengths) > MAX_SEQ_LENGTH  # truncation ('last') is part of the comparison
    np.testing.assert_allclose([float(score) for score, _ in rows], eval_step_probabilities(run), atol=1e-6, rtol=0)
    assert [int(label) for _, label in rows] == run[2].test.label.astype(int).tolist()


def test_predict_counts_the_tokens_unknown_to_the_model(model, run, test_file, tmp_path):
    vocabs = dien.load_vocabularies(run[2].data_dir)
    lines = open(test_file).read().splitlines()
    unseen = "1\tnew_user\tnew_item\tnew_cat\tnew_item2\x02" + lines[0].split("\t")[2] + "\tnew_cat\x02" + \
        lines[0].split("\t")[3]
    path = tmp_path / "with_unseen.txt"
    path.write_text("\n".join(lines + [unseen]) + "\n")
    examples = read_examples(path)
    expected = {"uid": sum(e.uid not in vocabs.uid for e in examples),
                "mid": sum(t not in vocabs.mid for e in examples for t in [e.item, *e.history_items]),
                "cat": sum(t not in vocabs.cat for e in examples for t in [e.category, *e.history_categories])}
    assert expected["mid"] >= 2 and expected["cat"] >= 2
    stats = predict.predict_file(model, str(path), str(tmp_path / "scores.txt"), batch_size=16)
    assert stats.unknown_tokens == expected
    assert stats.unknown_summary().startswith(f"{sum(expected.values()):,} tokens unknown to the model (uid ")


def test_explain_weights_sum_to_one_over_the_real_history_and_zero_elsewhere(model, test_file):
    examples = read_examples(test_file)
    probabilities, attention = model.explain(examples, batch_size=16)
    np.testing.assert_array_equal(probabilities, model.predict(examples, batch_size=16))
    for example, weights in zip(examples, attention):
        n = len(example.history_items)
        assert weights.shape == (n,)
        if n:
            assert abs(weights.sum() - 1) < 1e-5
            assert not weights[:max(n - MAX_SEQ_LENGTH, 0)].any()  # 'last': the oldest entries are cut off
    # The serialized function's own [B, T] output: softmax over the real positions, 0 on padding.
    batch = model.encode(examples[:12], size=16)
    p, weights = model.apply(batch)
    assert p.shape == (16,) and weights.shape == (16, MAX_SEQ_LENGTH)
    assert not weights[~batch["hist_mask"]].any()
    real = batch["hist_mask"].any(axis=1)
    np.testing.assert_allclose(weights[real].sum(axis=1), 1.0, atol=1e-5)


def test_json_lines_give_the_same_scores_as_dien_lines(model, test_file, tmp_path):
    write_json_lines(test_file, tmp_path / "test.jsonl")
    predict.predict_file(model, test_file, str(tmp_path / "dien.out"), explain=True, batch_size=16)
    predict.predict_file(model, str(tmp_path / "test.jsonl"), str(tmp_path / "json.out"), batch_size=16)
    from_dien = [json.loads(line) for line in (tmp_path / "dien.out").read_text().splitlines()]
    from_json = [json.loads(line) for line in (tmp_path / "json.out").read_text().splitlines()]
    assert [{"score": r["score"], "label": r["label"]} for r in from_dien] == from_json
    assert all(len(r["attention"]) == len(e.history_items) for r, e in zip(from_dien, read_examples(test_file)))


def test_one_export_serves_batches_of_1_3_and_7(model, test_file):
    batch = model.encode(read_examples(test_file)[:7])
    full = model(batch)
    for size in (1, 3, 7):
        part = model({name: value[:size] for name, value in batch.items()})
        np.testing.assert_allclose(part, full[:size], atol=1e-6, rtol=0)


def test_histories_are_encoded_and_cut_as_training_batches_them(run, test_file):
    config, _, data = run
    vocabs = dien.load_vocabularies(data.data_dir)
    encoder = Encoder.from_vocabularies({"uid": vocabs.uid, "mid": vocabs.mid, "cat": vocabs.cat})
    examples = read_examples(test_file)
    for keep in ("first", "last"):
        ours = make_batch(examples, encoder, 5, keep, size=len(examples) + 2)
        theirs = batches_lib.make_batch(data.test, np.arange(len(examples)), 5, keep, batch_size=len(examples) + 2)
        for name, value in ours.items():
            np.testing.assert_array_equal(value, theirs[name], err_msg=f"{keep}: {name}")
    unknown = make_batch([Example("nobody", "nothing", "no category", ["x"], ["y"])], encoder, 5, "first")
    assert [int(unknown[k].sum()) for k in ("uid", "mid", "cat", "hist_mids", "hist_cats")] == [0] * 5


def test_predict_takes_raw_examples_as_dicts(model, test_file):
    examples = read_examples(test_file)[:7]
    expected = model(model.encode(examples))
    np.testing.assert_allclose(model.predict([e._asdict() for e in examples], batch_size=3), expected, atol=1e-6)
    with pytest.raises(ValueError, match="example 1: history_items has 2 entries but history_categories has 1"):
        model.predict([examples[0]._asdict(), {**examples[0]._asdict(), "history_items": ["a", "b"],
                                               "history_categories": ["c"]}])


def predict_in_a_fresh_process(model_dir, examples, training_modules=("din_jax.train",)) -> np.ndarray:
    """load_model(model_dir).predict(examples) in a new interpreter that must not import the training code."""
    script = (
        "import json, sys\n"
        "from din_jax import load_model\n"
        f"print(json.dumps(load_model({str(model_dir)!r}).predict({examples!r}).tolist()))\n"
        "training = [m for m in sys.modules if m.split('.')[0] in ('configs', 'ml_collections', 'orbax', 'optax',"
        f" 'flax', 'input_pipeline') or m in {tuple(training_modules)!r}]\n"
        "assert not training, training\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return np.array(json.loads(result.stdout))


def test_loads_in_a_fresh_process_without_the_training_code(model_dir, model, test_file):
    examples = [e._asdict() for e in read_examples(test_file)[:4]]
    np.testing.assert_allclose(predict_in_a_fresh_process(model_dir, examples), model.predict(examples), atol=1e-7)


def test_predict_command_writes_scores_and_prints_throughput(model_dir, model, test_file, tmp_path):
    out = tmp_path / "scores.txt"
    result = cli("din_jax.predict", f"--model={model_dir}", f"--input={test_file}", f"--output={out}",
                 "--batch_size=7")
    assert result.returncode == 0, result.stderr
    assert "examples/s" in result.stdout and result.stderr == ""  # no progress bar when stderr is not a terminal
    predict.predict_file(model, test_file, str(tmp_path / "in_process.txt"), batch_size=7)
    assert out.read_text() == (tmp_path / "in_process.txt").read_text()


def test_malformed_line_is_named_and_leaves_no_output(model, test_file, tmp_path):
    lines = open(test_file).read().splitlines()
    bad = tmp_path / "bad.txt"
    bad.write_text(lines[0] + "\r\n" + "\t".join(lines[1].split("\t")[:4]) + "\n")  # '\r\n' is fine
    with pytest.raises(DataError, match=r"bad.txt:2: expected 5 or 6 tab-separated fields .*, found 4"):
        predict.predict_file(model, str(bad), str(tmp_path / "out.txt"))
    bad.write_text('{"uid": "u", "item": "i", "category": "c", "history_items": [], "history_categories": []}\n'
                   '{"uid": "u", "item": "i"}\n')
    with pytest.raises(DataError, match=r"bad.txt:2: missing field 'category'"):
        predict.predict_file(model, str(bad), str(tmp_path / "out.txt"))
    assert os.listdir(tmp_path) == ["bad.txt"]


def test_export_errors_are_one_line(run, tmp_path):
    no_run = tmp_path / "empty"
    no_run.mkdir()
    assert_one_line_error(cli("din_jax.export", f"--workdir={no_run}", f"--out={tmp_path / 'm'}"),
                          "no config.json")
    (tmp_path / "m").mkdir()
    assert_one_line_error(cli("din_jax.export", f"--workdir={run[1]}", f"--out={tmp_path / 'm'}"),
                          "already exists", "--overwrite")
    (no_run / "config.json").write_text(json.dumps({"config": run[0].to_dict(), "data_dir": run[2].data_dir}))
    with pytest.raises(ExportError, match="no checkpoint"):
        export_model(str(no_run), str(tmp_path / "m2"))


def test_predict_errors_are_one_line(model_dir, test_file, tmp_path):
    assert_one_line_error(cli("din_jax.predict", f"--model={tmp_path}", f"--input={test_file}",
                              f"--output={tmp_path / 'out'}"), "not an exported model")
    bad = tmp_path / "bad.txt"
    bad.write_text("1\tu\ti\tc\ta\x02b\tx\n")
    assert_one_line_error(cli("din_jax.predict", f"--model={model_dir}", f"--input={bad}",
                              f"--output={tmp_path / 'out'}"), "bad.txt:1: hist_mids has 2 entries")
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_export_and_a_failed_export_changes_nothing(run, model, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale").write_text("")
    export_model(run[1], str(target), overwrite=True)
    assert "stale" not in os.listdir(target)
    assert load_model(str(target)).max_seq_length == MAX_SEQ_LENGTH

    def fail(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(Encoder, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(run[1], str(target), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model"] and "manifest.json" in os.listdir(target)


# ---------------------------------------------------------------------------------------------
# DeepRec's embedding kinds (din_jax.ev): the export maps raw tokens to rows as training's evaluation does

# Two runs cover every kind (config.embeddings picks one per feature; a seed flag such as --ev gives all three
# features one kind through the same code): raw-id keyed kinds, and vocabulary-keyed ones.
KIND_RUNS = {
    # uid: frequent ids own rows, the rest share hashed rows; mid: 1 to 3 live blocks; cat: EmbeddingVariable.
    # The filter (mid and cat) admits ids at their 2nd lookup: the others read zeros.
    "raw_ids": dict(embeddings=dict(uid="adaptive", mid="dynamic", cat="ev"), ev_filter="cbf", ev_filter_freq=2,
                    dynamic_thresholds=(2.0, 4.0), adaptive_hash_bucket_size=64),
    # uid: a plain vocabulary table; mid and cat: two half-width rows of a vocabulary id.
    "vocabulary": dict(multihash=True, multihash_combiner="concat", embeddings=dict(uid="dense", mid="", cat="")),
}
KINDS = {"raw_ids": {"uid": "adaptive", "mid": "dynamic", "cat": "ev"},
         "vocabulary": {"uid": "dense", "mid": "multihash", "cat": "multihash"}}
KIND_STEPS = 4
UNSEEN = ("never-seen-user", "never-seen-item", "never-seen-category", "new-1", "new-2", "new-c")


class KindRun(NamedTuple):
    name: str
    config: Any
    data: Any
    trainer: Any
    state: Any
    model_dir: str
    model: Any


def train_kind_run(config, workdir: str):
    """KIND_STEPS train steps through the trainer's host mappings, then a checkpoint with their state (as
    training saves it) and the workdir's config.json: (data, trainer, state)."""
    data = train.load_data(config, workdir)
    trainer = train.create_trainer(config, data.vocab_sizes, raw_ids=data.raw_ids, id_sizes=data.id_sizes)
    state = trainer.init_state(config)
    stream = batches_lib.train_batches(data.train, config.batch_size, config.max_seq_length, seed=config.seed,
                                       epoch=0, keep=config.history_keep)
    for step, batch in zip(range(KIND_STEPS), stream):
        state, _ = trainer.train_step(state, trainer.host.map_batch(batch, step, train=True))
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 0, 1)
    checkpointer.save(KIND_STEPS, state, force=True, extra=trainer.host.state_dict())
    checkpointer.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"config": config.to_dict(), "data_dir": data.data_dir}, f, default=float)
    return data, trainer, state


def exported_kind_run(name: str, run, tmp_path_factory) -> KindRun:
    """A short run of KIND_RUNS[name], exported and loaded."""
    config = tiny_config(run[0].data_dir)  # the same built-in data as `run`
    config.update(dict(eval_batch_size=32, **KIND_RUNS[name]))
    workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
    data, trainer, state = train_kind_run(config, workdir)
    out = export_model(workdir, str(tmp_path_factory.mktemp("export") / name))
    return KindRun(name, config, data, trainer, state, out, load_model(out))


@pytest.fixture(scope="module")
def raw_ids_run(run, tmp_path_factory) -> KindRun:
    return exported_kind_run("raw_ids", run, tmp_path_factory)


@pytest.fixture(scope="module")
def vocabulary_run(run, tmp_path_factory) -> KindRun:
    return exported_kind_run("vocabulary", run, tmp_path_factory)


@pytest.fixture(params=sorted(KIND_RUNS))
def kind_run(request) -> KindRun:
    return request.getfixturevalue(f"{request.param}_run")


def host_eval_probabilities(trainer, state, batches) -> np.ndarray:
    """trainer.eval_step on host-mapped batches (as training evaluates), real rows only."""
    state = trainer.readable(state)
    return np.concatenate([np.asarray(trainer.eval_step(state, trainer.host.map_batch(b, 0, train=False)))
                           [b["weight"] > 0] for b in batches])


def test_embedding_kind_export_layout_and_manifest(kind_run):
    files = sorted(os.listdir(kind_run.model_dir))
    assert files == ["config.json", "embeddings.json", "embeddings.npz", "inference.jaxexport", "manifest.json",
                     "variables.npz", "vocabularies.json"]
    with open(os.path.join(kind_run.model_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["encoder"]["kind"] == "embeddings" and manifest["step"] == KIND_STEPS
    extra = {"raw_ids": {"mid_blocks", "hist_mids_blocks"},  # mid is dynamic
             "vocabulary": {"mid_r", "hist_mids_r", "cat_r", "hist_cats_r"}}[kind_run.name]  # multihash
    assert set(manifest["inputs"]) - set(INPUTS) == extra
    assert all(manifest["inputs"][name] == manifest["inputs"][name.split("_")[0] if name.count("_") == 1 else
                                                              "_".join(name.split("_")[:2])] for name in extra)
    with open(os.path.join(kind_run.model_dir, "embeddings.json")) as f:
        features = json.load(f)
    assert {f: e["kind"] for f, e in features.items()} == KINDS[kind_run.name]
    assert {f: e["keys"] for f, e in features.items()} == {
        f: "raw" if kind in ("ev", "adaptive", "dynamic") else "vocabulary" for f, kind in KINDS[kind_run.name].items()}
    with open(os.path.join(kind_run.model_dir, "vocabularies.json")) as f:
        assert sorted(json.load(f)) == sorted(f for f, e in features.items() if e["keys"] == "vocabulary")
    with np.load(os.path.join(kind_run.model_dir, "embeddings.npz")) as arrays:
        saved = {name: arrays[name] for name in arrays.files}
    trained = kind_run.trainer.host.state_dict()
    assert sorted(saved) == sorted(trained)
    for name, value in trained.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_every_kind_predicts_as_the_eval_step_on_the_test_split(kind_run, tmp_path):
    config, data, trainer = kind_run.config, kind_run.data, kind_run.trainer
    test_file = dien.sample_path(data.data_dir, "test")
    examples = read_examples(test_file)
    expected = host_eval_probabilities(trainer, kind_run.state, batches_lib.eval_batches(
        data.test, config.eval_batch_size, config.max_seq_length, keep=config.history_keep))
    assert len(examples) == len(expected) == len(data.test)
    np.testing.assert_allclose(kind_run.model.predict(examples, batch_size=32), expected, atol=1e-6, rtol=0)
    predict.predict_file(kind_run.model, test_file, str(tmp_path / "scores.txt"), batch_size=32)
    scores = [float(line.split("\t")[0]) for line in (tmp_path / "scores.txt").read_text().splitlines()]
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    if kind_run.name == "raw_ids":  # the trained state is what maps: admitted and filtered ids, 0 to 2+ blocks
        rows = kind_run.model.encode(examples[:32])
        real = rows["hist_mask"]
        no_row = trainer.host.mappings["mid_table"].num_rows
        assert (rows["hist_mids"][real] < no_row).any() and (rows["hist_mids"][real] == no_row).any()
        assert set(np.unique(rows["hist_mids_blocks"][real])) >= {0, 1, 2}
        assert (rows["hist_cats"][real] < trainer.host.mappings["cat_table"].num_rows).all()  # 20 categories: all in


def test_unseen_tokens_score_as_the_eval_step_reads_them(kind_run):
    """Tokens no training data held: raw-id kinds read no row (ev, dynamic) or a shared row (adaptive),
    vocabulary kinds id 0; the export maps and scores them as the eval step does on host-mapped ids."""
    config, data, trainer, model = kind_run.config, kind_run.data, kind_run.trainer, kind_run.model
    known = read_examples(dien.sample_path(data.data_dir, "test"))[:6]
    examples = [known[0]._replace(uid="never-seen-user"),
                known[1]._replace(item="never-seen-item", category="never-seen-category"),
                known[2]._replace(history_items=["new-1", *known[2].history_items[1:], "new-2"],
                                  history_categories=["new-c", *known[2].history_categories[1:], "new-c"]),
                *known[3:]]
    # The training side: the run's encoding extended by the new tokens, hashed as load_data hashes raw ids
    # (vocabulary-keyed features map ids past the vocabulary to 0).
    vocabs = dien.load_vocabularies(data.data_dir)
    encoding = dien.open_vocabularies(data.data_dir, vocabs) if data.raw_ids else vocabs
    extended = {}
    for column in ("uid", "mid", "cat"):
        vocab = dict(getattr(encoding, column))
        for token in UNSEEN:
            vocab[token] = max(vocab.values()) + 1
        extended[column] = vocab
    host = trainer.host
    raw_ids = host.raw_ids
    host.raw_ids = {f: None if ids is None else ev.hash_tokens(dien.tokens_by_id(extended[f]))
                    for f, ids in raw_ids.items()}
    try:
        batch = make_batch(examples, Encoder.from_vocabularies(extended), MAX_SEQ_LENGTH, config.history_keep,
                           size=32)
        mapped = host.map_batch(batch, 0, train=False)
        expected = host_eval_probabilities(trainer, kind_run.state, [batch])
    finally:
        host.raw_ids = raw_ids
    rows = model.encode(examples, size=32)
    assert sorted(rows) == sorted(set(mapped) | {"weight"})
    for name in rows:  # the same rows (and second rows / blocks) as the host mapped
        np.testing.assert_array_equal(rows[name], mapped[name], err_msg=name)
    np.testing.assert_allclose(model.predict(examples, batch_size=32), expected, atol=1e-6, rtol=0)
    mappings = host.mappings
    if kind_run.name == "raw_ids":
        assert rows["uid"][0] >= mappings["uid_table"].capacity  # adaptive: its shared hashed row
        assert rows["mid"][1] == mappings["mid_table"].num_rows and rows["mid_blocks"][1] == 0  # dynamic: no row
        assert rows["cat"][1] == mappings["cat_table"].num_rows  # ev: no row
        newest = min(len(examples[2].history_items), MAX_SEQ_LENGTH) - 1  # 'last' keeps the newest: "new-2"
        assert rows["hist_mids"][2, newest] == mappings["mid_table"].num_rows
    else:  # vocabulary id 0: its quotient and remainder rows
        assert rows["uid"][0] == 0 and rows["mid"][1] == 0
        assert rows["mid_r"][1] == mappings["mid_table"].quotient_rows


def test_an_embedding_kind_export_loads_without_the_training_code(raw_ids_run):
    kind_run = raw_ids_run
    examples = [e._asdict() for e in read_examples(dien.sample_path(kind_run.data.data_dir, "test"))[:4]]
    examples.append({**examples[0], "uid": "never-seen-user", "history_items": ["new-1"], "history_categories": ["c"]})
    scores = predict_in_a_fresh_process(kind_run.model_dir, examples,
                                        ("din_jax.train", "din_jax.host_embeddings", "din_jax.model"))
    np.testing.assert_allclose(scores, kind_run.model.predict(examples), atol=1e-7)


def test_export_refuses_a_checkpoint_without_the_embeddings_id_maps(raw_ids_run, tmp_path):
    kind_run = raw_ids_run  # (multi-hash and dense mappings keep no id map: they export without one)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), 0, 1)
    checkpointer.save(KIND_STEPS, kind_run.state, force=True)  # no extra: the id -> row maps are lost
    checkpointer.close()
    (tmp_path / "config.json").write_text(json.dumps({"config": kind_run.config.to_dict(),
                                                      "data_dir": kind_run.data.data_dir}, default=float))
    with pytest.raises(ExportError, match=r"holds no id -> row map of embedding uid, mid, cat \(adaptive, dynamic, ev"):
        export_model(str(tmp_path), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_a_manifest_that_does_not_fit_its_encoder_is_refused(vocabulary_run, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(vocabulary_run.model_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["inputs"]["mid_r"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="inputs .* are not those its encoder makes"):
        load_model(str(copy))
    manifest["encoder"]["kind"] = "hashed"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="encoder kind 'hashed' is not supported"):
        load_model(str(copy))


def test_loading_constants_match_the_training_code():
    from din_jax import export, model
    assert {t.removesuffix("_table"): c for t, c in model.TABLES.items()} == export.FEATURE_COLUMNS
    assert (model.SECOND_ROW, model.BLOCKS) == (export.SECOND_ROW, export.BLOCKS)
