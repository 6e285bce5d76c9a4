"""Specification of input_pipeline.dien: DIEN sample files + vocabularies -> encoded columns."""

from __future__ import annotations

import os
import pickle
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from input_pipeline import amazon, dien, synthetic
from input_pipeline.errors import DataError

from tests.conftest import SHARED_DATA
from tests.test_amazon import FORCED_REVIEWS, write as write_reviews

SHARED = str(SHARED_DATA)
FRAGMENT = os.path.join(SHARED, "dien_fragments", "local_test")
PICKLES = os.path.join(SHARED, "vocab_pickles")

# Ids: line numbers, so the `default_*` tokens at line 0 share id 0 with unknown tokens.
VOCABS = {
    "uid": ["default_uid", "u1", "u2"],
    "mid": ["default_mid", "m1", "m2", "m3"],
    "cat": ["default_cat", "c1", "c2"],
}
FOUR_LINES = (
    b"1\tu1\tm1\tc1\tm2\x02m3\tc2\x02c1\n"
    b"0\tu2\tm9\tc2\t\t\n"
    b"1.0\tu9\tm3\tc1\tm1\tc1\n"
    b"0\tu1\tm2\tc2\tm3\x02m9\x02m1\tc1\x02c2\x02c9\n"
    b"\n"
)


def write_vocabs(directory, vocabs: dict[str, list[str]] = VOCABS) -> None:
    """Writes `<name>_voc.txt` files, one token a line."""
    for name, tokens in vocabs.items():
        (directory / f"{name}_voc.txt").write_text("\n".join(tokens) + "\n")


def prepared_dir(tmp_path, samples: bytes, split: str = "test"):
    """A data directory holding the hand-written vocabularies and one sample file."""
    write_vocabs(tmp_path)
    (tmp_path / dien.SPLIT_FILES[split]).write_bytes(samples)
    return tmp_path


def load(directory, split: str = "test") -> dien.EncodedSplit:
    """load_split with the directory's own vocabularies."""
    return dien.load_split(directory, split, dien.load_vocabularies(directory))


def assert_splits_equal(a: dien.EncodedSplit, b: dien.EncodedSplit) -> None:
    """Every column equal, dtype included."""
    for name in dien.COLUMNS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name


def test_four_line_file_encodes_exactly(tmp_path):
    split = load(prepared_dir(tmp_path, FOUR_LINES))
    assert len(split) == 4
    np.testing.assert_array_equal(split.label, np.array([1, 0, 1, 0], np.float32))
    np.testing.assert_array_equal(split.uid, [1, 2, 0, 1])
    np.testing.assert_array_equal(split.mid, [1, 0, 3, 2])
    np.testing.assert_array_equal(split.cat, [1, 2, 1, 2])
    np.testing.assert_array_equal(split.hist_start, [0, 2, 2, 3])
    np.testing.assert_array_equal(split.hist_mids, [2, 3, 1, 3, 0, 1])
    np.testing.assert_array_equal(split.hist_cats, [2, 1, 1, 1, 2, 0])
    np.testing.assert_array_equal(split.hist_lengths, [2, 0, 1, 3])
    np.testing.assert_array_equal(split.user, [0, 1, 2, 0])
    dtypes = {name: getattr(split, name).dtype for name in dien.COLUMNS}
    assert dtypes == {"label": np.float32, "uid": np.int32, "mid": np.int32, "cat": np.int32,
                      "hist_start": np.int64, "hist_lengths": np.int32, "hist_mids": np.int32, "hist_cats": np.int32,
                      "user": np.int32}
    assert split.hist_lengths.dtype == np.int32


def test_histories_encoded_in_chunks_match_one_pass(tmp_path, monkeypatch):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    path, vocabs = directory / dien.TEST_FILE, dien.load_vocabularies(directory)
    one_pass = dien.encode_file(path, vocabs)
    monkeypatch.setattr(dien, "HISTORY_CHUNK_LINES", 1)  # line 2's chunk holds no entries at all
    assert_splits_equal(dien.encode_file(path, vocabs), one_pass)


def test_unknown_tokens_map_to_zero_and_unknown_users_stay_distinct(tmp_path):
    samples = b"0\tstranger1\tnope\tnada\tnope\tnada\n1\tstranger2\tm1\tc1\t\t\n"
    split = load(prepared_dir(tmp_path, samples))
    np.testing.assert_array_equal(split.uid, [0, 0])
    np.testing.assert_array_equal(split.mid, [0, 1])
    np.testing.assert_array_equal(split.cat, [0, 1])
    np.testing.assert_array_equal(split.hist_mids, [0])
    np.testing.assert_array_equal(split.user, [0, 1])


