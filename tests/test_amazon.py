"""Specification of input_pipeline.amazon: raw Amazon reviews + meta -> DIEN samples and vocabularies."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import pickle
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from input_pipeline import amazon, cli, synthetic
from input_pipeline.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
MUSICAL_INSTRUMENTS = "amazon_reviews/reviews_Musical_Instruments_5.json.gz"
SAMPLE_FILES = (amazon.TRAIN_FILE, amazon.TEST_FILE)
VOCABULARY_FILES = tuple(f"{name}_voc.{ext}" for name in ("uid", "mid", "cat") for ext in ("pkl", "txt"))
OUTPUT_FILES = SAMPLE_FILES + VOCABULARY_FILES + ("reviews-info", "item-info")


def review(uid: str, asin: str, seconds, rating=5.0, name: str | None = "Someone") -> str:
    """One review line in the 2014 layout (json.dumps writes it the way the McAuley files are)."""
    record = {"reviewerID": uid, "asin": asin}
    if name is not None:
        record["reviewerName"] = name
    record.update({"helpful": [0, 1], "reviewText": 'Fine "thing".', "overall": rating,
                   "summary": "ok", "unixReviewTime": seconds, "reviewTime": "01 1, 2014"})
    return json.dumps(record)


def write(path: pathlib.Path, lines: list[str]) -> str:
    """Writes `lines` (gzip-compressed for *.gz) and returns the path."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


def truncated_gzip(path: pathlib.Path, lines: list[str] | list[bytes]) -> str:
    """Writes `lines` as a gzip stream that then breaks off inside one more line (a cut-short second member)."""
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) + gzip.compress(b"a line that is lost " * 20)[:-10])
    return str(path)


def read_lines(out_dir: pathlib.Path, name: str) -> list[str]:
    """The '\\n'-terminated lines of an output file."""
    data = (out_dir / name).read_bytes()
    assert b"\r" not in data and (not data or data.endswith(b"\n"))
    return data.decode("utf-8").splitlines()


def vocabulary(out_dir: pathlib.Path, name: str) -> dict[str, int]:
    """The .pkl vocabulary, checked to agree with the .txt one (id = line number)."""
    data = (out_dir / f"{name}.pkl").read_bytes()
    assert data[:2] == b"\x80\x04"  # pickle protocol 4
    voc = pickle.loads(data)
    assert type(voc) is dict and all(type(k) is str and type(v) is int for k, v in voc.items())
    assert {token: i for i, token in enumerate(read_lines(out_dir, f"{name}.txt"))} == voc
    return voc


# Two items only, so every negative is forced (the other item) and the whole output can be derived by
# hand. User ZZ's file order differs from its time order; AA's two reviews share one time (file order
# decides); MM has one review. User and item names sort against their first-appearance order.
FORCED_REVIEWS = [
    review("ZZ", "ITEM_A", 200),
    review("AA", "ITEM_A", 300, rating=4.0, name=None),
    review("MM", "ITEM_A", 100, rating=3.0),
    review("ZZ", "ITEM_Z", 100, rating=1),
    review("AA", "ITEM_Z", 300, rating=4.5),
]
FORCED_META = [
    "{'asin': 'ITEM_Z', 'title': 'Zed', 'price': 3.5, 'categories': [['Books', 'Zcat'], ['Other']]}",
    '{"asin": "UNREVIEWED", "categories": [["Books", "Ycat"]]}',
    "{'asin': 'ITEM_Z', 'categories': [['A later duplicate']]}",
    "{'categories': [], 'asin': 'EMPTY_CATEGORIES'}",
]
# Users by first review (ZZ, AA); negative line first; history oldest first.
FORCED_SAMPLES = [
    "0\tZZ\tITEM_Z\tZcat\tITEM_Z\tZcat",
    "1\tZZ\tITEM_A\tdefault_cat\tITEM_Z\tZcat",
    "0\tAA\tITEM_A\tdefault_cat\tITEM_A\tdefault_cat",
    "1\tAA\tITEM_Z\tZcat\tITEM_A\tdefault_cat",
]


