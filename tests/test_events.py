"""Specification of --samples every_event (input_pipeline.events): semantics, splits, storage, loading, training."""

from __future__ import annotations

import collections
import json
import os
import pathlib

import numpy as np
import pytest

from configs import default
from din_jax import train
from input_pipeline import amazon, batches, dien, events, inspect, taobao
from input_pipeline.errors import DataError
from tests.test_taobao import write

# Items 100 (category 5) and 200 (category 6) only, so every negative is forced (the other item).
# User 1 clicks 200@100, 100@300, 200@500 (file order differs); user 2 clicks 100@50, 200@70, 100@80;
# user 3 has one click (no sample); the cart row is not a positive.
LOG = ["1,100,5,pv,300", "2,100,5,pv,50", "1,200,6,pv,100", "2,200,6,pv,70", "3,100,5,pv,10",
       "2,200,6,cart,75", "1,200,6,pv,500", "2,100,5,pv,80"]
# Per positive after a user's first, oldest first: (negative, positive), the history = all earlier clicks.
SAMPLES = ["0\t1\t200\t6\t200\t6", "1\t1\t100\t5\t200\t6",
           "0\t1\t100\t5\t200\x02100\t6\x025", "1\t1\t200\t6\t200\x02100\t6\x025",
           "0\t2\t100\t5\t100\t5", "1\t2\t200\t6\t100\t5",
           "0\t2\t200\t6\t100\x02200\t5\x026", "1\t2\t100\t5\t100\x02200\t5\x026"]


def lines(data_dir, split: str) -> list[str]:
    """Every sample of a split as a DIEN line, through input_pipeline.inspect."""
    return [sample.line() for _, sample in inspect.samples(str(data_dir), split)]


@pytest.fixture
def log(tmp_path) -> str:
    return write(tmp_path / "UserBehavior.csv", LOG)


def random_log(path: pathlib.Path, users: int, events: int, items: int, seed: int = 0) -> str:
    """A Taobao log of random page views with Zipf-like item popularity."""
    rng = np.random.default_rng(seed)
    item = np.minimum(rng.zipf(1.3, events), items)
    rows = zip(rng.integers(0, users, events), item, item % 7, rng.integers(0, 10_000, events))
    return write(path, [f"{u},{i},{c},pv,{t}" for u, i, c, t in rows])


def test_every_positive_after_the_first_is_a_pair_with_its_whole_history(log, tmp_path):
    stats = taobao.prepare(log, str(tmp_path / "out"), samples="every_event", test_fraction=0.0)
    assert lines(tmp_path / "out", "train") == SAMPLES and lines(tmp_path / "out", "test") == []
    assert (stats.train_pairs, stats.test_pairs, stats.dropped_users, stats.users) == (4, 0, 1, 3)
    manifest = json.loads((tmp_path / "out" / events.MANIFEST).read_text())
    assert manifest["samples"] == "every_event" and manifest["history_keep"] == "last"
    assert dien.default_history_keep(tmp_path / "out") == "last"


def test_time_split_puts_events_at_or_after_split_time_in_test_with_their_whole_history(log, tmp_path):
    taobao.prepare(log, str(tmp_path / "out"), samples="every_event", split_time=80)
    assert lines(tmp_path / "out", "train") == SAMPLES[4:6]
    assert lines(tmp_path / "out", "test") == SAMPLES[:4] + SAMPLES[6:]


@pytest.mark.parametrize("split_time, problem", [(501, "no sample's event is at or after --split_time=501 "
                                                       r"\(the latest is 500\); choose an earlier --split_time\."),
                                                 (70, "every sample's event is at or after --split_time=70 "
                                                      r"\(the earliest is 70\)")])
def test_split_time_that_leaves_a_split_empty_is_one_line(log, tmp_path, split_time, problem):
    with pytest.raises(DataError, match=f"^{log}: {problem}"):
        taobao.prepare(log, str(tmp_path / "out"), samples="every_event", split_time=split_time)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    ({"samples": "all"}, "--samples must be one of last_event, every_event, not 'all'"),
    ({"split_time": 1.5}, "--split_time must be an integer unix time, not 1.5"),
    ({"samples": "every_event", "format": "parquet"}, "--format parquet chooses the DIEN sample files")])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        amazon.check_options("error", 0.1, **{"samples": "last_event", "split_time": None, **options})


def test_split_by_user_keeps_users_whole_and_negatives_are_never_the_positive(tmp_path):
    out = tmp_path / "out"
    stats = taobao.prepare(random_log(tmp_path / "log.csv", 60, 3000, 400), str(out), samples="every_event",
                           test_fraction=0.5)
    parsed = {split: [line.split("\t") for line in lines(out, split)] for split in events.SPLITS}
    assert len(parsed["train"]) == 2 * stats.train_pairs and len(parsed["test"]) == 2 * stats.test_pairs
    assert {row[1] for row in parsed["train"]}.isdisjoint({row[1] for row in parsed["test"]})
    for rows in parsed.values():
        for negative, positive in zip(rows[::2], rows[1::2]):
            assert (negative[0], positive[0]) == ("0", "1") and negative[1] == positive[1]
            assert negative[4:] == positive[4:] and negative[2] != positive[2]


