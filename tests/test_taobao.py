"""Specification of input_pipeline.taobao: Taobao UserBehavior.csv -> DIEN samples and vocabularies."""

from __future__ import annotations

import csv
import gzip
import pathlib
import subprocess
import sys

import pytest

from input_pipeline import dien, taobao
from input_pipeline.amazon import TEST_FILE, TRAIN_FILE
from input_pipeline.errors import DataError
from tests.conftest import SHARED_DATA, SHARED_DATA_MISSING
from tests.test_amazon import read_lines, truncated_gzip, vocabulary

REPO = pathlib.Path(__file__).resolve().parents[1]
USER_BEHAVIOR = SHARED_DATA / "taobao" / "UserBehavior_head4k.csv"
needs_user_behavior = pytest.mark.skipif(not USER_BEHAVIOR.is_file(), reason=SHARED_DATA_MISSING)

# Items 100 (category 5) and 200 (category 6) only, so every negative is forced (the other item).
# User 1's file order differs from its time order; user 3 has only a cart row.
BEHAVIORS = ["1,100,5,pv,300", "1,200,6,pv,100", "2,100,5,pv,50", "2,200,6,buy,60", "2,200,6,pv,70",
             "3,100,5,cart,10", "1,100,5,fav,400"]
# --behavior pv: user 1 clicks 200@100 then 100@300; user 2 clicks 100@50 then 200@70.
PV_SAMPLES = ["0\t1\t200\t6\t200\t6", "1\t1\t100\t5\t200\t6",
              "0\t2\t100\t5\t100\t5", "1\t2\t200\t6\t100\t5"]
# --behavior pv,cart,fav,buy: user 1 ends with the fav of 100@400, user 2 with the pv of 200@70 after
# the buy of 200@60; user 3 has a single positive and is dropped.
ALL_SAMPLES = ["0\t1\t200\t6\t200\x02100\t6\x025", "1\t1\t100\t5\t200\x02100\t6\x025",
               "0\t2\t100\t5\t100\x02200\t5\x026", "1\t2\t200\t6\t100\x02200\t5\x026"]


def write(path: pathlib.Path, lines: list[str]) -> str:
    """Writes `lines` (gzip-compressed for *.gz) and returns the path."""
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


@pytest.fixture(params=[".csv", ".csv.gz"])
def behaviors(tmp_path, request) -> str:
    """The hand-written behaviour file, plain or gzip."""
    return write(tmp_path / f"UserBehavior{request.param}", BEHAVIORS)


def test_page_views_give_hand_derived_samples(behaviors, tmp_path):
    out = tmp_path / "out"
    stats = taobao.prepare(behaviors, str(out), test_fraction=0.0)
    assert read_lines(out, TRAIN_FILE) == PV_SAMPLES
    assert read_lines(out, TEST_FILE) == []
    assert (stats.behaviors, stats.positives, stats.users, stats.items, stats.categories) == (7, 4, 2, 2, 2)
    assert (stats.train_pairs, stats.test_pairs, stats.dropped_users) == (2, 0, 0)
    assert (stats.items_with_several_categories, stats.bad_lines, stats.truncated) == (0, 0, ())


@pytest.mark.parametrize("behavior", ["pv,cart,fav,buy", ("buy", "fav", "cart", "pv")])
def test_every_behaviour_type_can_be_positive(behaviors, tmp_path, behavior):
    out = tmp_path / "out"
    stats = taobao.prepare(behaviors, str(out), behavior=behavior, test_fraction=0.0)
    assert read_lines(out, TRAIN_FILE) == ALL_SAMPLES
    assert read_lines(out, TEST_FILE) == []
    assert (stats.positives, stats.users, stats.dropped_users) == (7, 3, 1)
    assert (stats.train_pairs, stats.test_pairs) == (2, 0)


def test_all_pairs_to_test_is_a_data_error_that_writes_nothing(behaviors, tmp_path):
    with pytest.raises(DataError, match=r"UserBehavior\.csv(\.gz)?: no train pairs \(train pairs: 0, test pairs: 2, "
                                        r"bad lines skipped: 0\); all 2 pairs went to the test split"):
        taobao.prepare(behaviors, str(tmp_path / "out"), test_fraction=1.0)
    assert not (tmp_path / "out").exists()


