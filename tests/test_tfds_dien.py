"""The din_amazon TFDS builder: same preparation as training, ids equal to dien.load_split's arrays."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from input_pipeline import amazon, dien, tfds_dien  # noqa: E402  (registers din_amazon)
from input_pipeline.errors import DataError  # noqa: E402


def _prepared_dir(data_dir: pathlib.Path, config: str) -> pathlib.Path:
    """Where the builder prepares the DIEN directory of `config` (default download dir)."""
    return data_dir / "downloads" / tfds_dien.PREPARED_DIR / config


def _columns(source) -> dict[str, np.ndarray]:
    """All examples of a data source as columns; histories concatenated with their lengths."""
    examples = [source[i] for i in range(len(source))]
    columns = {name: np.array([e[name] for e in examples])
               for name in ("label", "uid_id", "mid_id", "cat_id")}
    for name in ("hist_mid_ids", "hist_cat_ids"):
        columns[name] = np.concatenate([e[name] for e in examples])
    columns["hist_lengths"] = np.array([len(e["hist_mids"]) for e in examples])
    return columns


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory) -> tuple[dict, pathlib.Path]:
    """tfds.data_source of din_amazon/synthetic in a fresh data dir, and that data dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return tfds.data_source("din_amazon/synthetic", data_dir=str(data_dir)), data_dir


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_ids_equal_load_split_arrays(synthetic_source, split):
    sources, data_dir = synthetic_source
    prepared = _prepared_dir(data_dir, "synthetic")
    vocabs = dien.load_vocabularies(prepared)
    encoded = dien.load_split(prepared, split, vocabs)
    columns = _columns(sources[split])
    assert len(sources[split]) == len(encoded) > 0
    np.testing.assert_array_equal(columns["label"], encoded.label.astype(np.int64))
    np.testing.assert_array_equal(columns["uid_id"], encoded.uid)
    np.testing.assert_array_equal(columns["mid_id"], encoded.mid)
    np.testing.assert_array_equal(columns["cat_id"], encoded.cat)
    np.testing.assert_array_equal(columns["hist_lengths"], encoded.hist_lengths)
    np.testing.assert_array_equal(columns["hist_mid_ids"], encoded.hist_mids)
    np.testing.assert_array_equal(columns["hist_cat_ids"], encoded.hist_cats)


def test_synthetic_strings_are_the_sample_file_tokens(synthetic_source):
    sources, data_dir = synthetic_source
    prepared = _prepared_dir(data_dir, "synthetic")
    vocabs = dien.load_vocabularies(prepared)
    first_line = (prepared / dien.TRAIN_FILE).read_bytes().split(b"\n", 1)[0].split(b"\t")
    example = sources["train"][0]
    assert [str(example["label"]).encode(), example["uid"], example["mid"], example["cat"],
            b"\x02".join(example["hist_mids"]), b"\x02".join(example["hist_cats"])] == first_line
    for i in range(0, len(sources["train"]), 97):  # train tokens are all in the train vocabularies
        example = sources["train"][i]
        assert vocabs.mid[example["mid"].decode()] == example["mid_id"]
        assert [vocabs.cat[c.decode()] for c in example["hist_cats"]] == example["hist_cat_ids"].tolist()


def _write_tiny_books(manual_dir: pathlib.Path) -> None:
    """Hand-made reviews_Books_5.json.gz and meta_Books.json.gz: 40 users, 8 items, one without meta."""
    items = [f"000000000{i}" for i in range(8)]
    reviews = []
    for user in range(40):
        for k in range(3 + user % 3):
            asin = items[(user + 3 * k) % len(items)]
            reviews.append({"reviewerID": f"AUSER{user:03d}", "asin": asin, "reviewerName": "Ré",
                            "helpful": [0, 0], "reviewText": "ok", "overall": 4.0, "summary": "ok",
                            "unixReviewTime": 1_300_000_000 + 86_400 * (k + user), "reviewTime": "x"})
    with gzip.open(manual_dir / "reviews_Books_5.json.gz", "wt") as f:
        f.writelines(json.dumps(review) + "\n" for review in reviews)
    with gzip.open(manual_dir / "meta_Books.json.gz", "wt") as f:
        f.writelines(f"{{'asin': '{asin}', 'categories': [['Books', 'Shelf {i % 3}']]}}\n"
                     for i, asin in enumerate(items[:-1]))


def test_books_prepares_from_manual_dir_like_amazon_prepare(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    _write_tiny_books(manual)
    builder = tfds.builder("din_amazon/books", data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    direct = tmp_path / "direct"
    stats = amazon.prepare(str(manual / "reviews_Books_5.json.gz"), str(manual / "meta_Books.json.gz"),
                           str(direct))
    prepared = _prepared_dir(tmp_path / "tfds", "books")
    for name in (dien.TRAIN_FILE, dien.TEST_FILE, "mid_voc.txt", "cat_voc.txt"):
        assert (prepared / name).read_bytes() == (direct / name).read_bytes()
    sources = builder.as_data_source()
    assert (len(sources["train"]), len(sources["test"])) == (2 * stats.train_pairs, 2 * stats.test_pairs)
    assert stats.test_pairs > 0
    cats = {c for e in (sources["train"][i] for i in range(len(sources["train"]))) for c in e["hist_cats"]}
    assert cats == {b"Shelf 0", b"Shelf 1", b"Shelf 2", amazon.DEFAULT_CAT.encode()}


def test_missing_manual_file_is_named(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    _write_tiny_books(manual)
    (manual / "reviews_Books_5.json.gz").unlink()
    builder = tfds.builder("din_amazon/books", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match="reviews_Books_5.json.gz: missing from the manual dir"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