def test_all_histories_empty(tmp_path):
    directory = prepared_dir(tmp_path, b"1\tu1\tm1\tc1\t\t\n0\tu2\tm2\tc2\t\t\n")
    for _ in range(2):  # encoded, then from the cache of zero-length columns
        split = load(directory)
        np.testing.assert_array_equal(split.hist_start, [0, 0])
        np.testing.assert_array_equal(split.hist_lengths, [0, 0])
        assert split.hist_mids.shape == (0,) and split.hist_cats.shape == (0,)


def reference_encode(path, vocabs: dict[str, dict[str, int]]) -> dict[str, list]:
    """A slow line-by-line reading of a sample file, the oracle for the fast encoder."""
    out = {name: [] for name in ("label", "uid", "mid", "cat", "hist_mids", "hist_cats", "user")}
    users: dict[str, int] = {}
    with open(path, newline="") as f:
        for line in f:
            label, uid, mid, cat, hist_mids, hist_cats = line.rstrip("\r\n").split("\t")
            out["label"].append(float(label))
            out["uid"].append(vocabs["uid"].get(uid, 0))
            out["mid"].append(vocabs["mid"].get(mid, 0))
            out["cat"].append(vocabs["cat"].get(cat, 0))
            out["hist_mids"].append([vocabs["mid"].get(t, 0) for t in hist_mids.split("\x02")])
            out["hist_cats"].append([vocabs["cat"].get(t, 0) for t in hist_cats.split("\x02")])
            out["user"].append(users.setdefault(uid, len(users)))
    return out


def test_real_crlf_fragment_matches_line_by_line_reading(tmp_path, shared_data):
    with open(FRAGMENT, "rb") as f:
        assert b"\r\n" in f.read()
    shutil.copy(FRAGMENT, tmp_path / dien.TEST_FILE)
    # Vocabularies of every token in the file, after a placeholder at id 0.
    tokens = {"uid": set(), "mid": set(), "cat": set()}
    with open(FRAGMENT, newline="") as f:
        for line in f:
            _, uid, mid, cat, hist_mids, hist_cats = line.rstrip("\r\n").split("\t")
            tokens["uid"].add(uid)
            tokens["mid"].update([mid, *hist_mids.split("\x02")])
            tokens["cat"].update([cat, *hist_cats.split("\x02")])
    write_vocabs(tmp_path, {name: ["<unk>", *sorted(found)] for name, found in tokens.items()})
    vocabs = dien.load_vocabularies(tmp_path)

    split = dien.load_split(tmp_path, "test", vocabs)

    expected = reference_encode(FRAGMENT, {"uid": vocabs.uid, "mid": vocabs.mid, "cat": vocabs.cat})
    assert len(split) == 38
    for name in ("label", "uid", "mid", "cat", "user"):
        np.testing.assert_array_equal(getattr(split, name), expected[name], err_msg=name)
    lengths = [len(h) for h in expected["hist_mids"]]
    np.testing.assert_array_equal(split.hist_lengths, lengths)
    np.testing.assert_array_equal(split.hist_mids, np.concatenate(expected["hist_mids"]))
    np.testing.assert_array_equal(split.hist_cats, np.concatenate(expected["hist_cats"]))
    # Every token is in the vocabulary, so a '\r' left on the last field would show up as a 0.
    assert split.hist_cats.min() > 0 and split.mid.min() > 0
    assert vocabs.cat["Books"] in split.hist_cats[split.hist_start + split.hist_lengths - 1]


# ---------------------------------------------------------------------------------------------
# Vocabularies


def test_text_vocab_ids_are_line_numbers_crlf_included(tmp_path):
    path = tmp_path / "mid_voc.txt"
    path.write_bytes(b"default_mid\r\nb\r\na\r\n")
    assert dien.load_vocab(path) == {"default_mid": 0, "b": 1, "a": 2}


def test_text_vocab_repeated_token_names_the_line(tmp_path):
    path = tmp_path / "mid_voc.txt"
    path.write_text("a\nb\na\n")
    with pytest.raises(DataError, match=f"{path}:3: token 'a' already has id 0"):
        dien.load_vocab(path)


def test_python2_pickles_load_with_sizes_max_id_plus_one(shared_data):
    vocabs = dien.load_vocabularies(PICKLES)
    assert vocabs.mid["default_mid"] == 24915
    assert vocabs.sizes == {"uid": 70679, "mid": 24916, "cat": 1601}
    assert all(type(k) is str for k in vocabs.cat)