@pytest.fixture(params=[".json", ".json.gz"])
def forced(tmp_path, request):
    """(reviews path, meta path) of the forced data set, plain or gzip."""
    return (write(tmp_path / f"reviews_Forced{request.param}", FORCED_REVIEWS),
            write(tmp_path / f"meta_Forced{request.param}", FORCED_META))


def test_forced_data_set_gives_hand_derived_samples(forced, tmp_path):
    out = tmp_path / "out"
    stats = amazon.prepare(*forced, str(out), test_fraction=0.0)
    assert read_lines(out, amazon.TRAIN_FILE) == FORCED_SAMPLES
    assert read_lines(out, amazon.TEST_FILE) == []
    assert (stats.reviews, stats.users, stats.items, stats.train_pairs, stats.test_pairs) == (5, 3, 2, 2, 0)
    assert (stats.dropped_users, stats.items_without_meta, stats.meta_items) == (1, 1, 4)
    assert (stats.bad_review_lines, stats.bad_meta_lines, stats.truncated) == (0, 0, ())


def test_history_entries_are_joined_by_x02(tmp_path):
    reviews = write(tmp_path / "r.json", [review("U", "I1", 3), review("U", "I2", 1), review("U", "I1", 2),
                                          review("U", "I2", 4)])
    amazon.prepare(reviews, None, str(tmp_path / "out"), test_fraction=0.0)
    assert (tmp_path / "out" / amazon.TRAIN_FILE).read_bytes() == (
        b"0\tU\tI1\tdefault_cat\tI2\x02I1\x02I1\tdefault_cat\x02default_cat\x02default_cat\n"
        b"1\tU\tI2\tdefault_cat\tI2\x02I1\x02I1\tdefault_cat\x02default_cat\x02default_cat\n")


def test_vocabularies_are_counted_on_train_with_ties_by_first_appearance(forced, tmp_path):
    out = tmp_path / "out"
    amazon.prepare(*forced, str(out), test_fraction=0.0)
    # Every uid occurs twice; ITEM_Z and ITEM_A 4 times each; Zcat and default_cat 4 times each.
    assert vocabulary(out, "uid_voc") == {"ZZ": 0, "AA": 1}
    assert vocabulary(out, "mid_voc") == {"default_mid": 0, "ITEM_Z": 1, "ITEM_A": 2}
    # default_cat occurs in the data and keeps id 0 (the original overwrote it with a count rank).
    assert vocabulary(out, "cat_voc") == {"default_cat": 0, "Zcat": 1}


def test_vocabularies_rank_most_frequent_first(tmp_path):
    reviews = write(tmp_path / "r.json", [review("U", "FIRST_SEEN", 1), review("U", "OFTEN", 2),
                                          review("U", "OFTEN", 3), review("U", "OFTEN", 4)])
    amazon.prepare(reviews, None, str(tmp_path / "out"), test_fraction=0.0)
    # Lines: 0 U FIRST_SEEN (history FIRST_SEEN, OFTEN, OFTEN), 1 U OFTEN (same history): OFTEN 5, FIRST_SEEN 3.
    assert vocabulary(tmp_path / "out", "mid_voc") == {"default_mid": 0, "OFTEN": 1, "FIRST_SEEN": 2}