def test_truncated_file_with_skip_is_named_with_its_last_line_or_an_error_without_train_pairs(tmp_path):
    path = truncated_gzip(tmp_path / "b.csv.gz", BEHAVIORS)
    stats = taobao.prepare(path, str(tmp_path / "out"), test_fraction=0.0, on_bad_line="skip")
    assert (stats.truncated, stats.train_pairs) == ((f"{path} (after line 7)",), 2)
    path = truncated_gzip(tmp_path / "b.csv.gz", BEHAVIORS[:3])  # user 1's two clicks, user 2's first
    with pytest.raises(DataError, match=r"b\.csv\.gz: no train pairs \(train pairs: 0, test pairs: 1, bad lines "
                                        r"skipped: 0\); the input is truncated at .*b\.csv\.gz \(after line 3\)"):
        taobao.prepare(path, str(tmp_path / "out"), test_fraction=1.0, on_bad_line="skip")


def test_vocabularies_are_counted_on_train_with_defaults_at_zero(behaviors, tmp_path):
    out = tmp_path / "out"
    taobao.prepare(behaviors, str(out), test_fraction=0.0)
    # Users twice each; items 200 and 100 four times each, ties broken by first appearance in the file.
    assert vocabulary(out, "uid_voc") == {"1": 0, "2": 1}
    assert vocabulary(out, "mid_voc") == {"default_mid": 0, "200": 1, "100": 2}
    assert vocabulary(out, "cat_voc") == {"default_cat": 0, "6": 1, "5": 2}


def test_info_files_list_positives_and_item_categories(behaviors, tmp_path):
    out = tmp_path / "out"
    taobao.prepare(behaviors, str(out))
    assert read_lines(out, "reviews-info") == ["1\t100\t1.0\t300", "1\t200\t1.0\t100", "2\t100\t1.0\t50",
                                               "2\t200\t1.0\t70"]
    assert read_lines(out, "item-info") == ["100\t5", "200\t6"]


def test_an_item_keeps_the_category_of_its_first_positive_row(tmp_path):
    path = write(tmp_path / "b.csv", ["1,100,9,buy,1", "1,100,5,pv,2", "1,200,6,pv,3", "2,100,7,pv,4"])
    out = tmp_path / "out"
    stats = taobao.prepare(path, str(out), test_fraction=0.0)
    assert read_lines(out, TRAIN_FILE) == ["0\t1\t100\t5\t100\t5", "1\t1\t200\t6\t100\t5"]
    assert stats.items_with_several_categories == 1


def test_no_rows_of_the_chosen_behaviour_is_a_data_error(behaviors, tmp_path):
    with pytest.raises(DataError, match=r"has no fav/cart rows; choose other types with --behavior\.$"):
        taobao.prepare(write(tmp_path / "b.csv", BEHAVIORS[:3]), str(tmp_path / "out"), behavior="fav,cart")
    with pytest.raises(ValueError, match="behavior must be a non-empty subset of pv, cart, fav, buy"):
        taobao.prepare(behaviors, str(tmp_path / "out"), behavior="click")


def user_behavior_rows() -> list[tuple[str, str, str, str, int]]:
    """The real fixture's rows, timestamps as ints."""
    with open(USER_BEHAVIOR, newline="") as f:
        return [(user, item, cat, kind, int(seconds)) for user, item, cat, kind, seconds in csv.reader(f)]


@needs_user_behavior
def test_real_user_behavior_file_prepares_and_loads(tmp_path):
    out = tmp_path / "out"
    stats = taobao.prepare(str(USER_BEHAVIOR), str(out))
    rows = user_behavior_rows()
    clicks: dict[str, list[tuple[int, str, str]]] = {}
    for user, item, cat, kind, seconds in rows:
        if kind == "pv":
            clicks.setdefault(user, []).append((seconds, item, cat))
    assert (stats.behaviors, stats.positives, stats.users) == (len(rows), 3926, len(clicks))
    assert stats.train_pairs + stats.test_pairs == len(clicks) - stats.dropped_users > 0

    vocabs = dien.load_vocabularies(out)
    lines = read_lines(out, TRAIN_FILE) + read_lines(out, TEST_FILE)
    for split, count in (("train", stats.train_pairs), ("test", stats.test_pairs)):
        encoded = dien.load_split(out, split, vocabs)
        assert len(encoded) == 2 * count and encoded.label.tolist() == [0.0, 1.0] * count
        if split == "train":  # vocabularies are counted on train: no train item is unknown (id 0)
            assert encoded.mid.min() > 0 and encoded.hist_mids.min() > 0 and encoded.cat.min() > 0
    for negative, positive in zip(lines[0::2], lines[1::2]):
        label, user, item, cat, hist_items, hist_cats = positive.split("\t")
        ordered = sorted(clicks[user], key=lambda click: click[0])  # stable: file order on equal times
        assert (label, item, cat) == ("1", ordered[-1][1], ordered[-1][2])
        assert hist_items.split("\x02") == [click[1] for click in ordered[:-1]]
        assert hist_cats.split("\x02") == [click[2] for click in ordered[:-1]]
        assert negative.split("\t")[:2] == ["0", user] and negative.split("\t")[2] != item
        assert negative.split("\t")[4:] == [hist_items, hist_cats]