def test_txt_is_preferred_over_pkl_and_pickle(tmp_path):
    for name in dien.VOCAB_NAMES:
        with open(tmp_path / f"{name}_voc.pkl", "wb") as f:
            pickle.dump({"from_pkl": 7}, f)
        with open(tmp_path / f"{name}_voc.pickle", "wb") as f:
            pickle.dump({"from_pickle": 9}, f)
    (tmp_path / "uid_voc.txt").write_text("x\nfrom_txt\n")
    vocabs = dien.load_vocabularies(tmp_path)
    assert vocabs.uid == {"x": 0, "from_txt": 1}
    assert vocabs.mid == {"from_pkl": 7}
    assert vocabs.sizes == {"uid": 2, "mid": 8, "cat": 8}


def test_missing_vocabulary_says_how_to_prepare(tmp_path):
    write_vocabs(tmp_path)
    os.remove(tmp_path / "cat_voc.txt")
    with pytest.raises(DataError, match=r"no cat vocabulary .*python -m input_pipeline\.amazon"):
        dien.load_vocabularies(tmp_path)


class _RunsAShellCommand:
    """Unpickling this calls os.system(command) in a plain pickle.load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mid_voc.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a": _RunsAShellCommand(f"touch {marker}")}, f, protocol=0)
    with pytest.raises(DataError, match=f"{path}: not a plain pickled dict .*refusing to load the global"):
        dien.load_vocab(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, problem", [
    (["a", "b"], "holds a list, not a dict"),
    ({"a": "b"}, "entry 'a': 'b' is not str -> non-negative int"),
    ({"a": -1}, "entry 'a': -1 is not str -> non-negative int"),
    ({b"a": 1}, "entry b'a': 1 is not str -> non-negative int"),
    ({}, "empty vocabulary"),
])
def test_pickle_that_is_not_a_str_to_int_dict_is_refused(tmp_path, content, problem):
    path = tmp_path / "cat_voc.pkl"
    with open(path, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DataError, match=f"^{path}: {problem}"):
        dien.load_vocab(path)


def test_truncated_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "uid_voc.pkl"
    path.write_bytes(pickle.dumps({"a": 1, "b": 2})[:-3])
    with pytest.raises(DataError, match=f"{path}: not a plain pickled dict"):
        dien.load_vocab(path)


# ---------------------------------------------------------------------------------------------
# Bad sample files


GOOD = b"1\tu1\tm1\tc1\tm2\tc2\n"


@pytest.mark.parametrize("bad_line, problem", [
    (b"1\tu1\tm1\tc1\tm2\n",
     "expected 6 tab-separated fields (label uid mid cat hist_mids hist_cats), found 5"),
    (b"1\tu1\tm1\tc1\tm2\tc2\textra\n",
     "expected 6 tab-separated fields (label uid mid cat hist_mids hist_cats), found 7"),
    (b"\n", "expected 6 tab-separated fields (label uid mid cat hist_mids hist_cats), found 1"),
    (b"yes\tu1\tm1\tc1\tm2\tc2\n", "label 'yes' is not 0 or 1"),
    (b"2\tu1\tm1\tc1\tm2\tc2\n", "label '2' is not 0 or 1"),
    (b"1\tu1\tm1\tc1\tm2\x02m3\tc2\n", "hist_mids has 2 entries but hist_cats has 1"),
    (b"1\tu1\tm1\tc1\t\tc2\n", "hist_mids has 0 entries but hist_cats has 1"),
])
def test_bad_line_is_a_data_error_naming_file_and_line(tmp_path, bad_line, problem):
    directory = prepared_dir(tmp_path, GOOD + GOOD + bad_line + GOOD)
    path = os.path.join(directory, dien.TEST_FILE)
    with pytest.raises(DataError) as error:
        load(directory)
    assert str(error.value).startswith(f"{path}:3: {problem}")


def test_missing_sample_file_says_how_to_prepare(tmp_path):
    write_vocabs(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path / dien.TRAIN_FILE}: no such sample file "
                                        rf"\(nor {dien.TRAIN_FILE}\.parquet\); "
                                        r"prepare the directory with `python -m input_pipeline\.amazon`"):
        load(tmp_path, "train")


@pytest.mark.parametrize("split, more", [("test", "a larger"), ("train", "a lower")])
def test_empty_sample_file_names_the_empty_split_not_a_missing_preparation(tmp_path, split, more):
    path = tmp_path / dien.SPLIT_FILES[split]
    with pytest.raises(DataError) as error:
        load(prepared_dir(tmp_path, b"\r\n\n", split), split)
    assert str(error.value) == (f"{path}: the file is empty (0 samples); the preparation that wrote it kept no "
                                f"{split} pairs - prepare again from complete raw files, or with more users (or "
                                f"{more} --test_fraction).")


@pytest.mark.parametrize("format", amazon.FORMATS)
def test_prepared_directory_with_an_empty_test_split_says_so(tmp_path, format):
    reviews = write_reviews(tmp_path / "r.json", FORCED_REVIEWS)
    amazon.prepare(reviews, None, str(tmp_path / "out"), test_fraction=0.0, format=format)
    with pytest.raises(DataError, match=r"local_test_splitByUser(\.parquet)?: the file (is empty|has no rows) "
                                        r"\(0 samples\); the preparation that wrote it kept no test pairs") as error:
        load(tmp_path / "out")
    assert "input_pipeline.amazon" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Parquet


# FOUR_LINES as Parquet columns.
FOUR_ROWS = {
    "label": pa.array([1, 0, 1, 0], pa.int8()),
    "uid": pa.array(["u1", "u2", "u9", "u1"]),
    "mid": pa.array(["m1", "m9", "m3", "m2"]),
    "cat": pa.array(["c1", "c2", "c1", "c2"]),
    "hist_mids": pa.array([["m2", "m3"], [], ["m1"], ["m3", "m9", "m1"]]),
    "hist_cats": pa.array([["c2", "c1"], [], ["c1"], ["c1", "c2", "c9"]]),
}


def parquet_dir(tmp_path, columns: dict = FOUR_ROWS, split: str = "test"):
    """A data directory holding the hand-written vocabularies and one Parquet sample file."""
    write_vocabs(tmp_path)
    pq.write_table(pa.table(columns), tmp_path / (dien.SPLIT_FILES[split] + dien.PARQUET_SUFFIX))
    return tmp_path


def subdir(tmp_path, name: str):
    """A new directory under tmp_path."""
    (tmp_path / name).mkdir()
    return tmp_path / name


def test_parquet_file_encodes_like_the_text_file(tmp_path):
    assert_splits_equal(load(parquet_dir(tmp_path)), load(prepared_dir(subdir(tmp_path, "text"), FOUR_LINES)))


def test_text_and_parquet_preparations_encode_to_identical_arrays(tmp_path):
    spec = synthetic.SyntheticSpec(num_users=400, num_items=240, num_categories=20, mean_reviews=8.0, max_reviews=30)
    reviews, meta = synthetic.generate(tmp_path / "raw", spec, seed=2)
    for format in amazon.FORMATS:
        amazon.prepare(reviews, meta, str(tmp_path / format), format=format, test_fraction=0.3)
    assert not (tmp_path / "parquet" / dien.TRAIN_FILE).exists()
    for split in dien.SPLIT_FILES:
        text, parquet = load(tmp_path / "text", split), load(tmp_path / "parquet", split)
        assert len(text) > 50
        assert_splits_equal(text, parquet)


def test_string_like_column_types_are_accepted(tmp_path):
    columns = dict(FOUR_ROWS, uid=FOUR_ROWS["uid"].dictionary_encode(), mid=FOUR_ROWS["mid"].cast(pa.large_string()),
                   label=pa.array([True, False, True, False]),
                   hist_cats=FOUR_ROWS["hist_cats"].cast(pa.large_list(pa.large_string())))
    assert_splits_equal(load(parquet_dir(tmp_path, columns)), load(parquet_dir(subdir(tmp_path, "plain"))))


def test_parquet_is_preferred_over_text_when_both_exist(tmp_path):
    directory = parquet_dir(tmp_path, dict(FOUR_ROWS, mid=pa.array(["m3", "m3", "m3", "m3"])))
    (directory / dien.TEST_FILE).write_bytes(FOUR_LINES)
    np.testing.assert_array_equal(load(directory).mid, [3, 3, 3, 3])


def test_parquet_second_load_memory_maps_the_cache(tmp_path, monkeypatch):
    directory = parquet_dir(tmp_path)
    first = load(directory)
    monkeypatch.setattr(dien, "encode_file", refuse_to_parse)
    second = load(directory)
    assert_splits_equal(first, second)
    assert isinstance(second.hist_mids.base, np.memmap)


@pytest.mark.parametrize("change, problem", [
    ({"hist_cats": None}, r": has no column 'hist_cats' \(a Parquet sample file needs label uid mid cat "),
    ({"label": pa.array([1, 0, 2, 0])}, r":3: label 2 is not 0 or 1"),
    ({"label": pa.array([[1], [0], [1], [0]])}, r": column 'label' \(list<\w+: int64>\) is not numeric"),
    ({"uid": pa.array(["u1", None, "u9", "u1"])}, r":2: uid is null"),
    ({"hist_cats": pa.array([["c2"], [], ["c1"], ["c1", "c2", "c9"]])},
     r":1: hist_mids has 2 entries but hist_cats has 1"),
    ({"hist_mids": pa.array([["m2", "m3"], [], ["m1"], ["m3", None, "m1"]])}, r":4: hist_mids holds a null entry"),
    ({"hist_mids": pa.array([1, 2, 3, 4])}, r": column 'hist_mids' \(int64\) is not lists of strings"),
])
def test_bad_parquet_sample_file_is_a_data_error_naming_file_and_row(tmp_path, change, problem):
    columns = {name: column for name, column in dict(FOUR_ROWS, **change).items() if column is not None}
    directory = parquet_dir(tmp_path, columns)
    path = os.path.join(directory, dien.TEST_FILE + dien.PARQUET_SUFFIX)
    with pytest.raises(DataError, match="^" + re.escape(path) + problem):
        load(directory)


def test_unreadable_or_empty_parquet_is_a_data_error(tmp_path):
    write_vocabs(tmp_path)
    path = tmp_path / (dien.TEST_FILE + dien.PARQUET_SUFFIX)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load(tmp_path)
    pq.write_table(pa.table({name: column.slice(0, 0) for name, column in FOUR_ROWS.items()}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: the file has no rows (0 samples); the preparation that "
                                                  "wrote it kept no test pairs - prepare again from complete raw "
                                                  "files, or with more users (or a larger --test_fraction).")):
        load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Cache


def cache_entries(directory) -> list[str]:
    """Names under the directory's .din_cache."""
    return sorted(os.listdir(directory / dien.CACHE_DIR))


