"""Specification of input_pipeline.behavior_log: the built-in generator's Taobao UserBehavior.csv."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import behavior_log, taobao

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC = behavior_log.taobao_spec(60_000)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """A generated ~60k-row log, its path and its columns."""
    path = behavior_log.write_taobao(tmp_path_factory.mktemp("taobao"), SPEC, seed=1, chunk_users=100)
    rows = [line.split(",") for line in pathlib.Path(path).read_text().splitlines()]
    user, item, category, behavior, time = zip(*rows)
    return path, {"user": np.array(user, int), "item": np.array(item, int), "category": np.array(category, int),
                  "behavior": np.array(behavior), "time": np.array(time, int)}


def test_spec_scales_taobao_to_the_rows_asked_for():
    assert behavior_log.taobao_spec().num_users == pytest.approx(987_994, rel=0.001)
    assert SPEC.num_users == pytest.approx(60_000 / 101.37, rel=0.01)
    assert behavior_log.taobao_spec(60_000, num_users=7).num_users == 7


def test_lines_have_taobao_layout_grouped_by_user_in_time_order(log):
    _, columns = log
    user, time = columns["user"], columns["time"]
    assert len(user) == pytest.approx(60_000, rel=0.1)
    assert set(user) == set(range(1, SPEC.num_users + 1)) and (np.diff(user) >= 0).all()
    assert (np.diff(time)[np.diff(user) == 0] >= 0).all()
    assert time.min() >= 1_511_539_200 and time.max() <= 1_512_316_799
    assert columns["item"].min() >= 1 and columns["category"].min() >= 1


def test_behaviors_come_in_taobao_shares_and_users_end_with_a_page_view(log):
    _, columns = log
    behavior, user = columns["behavior"], columns["user"]
    shares = [np.mean(behavior == name) for name in behavior_log.BEHAVIORS]
    assert shares == pytest.approx(behavior_log.BEHAVIOR_SHARES, abs=0.005)
    assert (behavior[np.r_[np.diff(user) != 0, True]] == "pv").all()


def test_cart_fav_and_buy_rows_are_items_the_user_met_earlier(log):
    _, columns = log
    seen: set[tuple[int, int]] = set()
    previous_user = None
    for u, i, b in zip(columns["user"].tolist(), columns["item"].tolist(), columns["behavior"].tolist()):
        assert b == "pv" or u != previous_user or (u, i) in seen  # a user's first row has nothing earlier
        seen.add((u, i))
        previous_user = u


def test_an_item_keeps_one_category(log):
    _, columns = log
    pairs = np.unique(np.stack([columns["item"], columns["category"]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]


def test_page_views_repeat_items_at_about_repeat_prob(log):
    _, columns = log
    pv = columns["behavior"] == "pv"
    keys = columns["user"][pv] * 10**8 + columns["item"][pv]
    assert 1 - len(np.unique(keys)) / len(keys) == pytest.approx(SPEC.repeat_prob, abs=0.03)


def test_same_spec_and_seed_give_the_same_bytes(log, tmp_path):
    path, _ = log
    again = behavior_log.write_taobao(tmp_path, SPEC, seed=1, chunk_users=100)
    assert pathlib.Path(again).read_bytes() == pathlib.Path(path).read_bytes()
    other = behavior_log.write_taobao(tmp_path / "other", SPEC, seed=2, chunk_users=100)
    assert pathlib.Path(other).read_bytes() != pathlib.Path(path).read_bytes()


def test_the_taobao_preparation_reads_the_log(log, tmp_path):
    path, columns = log
    stats = taobao.prepare(path, str(tmp_path / "prepared"))
    assert stats.behaviors == len(columns["user"])
    assert stats.train_pairs + stats.test_pairs + stats.dropped_users == SPEC.num_users
    assert stats.items_with_several_categories == 0


def test_cli_writes_a_taobao_log_of_about_the_rows_asked_for(tmp_path):
    result = subprocess.run([sys.executable, "-m", "input_pipeline.synthetic", "--format=taobao", "--rows=5000",
                             f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "UserBehavior.csv" in result.stdout
    lines = (tmp_path / behavior_log.TAOBAO_FILE).read_text().splitlines()
    assert len(lines) == pytest.approx(5000, rel=0.25)


def test_a_spec_that_cannot_produce_a_log_is_refused():
    with pytest.raises(ValueError, match="rows must be at least 100"):
        behavior_log.taobao_spec(10)
    with pytest.raises(ValueError, match="explore_prob"):
        behavior_log.write_taobao("unused", dataclasses.replace(SPEC, explore_prob=2.0))