@needs_user_behavior
def test_same_seed_same_bytes_other_seed_other_samples(tmp_path):
    names = (TRAIN_FILE, TEST_FILE, "uid_voc.pkl", "mid_voc.pkl", "cat_voc.pkl", "mid_voc.txt")
    outputs = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        taobao.prepare(str(USER_BEHAVIOR), str(tmp_path / run), seed=seed)
        outputs[run] = [(tmp_path / run / name).read_bytes() for name in names]
    assert outputs["a"] == outputs["b"]
    assert outputs["a"][:2] != outputs["c"][:2]


BAD_LINES = {  # line -> what the error names
    "too few fields": ("1,100,5,pv", "has 4 fields, not 5 (user,item,category,behavior,timestamp)"),
    "a header": ("user,item,category,behavior,timestamp", "user 'user' is not a non-negative integer"),
    "non-numeric item": ("1,i100,5,pv,1", "item 'i100' is not a non-negative integer"),
    "non-numeric category": ("1,100,,pv,1", "category '' is not a non-negative integer"),
    "unknown behaviour": ("1,100,5,click,1", "behavior 'click' is not one of pv, cart, fav, buy"),
    "non-numeric timestamp": ("1,100,5,pv,2017-11-25", "timestamp '2017-11-25' is not an integer"),
    "tab-separated": ("1\t100\t5\tpv\t1", "has 1 fields, not 5"),
}


@pytest.mark.parametrize("bad, problem", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_is_an_error_with_its_line_number(tmp_path, bad, problem):
    path = write(tmp_path / "b.csv", BEHAVIORS[:2] + ["", bad] + BEHAVIORS[2:])
    with pytest.raises(DataError, match=r"b\.csv:4: ") as error:
        taobao.prepare(path, str(tmp_path / "out"))
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_bad_lines_are_counted_with_skip(tmp_path):
    path = write(tmp_path / "b.csv", BEHAVIORS[:2] + [bad for bad, _ in BAD_LINES.values()] + BEHAVIORS[2:])
    out = tmp_path / "out"
    stats = taobao.prepare(path, str(out), test_fraction=0.0, on_bad_line="skip")
    assert (stats.bad_lines, stats.behaviors) == (len(BAD_LINES), len(BEHAVIORS))
    assert read_lines(out, TRAIN_FILE) == PV_SAMPLES
    with pytest.raises(DataError, match=r"b\.csv: has no usable lines \(2 bad lines skipped\)"):
        taobao.prepare(write(tmp_path / "b.csv", ["x", "y"]), str(out), on_bad_line="skip")


def test_missing_or_empty_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"UserBehavior\.csv: no such file; check the path\.$"):
        taobao.prepare(str(tmp_path / "UserBehavior.csv"), str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"b\.csv: has no lines; pass Taobao's UserBehavior\.csv"):
        taobao.prepare(write(tmp_path / "b.csv", []), str(tmp_path / "out"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m input_pipeline.taobao ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "input_pipeline.taobao", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prepares_and_prints_a_summary(behaviors, tmp_path):
    result = run_cli("--behaviors", behaviors, "--out_dir", str(tmp_path / "out"), "--test_fraction", "0",
                     "--behavior", "pv,cart,fav,buy")
    assert result.returncode == 0, result.stderr
    assert "train_pairs" in result.stdout and "items_with_several_categories" in result.stdout
    assert read_lines(tmp_path / "out", TRAIN_FILE) == ALL_SAMPLES


def test_cli_reports_a_data_error_in_one_line(tmp_path):
    path = write(tmp_path / "b.csv", BEHAVIORS + ["1,100,5,click,1"])
    result = run_cli("--behaviors", path, "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path}:8: behavior 'click' is not one of pv, cart, fav, buy")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_rejects_an_unknown_behaviour_type(tmp_path):
    result = run_cli("--behaviors", write(tmp_path / "b.csv", BEHAVIORS), "--out_dir", str(tmp_path / "out"),
                     "--behavior", "pv,click")
    assert result.returncode == 1
    assert "--behavior takes a comma-separated list of pv, cart, fav, buy" in result.stderr