def refuse_to_parse(*args, **kwargs):
    raise AssertionError("the sample file was parsed again")


def test_second_load_memory_maps_the_cache_without_parsing(tmp_path, monkeypatch):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    first = load(directory)
    [entry] = cache_entries(directory)
    assert sorted(os.listdir(directory / dien.CACHE_DIR / entry)) == sorted(f"{c}.npy" for c in dien.COLUMNS)
    monkeypatch.setattr(dien, "encode_file", refuse_to_parse)
    second = load(directory)
    assert_splits_equal(first, second)
    assert isinstance(second.hist_mids.base, np.memmap)


def test_changed_sample_file_invalidates_the_cache(tmp_path):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    assert len(load(directory)) == 4
    (directory / dien.TEST_FILE).write_bytes(FOUR_LINES.rstrip() + b"\n1\tu2\tm2\tc2\tm1\tc1\n")
    split = load(directory)
    assert len(split) == 5 and split.mid[-1] == 2
    assert len(cache_entries(directory)) == 1  # the stale cache is removed


def test_changed_vocabulary_invalidates_the_cache(tmp_path):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    np.testing.assert_array_equal(load(directory).mid, [1, 0, 3, 2])
    (directory / "mid_voc.txt").write_text("default_mid\nm3\nm2\nm1\nm9\n")
    np.testing.assert_array_equal(load(directory).mid, [3, 4, 1, 2])


