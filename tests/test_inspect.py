"""Specification of `python -m input_pipeline.inspect`: DIEN lines with full histories, from every stored format."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np

from input_pipeline import amazon, dien, inspect, taobao
from tests.test_amazon import read_lines, review, write
from tests.test_events import LOG, SAMPLES, random_log

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "input_pipeline.inspect", *args], cwd=REPO, capture_output=True)


def test_text_and_parquet_samples_print_as_the_sample_file_lines(tmp_path):
    reviews = write(tmp_path / "reviews.json", [review(u, item, t) for u, item, t in [
        ("U1", "A", 1), ("U1", "B", 2), ("U1", "A", 3), ("U2", "B", 1), ("U2", "A", 5), ("U3", "A", 1)]])
    for format in amazon.FORMATS:
        amazon.prepare(reviews, None, str(tmp_path / format), test_fraction=0.0, format=format)
    expected = read_lines(tmp_path / "text", dien.TRAIN_FILE)
    assert len(expected) == 4 and "\x02" in expected[1]
    for format in amazon.FORMATS:
        assert [s.line() for _, s in inspect.samples(str(tmp_path / format), "train")] == expected
        assert inspect.count(str(tmp_path / format), "train") == 4
        assert [i for i, _ in inspect.samples(str(tmp_path / format), "train", [1, 3])] == [1, 3]


def test_cli_prints_the_first_or_seeded_random_samples_with_whole_histories(tmp_path):
    out = tmp_path / "out"
    taobao.prepare(random_log(tmp_path / "log.csv", 5, 400, 50), str(out), samples="every_event", test_fraction=0.0)
    every = [s.line() for _, s in inspect.samples(str(out), "train")]
    assert max(len(line.split("\t")[4].split("\x02")) for line in every) > 50  # longer than max_seq_length
    first = run_inspect("--data_dir", str(out), "--split", "train", "--limit", "3")
    assert first.returncode == 0 and first.stdout.decode().splitlines() == every[:3]
    seeded = run_inspect("--data_dir", str(out), "--split", "train", "--limit", "4", "--seed", "7")
    chosen = inspect.chosen_indices(len(every), 4, 7)
    assert seeded.stdout.decode().splitlines() == [every[i] for i in chosen] and not np.array_equal(chosen, range(4))


def test_every_event_samples_print_as_hand_derived_lines(tmp_path):
    taobao.prepare(write(tmp_path / "log.csv", LOG), str(tmp_path / "out"), samples="every_event", test_fraction=0.0)
    assert [s.line() for _, s in inspect.samples(str(tmp_path / "out"), "train", [0, 3])] == [SAMPLES[0], SAMPLES[3]]


def test_a_missing_directory_is_one_line(tmp_path):
    result = run_inspect("--data_dir", str(tmp_path / "nowhere"), "--split", "test")
    assert result.returncode == 1
    assert result.stderr.decode() == f"error: {tmp_path / 'nowhere'}: no such data directory; pass a directory " \
                                     "prepared by input_pipeline.\n"