def test_all_pairs_to_test_is_a_data_error_that_writes_nothing(forced, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        amazon.prepare(*forced, str(out), test_fraction=1.0)
    assert str(error.value) == (f"{forced[0]}: no train pairs (train pairs: 0, test pairs: 2, bad lines skipped: 0); "
                                "all 2 pairs went to the test split: use more data, or a lower --test_fraction.")
    assert not out.exists()


def test_info_files_match_the_dien_intermediate_formats(forced, tmp_path):
    out = tmp_path / "out"
    amazon.prepare(*forced, str(out))
    assert read_lines(out, "reviews-info") == [
        "ZZ\tITEM_A\t5.0\t200", "AA\tITEM_A\t4.0\t300", "MM\tITEM_A\t3.0\t100", "ZZ\tITEM_Z\t1.0\t100",
        "AA\tITEM_Z\t4.5\t300"]
    assert read_lines(out, "item-info") == [
        "ITEM_Z\tZcat", "UNREVIEWED\tYcat", "ITEM_Z\tA later duplicate", "EMPTY_CATEGORIES\tdefault_cat"]


def test_without_meta_every_item_gets_default_cat(tmp_path):
    out = tmp_path / "out"
    stats = amazon.prepare(write(tmp_path / "r.json", FORCED_REVIEWS), None, str(out), test_fraction=0.0)
    assert stats.items_without_meta == 2 and stats.meta_items == 0
    assert all(line.split("\t")[3] == "default_cat" for line in read_lines(out, amazon.TRAIN_FILE))
    assert read_lines(out, "item-info") == []
    assert vocabulary(out, "cat_voc") == {"default_cat": 0}


# Several items, so negatives are random: the positive lines and the rules for negatives are checked.
RICH_REVIEWS = [
    review("U1", "B_FICTION", 100),
    review("U2", "B_KIDS", 50),
    review("U1", "B_CAFE", 300),
    review("\u00c9l\u00e8ve", "B_NOMETA", 10),  # escaped in JSON: takes the json.loads path
    review("U1", "B_KIDS", 200),
    review("U2", "B_FICTION", 50),
    review("U2", "B_CAFE", 40),
    review("\u00c9l\u00e8ve", "B_CAFE", 20),
    review("U3", "B_CAFE", 5),
]
RICH_META = [
    "{'asin': 'B_FICTION', 'related': {'also_bought': ['B_KIDS', 'B_CAFE'], 'bought_together': []}, "
    "'salesRank': {'Books': 12}, 'title': 'It\\'s \"quoted\"', 'categories': [['Books', 'Fiction'], ['Kindle']], "
    "'description': 'x, \\'categories\\': [[\\'Not this\\']]'}",
    "{'asin': 'B_KIDS', 'categories': [['Books', \"Children's Books\"]], 'price': 1e-05, 'brand': None}",
    "{'asin': 'B_CAFE', 'imUrl': 'http://x/y.jpg', 'categories': [['Food', u'Caf\\xe9']]}",
]
RICH_CATEGORIES = {"B_FICTION": "Fiction", "B_KIDS": "Children's Books", "B_CAFE": "Caf\u00e9",
                   "B_NOMETA": "default_cat"}
# Positive line fields per user: (mid, cat, hist_mids, hist_cats) by hand.
RICH_POSITIVES = {
    "U1": ("B_CAFE", "Caf\u00e9", "B_FICTION\x02B_KIDS", "Fiction\x02Children's Books"),
    "U2": ("B_FICTION", "Fiction", "B_CAFE\x02B_KIDS", "Caf\u00e9\x02Children's Books"),
    "\u00c9l\u00e8ve": ("B_CAFE", "Caf\u00e9", "B_NOMETA", "default_cat"),
}


def samples(out: pathlib.Path) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Per sample file, its (negative, positive) line pairs, split into fields."""
    pairs = {}
    for name in SAMPLE_FILES:
        lines = [line.split("\t") for line in read_lines(out, name)]
        assert len(lines) % 2 == 0
        pairs[name] = list(zip(lines[0::2], lines[1::2]))
    return pairs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pairs_are_negative_then_last_review_with_its_history(tmp_path, seed):
    out = tmp_path / "out"
    stats = amazon.prepare(write(tmp_path / "r.json.gz", RICH_REVIEWS), write(tmp_path / "m.json", RICH_META),
                           str(out), seed=seed, test_fraction=0.5)
    found = {}
    for negative, positive in [pair for pairs in samples(out).values() for pair in pairs]:
        assert (negative[0], positive[0]) == ("0", "1")
        assert negative[1] == positive[1] and negative[4:] == positive[4:]
        assert negative[2] != positive[2] and negative[2] in RICH_CATEGORIES
        assert negative[3] == RICH_CATEGORIES[negative[2]]
        found[positive[1]] = tuple(positive[2:])
    assert found == RICH_POSITIVES  # U3 (one review) is dropped, every other user appears once
    assert (stats.dropped_users, stats.items_without_meta, stats.train_pairs + stats.test_pairs) == (1, 1, 3)


# Meta lines and whether the RE2 fast path reads them (else json.loads / ast.literal_eval does).
META_PATHS = [
    (RICH_META[0], True),  # escaped 'categories' inside the description is no key
    (RICH_META[1], True),  # a double-quoted category
    (RICH_META[2], False),  # an escape inside the category literal
    (FORCED_META[0], True),
    (FORCED_META[1], False),  # JSON
    (FORCED_META[3], False),  # asin not first
    ("{'asin': 'X1', 'categories': [['A', 'B']], 'description': \"it's 'categories': [['Fake']]\"}", True),
    ("{'asin': 'X2', 'description': \"a, 'categories': [['Fake']]\", 'categories': [['A', 'B']]}", False),
    ("{'asin': 'X3', 'related': {'also_bought': ['Y']}, 'categories': [[]]}", True),
    ("{'asin': 'X4', 'categories': [], 'title': u'T'}", True),
    ("{'asin': 'X5', 'categories': [['A', u'Unicode']]}\r", True),
    ("{'asin': 'X6', 'categories': [['Caf\u00e9']]}", True),  # UTF-8 in the line itself
    ("{'asin': 'X7', 'title': 'No categories'}", False),
]


def meta_block(lines: list[bytes], skip: bool = False) -> tuple[list, int]:
    """(asin, category) rows and bad count of one meta block, as _meta_block reads it."""
    data = b"".join(line + b"\n" for line in lines)
    block = amazon.LineBlock(first_line=1, data=data, lines=len(lines), position=len(data))
    asin, category, bad = amazon._meta_block("m.json", block, skip)
    return list(zip(asin.to_pylist(), category.to_pylist())), bad


@pytest.mark.parametrize("line, fast", META_PATHS, ids=[str(i) for i in range(len(META_PATHS))])
def test_meta_fast_path_agrees_with_literal_eval(line, fast, monkeypatch):
    data = line.encode("utf-8")
    expected = amazon._meta_fields_from_literal(data.rstrip(b"\r"))
    literal_lines = []
    literal = amazon._meta_fields_from_literal
    monkeypatch.setattr(amazon, "_meta_fields_from_literal", lambda text: literal_lines.append(text) or literal(text))
    assert meta_block([data]) == ([expected], 0)
    assert (not literal_lines) == fast


def test_meta_block_keeps_line_order_across_fast_and_slow_lines():
    lines = [line.encode() for line, _ in META_PATHS]
    rows, bad = meta_block(lines[:3] + [b"", b"   ", b"{'asin': 'BAD', 'categories': [['A']]"] + lines[3:], skip=True)
    assert bad == 1
    assert rows == [amazon._meta_fields_from_literal(line.rstrip(b"\r")) for line in lines]


BAD_META_LINES = {
    "truncated": "{'asin': 'X', 'categories': [['A']]",
    "tab in the category": "{'asin': 'X', 'categories': [['A\tB']]}",
    "categories not lists": "{'asin': 'X', 'categories': 'Books'}",
    "no asin": "{'title': 'X', 'categories': [['A']]}",
    "not a dict": "42",
}


@pytest.mark.parametrize("bad", BAD_META_LINES.values(), ids=BAD_META_LINES.keys())
def test_bad_meta_line_names_its_line(bad):
    with pytest.raises(DataError, match=r"^m\.json:2: "):
        meta_block([FORCED_META[0].encode(), bad.encode()])


def test_invalid_utf8_matters_only_in_the_fields_used():
    fine = b"{'asin': 'X', 'description': '\xff', 'categories': [['A']]}"
    assert meta_block([fine]) == ([(b"X", b"A")], 0)
    assert meta_block([b"{'asin': 'X', 'categories': [['A\xff']]}"], skip=True) == ([], 1)


def test_real_review_file_is_read_without_parsing_any_line_in_python(shared_data, tmp_path, monkeypatch):
    path = shared_data / MUSICAL_INSTRUMENTS
    monkeypatch.setattr(amazon, "_review_fields_from_json", refuse_line)
    amazon.prepare(str(path), None, str(tmp_path / "out"))
    with gzip.open(path, "rb") as f:
        records = [json.loads(line) for line in f]
    assert read_lines(tmp_path / "out", "reviews-info") == [
        f"{r['reviewerID']}\t{r['asin']}\t{float(r['overall'])!r}\t{r['unixReviewTime']}" for r in records]


def refuse_line(line):
    raise AssertionError(f"line parsed in Python: {line[:80]!r}")


def test_synthetic_files_take_the_fast_paths(tmp_path, monkeypatch):
    spec = synthetic.SyntheticSpec(num_users=300, num_items=240, num_categories=20, mean_reviews=8.0, max_reviews=30)
    reviews, meta = synthetic.generate(tmp_path / "raw", spec, seed=1, extra_meta_items=50, text_bytes=200)
    monkeypatch.setattr(amazon, "_review_fields_from_json", refuse_line)
    monkeypatch.setattr(amazon, "_meta_fields_from_literal", refuse_line)
    stats = amazon.prepare(reviews, meta, str(tmp_path / "out"))
    assert (stats.users, stats.meta_items, stats.items_without_meta) == (300, 290, 0)


# Review lines on which pyarrow and json.loads could disagree; with on_bad_line='skip' the result must not
# depend on whether a line is read in a block of good lines (pyarrow) or among bad ones (json.loads).
TRICKY_REVIEWS = [
    review("U1", "I1", 10, rating=5).encode(),  # an integer rating
    b'{"reviewerID": "U1", "asin": "I2", "overall": 4.0, "unixReviewTime": 20.0}',  # a float time
    b'{"reviewerID": "U2", "asin": "I9", "asin": "I3", "overall": 3.0, "unixReviewTime": 5}',  # the last asin counts
    review("U2", "I2", 6).encode().replace(b"Fine", b"\xff\xfe"),  # bad UTF-8 in the text only
    review("U2", "I1", 7).encode() + b"\r",
    b"",
    b"   ",
    b'{"reviewerID": "U3", "asin": "I1", "overall": NaN, "unixReviewTime": 1}',  # bad
    review("U3", "I2", 2).encode() + review("U3", "I3", 3).encode(),  # bad: two objects on a line
    review("U\t3", "I1", 2).encode(),  # bad: an escaped tab in the id
    b'{"reviewerID": "U3", "asin": "I2", "overall": 2.0, "unixReviewTime": 1e30}',  # bad: out of range
    review("U3", "I2", 2).encode().replace(b'"U3"', b'"\xff"'),  # bad: bad UTF-8 in the id
    review("U3", "I3", 4).encode(),
    review("U3", "I1", 5).encode(),
]


@pytest.mark.parametrize("block_bytes", [1, 1 << 20])
def test_tricky_review_lines_count_the_same_in_any_block(tmp_path, monkeypatch, block_bytes):
    path = tmp_path / "r.json"
    path.write_bytes(b"\n".join(TRICKY_REVIEWS) + b"\n")
    monkeypatch.setattr(amazon, "_BLOCK_BYTES", block_bytes)
    stats = amazon.prepare(str(path), None, str(tmp_path / "out"), on_bad_line="skip")
    assert (stats.reviews, stats.bad_review_lines, stats.users) == (7, 5, 3)
    assert read_lines(tmp_path / "out", "reviews-info") == [
        "U1\tI1\t5.0\t10", "U1\tI2\t4.0\t20", "U2\tI3\t3.0\t5", "U2\tI2\t5.0\t6", "U2\tI1\t5.0\t7",
        "U3\tI3\t5.0\t4", "U3\tI1\t5.0\t5"]


@pytest.mark.parametrize("format", amazon.FORMATS)
def test_block_and_chunk_sizes_do_not_change_the_output(tmp_path, monkeypatch, format):
    reviews, meta = write(tmp_path / "r.json", RICH_REVIEWS), write(tmp_path / "m.json", RICH_META)
    amazon.prepare(reviews, meta, str(tmp_path / "whole"), format=format)
    monkeypatch.setattr(amazon, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(amazon, "_WRITE_ROWS", 1)
    amazon.prepare(reviews, meta, str(tmp_path / "pieces"), format=format)
    assert sorted(os.listdir(tmp_path / "whole")) == sorted(os.listdir(tmp_path / "pieces"))
    for name in os.listdir(tmp_path / "whole"):
        if format == "text":
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "pieces" / name).read_bytes(), name
        else:  # a Parquet file has a row group per chunk; its rows must be the same
            assert read_any(tmp_path / "whole" / name) == read_any(tmp_path / "pieces" / name), name


def read_any(path: pathlib.Path):
    """A Parquet file's rows, else the file's bytes."""
    return pq.read_table(path).to_pylist() if path.suffix == ".parquet" else path.read_bytes()


def test_same_seed_same_bytes_other_seed_other_samples(shared_data, tmp_path):
    reviews = str(shared_data / MUSICAL_INSTRUMENTS)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        amazon.prepare(reviews, None, str(tmp_path / name), seed=seed)
    for name in OUTPUT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / amazon.TRAIN_FILE).read_bytes() != (tmp_path / "c" / amazon.TRAIN_FILE).read_bytes()


def reference_positives(lines: list[bytes]) -> dict[str, tuple[str, str]]:
    """uid -> (last item, earlier items joined by \\x02), by plain Python over the raw review lines."""
    by_user: dict[str, list[tuple[int, str]]] = {}
    for line in lines:
        record = json.loads(line)
        by_user.setdefault(record["reviewerID"], []).append((record["unixReviewTime"], record["asin"]))
    result = {}
    for uid, reviews in by_user.items():
        items = [asin for _, asin in sorted(reviews, key=lambda r: r[0])]  # sorted() is stable
        result[uid] = (items[-1], "\x02".join(items[:-1]))
    return result


def test_musical_instruments_prepares(shared_data, tmp_path):
    path = shared_data / MUSICAL_INSTRUMENTS
    out = tmp_path / "out"
    stats = amazon.prepare(str(path), None, str(out))
    assert (stats.reviews, stats.users, stats.items, stats.dropped_users) == (10_261, 1_429, 900, 0)
    assert stats.train_pairs + stats.test_pairs == 1_429
    assert 0.05 < stats.test_pairs / 1_429 < 0.15
    pairs = samples(out)
    train_users = {positive[1] for _, positive in pairs[amazon.TRAIN_FILE]}
    test_users = {positive[1] for _, positive in pairs[amazon.TEST_FILE]}
    assert not train_users & test_users and len(train_users) + len(test_users) == 1_429
    with gzip.open(path, "rb") as f:
        expected = reference_positives(f.read().splitlines())
    for negative, positive in pairs[amazon.TRAIN_FILE] + pairs[amazon.TEST_FILE]:
        assert (positive[2], positive[4]) == expected[positive[1]]
        assert negative[2] != positive[2]
    assert len(read_lines(out, "reviews-info")) == 10_261
    assert len(vocabulary(out, "uid_voc")) == stats.train_pairs
    assert len(vocabulary(out, "mid_voc")) <= 901


def test_truncated_gzip_is_a_data_error_naming_the_file(shared_data, tmp_path):
    path = str(shared_data / "amazon_reviews/reviews_Electronics_5.TRUNCATED.json.gz")
    with pytest.raises(DataError, match="reviews_Electronics_5.TRUNCATED.json.gz") as error:
        amazon.prepare(path, None, str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_with_skip_keeps_the_readable_lines(shared_data, tmp_path):
    path = str(shared_data / "amazon_reviews/reviews_Electronics_5.TRUNCATED.json.gz")
    stats = amazon.prepare(path, None, str(tmp_path / "out"), on_bad_line="skip")
    assert stats.truncated == (f"{path} (after line 290)",) and stats.reviews == 290


def test_cli_warns_when_a_skipped_truncation_leaves_the_test_split_empty(tmp_path, capsys):
    reviews = truncated_gzip(tmp_path / "r.json.gz", FORCED_REVIEWS[:2] + ["{not json"] + FORCED_REVIEWS[2:])
    cli.run(["amazon"], lambda _: amazon.prepare(reviews, None, str(tmp_path / "out"), test_fraction=0.0,
                                                 on_bad_line="skip"))
    out, err = capsys.readouterr()
    assert f"truncated           {reviews} (after line 6)\n" in out
    counts = "train pairs: 2, test pairs: 0, bad lines skipped: 1"
    assert err.splitlines() == [
        f"warning: truncated input: {reviews} (after line 6) - the rest of its gzip stream is missing or corrupt "
        f"and was not read ({counts}); fetch the file again for the whole data set.",
        f"warning: skipped 1 malformed lines ({counts}); rerun with --on_bad_line=error to see the first one with "
        "its line number.",
        f"warning: the test split is empty ({counts}); python -m din_jax.main loads it even with "
        "--config.no_eval=true and stops there - prepare again from complete raw files, or with more users or a "
        "larger --test_fraction."]
    assert read_lines(tmp_path / "out", amazon.TRAIN_FILE) == [
        line.replace("Zcat", "default_cat") for line in FORCED_SAMPLES]


def test_cli_fails_in_one_line_when_a_skipped_truncation_leaves_no_train_pair(tmp_path, capsys):
    reviews = truncated_gzip(tmp_path / "r.json.gz", FORCED_REVIEWS[:3])  # three users, one review each
    with pytest.raises(SystemExit) as exit:
        cli.run(["amazon"], lambda _: amazon.prepare(reviews, None, str(tmp_path / "out"), on_bad_line="skip"))
    assert exit.value.code == 1
    assert capsys.readouterr() == ("", (
        f"error: {reviews}: no train pairs (train pairs: 0, test pairs: 0, bad lines skipped: 0); the input is "
        f"truncated at {reviews} (after line 3): fetch it again, or use more data.\n"))
    assert not (tmp_path / "out").exists()


def test_too_small_an_input_is_a_data_error_even_without_skipping(tmp_path):
    reviews = write(tmp_path / "r.json", FORCED_REVIEWS[:3])
    with pytest.raises(DataError, match=r"r\.json: no train pairs \(train pairs: 0, test pairs: 0, bad lines "
                                        r"skipped: 0\); the input is too small: every user has a single"):
        amazon.prepare(reviews, None, str(tmp_path / "out"))


BAD_LINES = {
    "not json": "{not json",
    "missing reviewerID": '{"asin": "I1", "overall": 5.0, "unixReviewTime": 1}',
    "empty asin": '{"reviewerID": "U9", "asin": "", "overall": 5.0, "unixReviewTime": 1}',
    "non-numeric time": review("U9", "I1", "yesterday"),
    "non-numeric rating": review("U9", "I1", 1, rating="five"),
    "tab in an id": review("U\t9", "I1", 1),
    "a list": "[1, 2]",
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_review_line_is_an_error_with_its_line_number(tmp_path, bad):
    path = write(tmp_path / "r.json", FORCED_REVIEWS[:2] + ["", bad] + FORCED_REVIEWS[2:])
    with pytest.raises(DataError, match=r"r\.json:4: ") as error:
        amazon.prepare(path, None, str(tmp_path / "out"))
    assert "\n" not in str(error.value)


def test_bad_review_lines_are_counted_with_skip(tmp_path):
    path = write(tmp_path / "r.json", FORCED_REVIEWS[:2] + list(BAD_LINES.values()) + FORCED_REVIEWS[2:])
    out = tmp_path / "out"
    stats = amazon.prepare(path, None, str(out), test_fraction=0.0, on_bad_line="skip")
    assert stats.bad_review_lines == len(BAD_LINES) and stats.reviews == len(FORCED_REVIEWS)
    assert [line.split("\t")[:3] for line in read_lines(out, amazon.TRAIN_FILE)] == [
        line.split("\t")[:3] for line in FORCED_SAMPLES]


def test_bad_meta_line_is_an_error_or_counted(tmp_path):
    reviews = write(tmp_path / "r.json", FORCED_REVIEWS)
    meta = write(tmp_path / "m.json", FORCED_META[:1] + ["{'asin': 'X', 'categories': 'Books'}",
                                                         "{'asin': 'X', 'categories': [['A']]", "42"])
    with pytest.raises(DataError, match=r"m\.json:2: "):
        amazon.prepare(reviews, meta, str(tmp_path / "out"))
    stats = amazon.prepare(reviews, meta, str(tmp_path / "out"), on_bad_line="skip")
    assert (stats.bad_meta_lines, stats.meta_items) == (3, 1)


def test_an_error_leaves_earlier_outputs_untouched(tmp_path):
    reviews = write(tmp_path / "r.json", FORCED_REVIEWS)
    out = tmp_path / "out"
    amazon.prepare(reviews, write(tmp_path / "m.json", FORCED_META), str(out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    bad_meta = write(tmp_path / "bad.json", FORCED_META + ["{'asin': "])
    with pytest.raises(DataError, match=r"bad\.json:5: "):
        amazon.prepare(reviews, bad_meta, str(out), seed=4)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_parquet_replaces_earlier_text_samples_and_back(tmp_path):
    reviews, meta = write(tmp_path / "r.json", RICH_REVIEWS), write(tmp_path / "m.json", RICH_META)
    out = tmp_path / "out"
    amazon.prepare(reviews, meta, str(out))
    amazon.prepare(reviews, meta, str(out), format="parquet")
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES[2:] + tuple(f + ".parquet" for f in SAMPLE_FILES))
    table = pq.read_table(out / (amazon.TRAIN_FILE + ".parquet"))
    assert table.schema == amazon.SAMPLE_SCHEMA
    assert table.column("label").to_pylist()[:2] == [0, 1] and table.num_rows % 2 == 0
    amazon.prepare(reviews, meta, str(out))
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES)


def test_parquet_output_is_the_same_bytes_for_the_same_seed(tmp_path):
    reviews, meta = write(tmp_path / "r.json", RICH_REVIEWS), write(tmp_path / "m.json", RICH_META)
    for name in ("a", "b"):
        amazon.prepare(reviews, meta, str(tmp_path / name), format="parquet", test_fraction=0.5)
    for name in SAMPLE_FILES:
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (tmp_path / "b" / f"{name}.parquet").read_bytes()


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal(tmp_path, capfd):
    amazon.prepare(write(tmp_path / "r.json", FORCED_REVIEWS), write(tmp_path / "m.json", FORCED_META),
                   str(tmp_path / "out"), progress=True)
    assert capfd.readouterr() == ("", "")


def test_empty_review_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"r\.json: has no reviews"):
        amazon.prepare(write(tmp_path / "r.json", []), None, str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"r\.json: has no usable review lines \(1 bad lines skipped\)"):
        amazon.prepare(write(tmp_path / "r.json", ["{"]), None, str(tmp_path / "out"), on_bad_line="skip")


def test_cli_prepares_and_prints_a_summary(tmp_path):
    reviews = write(tmp_path / "r.json", FORCED_REVIEWS)
    result = subprocess.run([sys.executable, "-m", "input_pipeline.amazon", "--reviews", reviews,
                             "--out_dir", str(tmp_path / "out"), "--test_fraction", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train_pairs" in result.stdout and "dropped_users" in result.stdout
    assert read_lines(tmp_path / "out", amazon.TRAIN_FILE) == [
        line.replace("Zcat", "default_cat") for line in FORCED_SAMPLES]


def test_cli_writes_parquet(tmp_path):
    reviews = write(tmp_path / "r.json", FORCED_REVIEWS)
    result = subprocess.run([sys.executable, "-m", "input_pipeline.amazon", "--reviews", reviews, "--format=parquet",
                             "--noprogress", "--out_dir", str(tmp_path / "out"), "--test_fraction", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out" / (amazon.TRAIN_FILE + ".parquet"))
    assert table.column("mid").to_pylist() == ["ITEM_Z", "ITEM_A", "ITEM_A", "ITEM_Z"]
    assert table.column("hist_mids").to_pylist() == [["ITEM_Z"], ["ITEM_Z"], ["ITEM_A"], ["ITEM_A"]]


def test_cli_reports_a_data_error_in_one_line(tmp_path):
    missing = str(tmp_path / "reviews_Missing.json.gz")
    result = subprocess.run([sys.executable, "-m", "input_pipeline.amazon", "--reviews", missing,
                             "--out_dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and missing in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