def test_in_memory_vocabularies_key_the_cache_by_content(tmp_path):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    vocabs = {name: {token: i for i, token in enumerate(tokens)} for name, tokens in VOCABS.items()}
    first = dien.load_split(directory, "test", dien.Vocabularies(**vocabs))
    vocabs["mid"] = {"m9": 5}
    second = dien.load_split(directory, "test", dien.Vocabularies(**vocabs))
    np.testing.assert_array_equal(first.mid, [1, 0, 3, 2])
    np.testing.assert_array_equal(second.mid, [0, 5, 0, 0])


def test_unwritable_cache_location_falls_back_to_memory(tmp_path):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    (directory / dien.CACHE_DIR).write_text("a file where the cache directory should be")
    expected = dien.encode_file(directory / dien.TEST_FILE, dien.load_vocabularies(directory))
    assert_splits_equal(load(directory), expected)


def test_interrupted_cache_write_leaves_no_partial_cache(tmp_path, monkeypatch):
    directory = prepared_dir(tmp_path, FOUR_LINES)
    save = dien._save_synced
    saved = []

    def save_then_fail(path, array):
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(path)
        save(path, array)

    monkeypatch.setattr(dien, "_save_synced", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        load(directory)
    assert cache_entries(directory) == []
    monkeypatch.setattr(dien, "_save_synced", save)
    assert len(load(directory)) == 4
    assert len(cache_entries(directory)) == 1


def test_split_name_must_be_train_or_test(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        dien.load_split(prepared_dir(tmp_path, FOUR_LINES), "valid", dien.load_vocabularies(tmp_path))