def test_storage_grows_with_events_not_with_histories(tmp_path):
    sizes = {}
    for events_per_user in (200, 800):
        out = tmp_path / str(events_per_user)
        rows = [f"1,{i % 50 + 1},{i % 3},pv,{i}" for i in range(events_per_user)]
        taobao.prepare(write(tmp_path / f"{events_per_user}.csv", rows), str(out), samples="every_event",
                       test_fraction=0.0)
        stored = sum(os.path.getsize(path) for path in events.storage_files(str(out)))
        text = sum(len(line) + 1 for line in lines(out, "train"))
        sizes[events_per_user] = stored, text
        assert stored <= 24 * events_per_user + 17 * 2 * (events_per_user - 1) + 3000  # + npy headers and tokens
    assert sizes[800][0] / sizes[200][0] < 4.5 and sizes[800][1] / sizes[200][1] > 14  # linear vs quadratic


@pytest.mark.parametrize("keep", ["first", "last"])
def test_batches_equal_those_of_the_same_samples_as_dien_text(tmp_path, keep):
    out, text_dir = tmp_path / "out", tmp_path / "text"
    taobao.prepare(random_log(tmp_path / "log.csv", 30, 1500, 300), str(out), samples="every_event")
    text_dir.mkdir()
    for split, name in dien.SPLIT_FILES.items():
        (text_dir / name).write_text("".join(line + "\n" for line in lines(out, split)))
    for name in ("uid_voc.txt", "mid_voc.txt", "cat_voc.txt"):
        (text_dir / name).write_bytes((out / name).read_bytes())
    vocabs = dien.load_vocabularies(out)
    for split in events.SPLITS:
        pointers, text = dien.load_split(out, split, vocabs), dien.load_split(text_dir, split, vocabs)
        assert len(pointers) == len(text) and len(pointers.hist_mids) < len(text.hist_mids)
        every = np.arange(len(text))
        got, want = (batches.make_batch(s, every, 7, keep) for s in (pointers, text))
        for key in ("uid", "mid", "cat", "hist_mids", "hist_cats", "hist_mask", "label", "weight"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        again = dien.load_split(out, split, vocabs)  # from the cache: memory-mapped
        assert isinstance(again.hist_mids, np.memmap) and isinstance(again.label, np.memmap)
        np.testing.assert_array_equal(again.hist_start, pointers.hist_start)


def test_vocabularies_rank_tokens_by_their_count_in_the_train_lines(tmp_path):
    out = tmp_path / "out"
    taobao.prepare(random_log(tmp_path / "log.csv", 30, 1500, 300), str(out), samples="every_event")
    rows = [line.split("\t") for line in lines(out, "train")]
    vocabs = dien.load_vocabularies(out)
    for name, tokens in (("uid", [row[1] for row in rows]),
                         ("mid", [t for row in rows for t in [row[2]] + row[4].split("\x02")]),
                         ("cat", [t for row in rows for t in [row[3]] + row[5].split("\x02")])):
        counts = collections.Counter(tokens)
        ranked = [counts[token] for token in sorted(getattr(vocabs, name), key=getattr(vocabs, name).get)
                  if not token.startswith("default_")]
        assert ranked == sorted(counts.values(), reverse=True), name


def test_open_vocabularies_cover_every_token_of_the_storage(log, tmp_path):
    taobao.prepare(log, str(tmp_path / "out"), samples="every_event", test_fraction=0.0)
    opened = dien.open_vocabularies(tmp_path / "out", dien.load_vocabularies(tmp_path / "out"))
    assert set(opened.uid) == {"1", "2", "3"} and set(opened.mid) >= {"100", "200"}


def test_last_event_and_every_event_preparations_replace_each_other(log, tmp_path):
    out = tmp_path / "out"
    taobao.prepare(log, str(out), samples="every_event", test_fraction=0.0)
    taobao.prepare(log, str(out), test_fraction=0.0)
    assert events.storage_files(str(out)) == [] and dien.default_history_keep(out) == "first"
    assert lines(out, "train") == [SAMPLES[2], SAMPLES[3], SAMPLES[6], SAMPLES[7]]  # each user's last pair
    taobao.prepare(log, str(out), samples="every_event", test_fraction=0.0)
    assert not (out / dien.TRAIN_FILE).exists() and lines(out, "train") == SAMPLES


@pytest.mark.slow  # 12-20 s of compiling; test_batches_equal_those_of_the_same_samples_as_dien_text covers the loader
def test_training_reads_every_event_data_through_the_dien_loader(tmp_path):
    out = tmp_path / "out"
    taobao.prepare(random_log(tmp_path / "log.csv", 80, 2500, 300), str(out), samples="every_event")
    config = default.get_config()
    config.update(dataset="dien", data_dir=str(out), batch_size=128, steps=4, log_every_steps=2,
                  progress_bar=False, no_eval=True)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["train"]["steps"] == 4
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["config"]["history_keep"] == "last"  # 'auto' resolved from the data
