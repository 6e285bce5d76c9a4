"""Specification of input_pipeline.movielens: MovieLens ratings + movies -> DIEN samples and vocabularies."""

from __future__ import annotations

import gzip
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import dien, movielens
from input_pipeline.amazon import TEST_FILE, TRAIN_FILE
from input_pipeline.errors import DataError
from tests.test_amazon import read_lines, truncated_gzip, vocabulary

REPO = pathlib.Path(__file__).resolve().parents[1]

# (user, movie, rating, timestamp). Only movies 10 and 20 are rated >= 4, so every negative is forced
# (the other one). User 7's file order differs from its time order; user 3's positives share one time
# (file order decides) and its rating 2 is dropped; user 9 has one positive and is dropped.
RATINGS = [(7, 20, 5, 300), (7, 10, 4, 100), (3, 20, 4, 50), (3, 30, 2, 10), (3, 10, 5, 50), (7, 10, 5, 200),
           (9, 10, 5, 10)]
# Movie 10 is listed with Drama then Comedy; 20 is missing from the movies file; 40 has no genre.
MOVIES_1M = [b"10::Am\xe9lie (2001)::Drama|Comedy", b"30::Thirty (1999)::Action",
             b"40::Forty (2000)::(no genres listed)"]


def flags_100k(*genres: str) -> bytes:
    """The 19 ML-100k genre flag fields with `genres` set."""
    return b"|".join(b"1" if name in genres else b"0" for name in movielens.GENRES_100K)


MOVIES_100K = [b"10|Am\xe9lie (2001)|01-Jan-2001||http://us.imdb.com/M/title-exact?Am%E9lie|"
               + flags_100k("Drama", "Comedy"),
               b"30|Thirty (1999)|01-Jan-1999||http://x|" + flags_100k("Action"),
               b"40|Forty (2000)|01-Jan-2000||http://x|" + flags_100k("unknown")]
LAYOUTS = {  # layout -> (rating line separator, movies lines, movie 10's category)
    "ml-1m": (b"::", MOVIES_1M, "Drama"),  # the first listed genre
    "ml-100k": (b"\t", MOVIES_100K, "Comedy"),  # the first flagged genre in GENRES_100K order
}


def samples(cat: str) -> list[str]:
    """The hand-derived sample lines: users by first positive, negative line first, history oldest first."""
    return [f"0\t7\t10\t{cat}\t10\x0210\t{cat}\x02{cat}",
            f"1\t7\t20\tdefault_cat\t10\x0210\t{cat}\x02{cat}",
            "0\t3\t20\tdefault_cat\t20\tdefault_cat",
            f"1\t3\t10\t{cat}\t20\tdefault_cat"]


def write(path: pathlib.Path, lines: list[bytes]) -> str:
    """Writes `lines` as bytes (gzip-compressed for *.gz) and returns the path."""
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


def rating_lines(separator: bytes, ratings=RATINGS) -> list[bytes]:
    """Rating lines in one layout."""
    return [separator.join(str(field).encode() for field in rating) for rating in ratings]


@pytest.fixture(params=list(LAYOUTS))
def layout(request, tmp_path):
    """(ratings path, movies path, movie 10's category) in each layout; the file names give no hint."""
    separator, movies, cat = LAYOUTS[request.param]
    return write(tmp_path / "ratings", rating_lines(separator)), write(tmp_path / "movies", movies), cat


def test_both_layouts_give_hand_derived_samples(layout, tmp_path):
    ratings, movies, cat = layout
    out = tmp_path / "out"
    stats = movielens.prepare(ratings, movies, str(out), test_fraction=0.0)
    assert read_lines(out, TRAIN_FILE) == samples(cat)
    assert read_lines(out, TEST_FILE) == []
    assert (stats.ratings, stats.positives, stats.users, stats.items) == (7, 6, 3, 2)
    assert (stats.train_pairs, stats.test_pairs, stats.dropped_users) == (2, 0, 1)
    assert (stats.items_without_genre, stats.movies, stats.bad_rating_lines, stats.bad_movie_lines) == (1, 3, 0, 0)


def test_vocabularies_are_counted_on_train_with_defaults_at_zero(layout, tmp_path):
    ratings, movies, cat = layout
    out = tmp_path / "out"
    movielens.prepare(ratings, movies, str(out), test_fraction=0.0)
    # Users occur twice each (ties: first appearance); movie 10 six times, 20 four times.
    assert vocabulary(out, "uid_voc") == {"7": 0, "3": 1}
    assert vocabulary(out, "mid_voc") == {"default_mid": 0, "10": 1, "20": 2}
    assert vocabulary(out, "cat_voc") == {"default_cat": 0, cat: 1}


def test_all_pairs_to_test_is_a_data_error_that_writes_nothing(layout, tmp_path):
    ratings, movies, cat = layout
    with pytest.raises(DataError, match=r"ratings: no train pairs \(train pairs: 0, test pairs: 2, bad lines skipped: "
                                        r"0\); all 2 pairs went to the test split"):
        movielens.prepare(ratings, movies, str(tmp_path / "out"), test_fraction=1.0)
    assert not (tmp_path / "out").exists()


def test_truncated_ratings_with_skip_are_named_with_their_last_line_or_an_error_without_train_pairs(tmp_path):
    movies = write(tmp_path / "movies", MOVIES_1M)
    ratings = truncated_gzip(tmp_path / "ratings.gz", rating_lines(b"::"))
    stats = movielens.prepare(ratings, movies, str(tmp_path / "out"), test_fraction=0.0, on_bad_line="skip")
    assert (stats.truncated, stats.train_pairs) == ((f"{ratings} (after line 7)",), 2)
    ratings = truncated_gzip(tmp_path / "ratings.gz", rating_lines(b"::")[:2])  # user 7's first two
    with pytest.raises(DataError, match=r"ratings\.gz: no train pairs \(train pairs: 0, test pairs: 1, bad lines "
                                        r"skipped: 0\); the input is truncated at .*ratings\.gz \(after line 2\)"):
        movielens.prepare(ratings, movies, str(tmp_path / "out"), test_fraction=1.0, on_bad_line="skip")


def test_info_files_list_positives_and_movie_genres(layout, tmp_path):
    ratings, movies, cat = layout
    out = tmp_path / "out"
    movielens.prepare(ratings, movies, str(out))
    assert read_lines(out, "item-info") == [f"10\t{cat}", "30\tAction", "40\tdefault_cat"]
    assert read_lines(out, "reviews-info") == [
        "7\t20\t5.0\t300", "7\t10\t4.0\t100", "3\t20\t4.0\t50", "3\t10\t5.0\t50", "7\t10\t5.0\t200",
        "9\t10\t5.0\t10"]


def test_output_loads_as_a_dien_data_directory(layout, tmp_path):
    ratings, movies, _ = layout
    out = tmp_path / "out"
    movielens.prepare(ratings, movies, str(out), test_fraction=0.0)
    vocabs = dien.load_vocabularies(out)
    train = dien.load_split(out, "train", vocabs)
    assert train.label.tolist() == [0, 1, 0, 1]
    assert train.mid.tolist() == [1, 2, 2, 1] and train.cat.tolist() == [1, 0, 0, 1]
    assert train.hist_lengths.tolist() == [2, 2, 1, 1] and train.hist_mids.tolist() == [1, 1, 1, 1, 2, 2]


def test_min_rating_chooses_the_positives(tmp_path):
    movies = write(tmp_path / "movies", MOVIES_1M)
    out = tmp_path / "out"
    # Rated 5: user 7 has 10@200 and 20@300; users 3 and 9 have one positive each.
    stats = movielens.prepare(write(tmp_path / "ratings", rating_lines(b"::")), movies, str(out),
                              min_rating=5, test_fraction=0.0)
    assert read_lines(out, TRAIN_FILE) == ["0\t7\t10\tDrama\t10\tDrama", "1\t7\t20\tdefault_cat\t10\tDrama"]
    assert (stats.positives, stats.users, stats.dropped_users) == (4, 3, 2)
    with pytest.raises(DataError, match=r"ratings: has no rating >= 6; lower --min_rating\.$"):
        movielens.prepare(str(tmp_path / "ratings"), movies, str(out), min_rating=6)


def test_half_star_ratings_of_ml_10m_are_read(tmp_path):
    ratings = write(tmp_path / "ratings", [b"1::10::4.5::1", b"1::20::3.5::2", b"1::30::4::3"])
    stats = movielens.prepare(ratings, write(tmp_path / "movies", MOVIES_1M), str(tmp_path / "out"),
                              min_rating=4.0, test_fraction=0.0)
    assert (stats.ratings, stats.positives, stats.train_pairs) == (3, 2, 1)
    assert read_lines(tmp_path / "out", TRAIN_FILE) == ["0\t1\t10\tDrama\t10\tDrama",
                                                        "1\t1\t30\tAction\t10\tDrama"]


def test_gzip_inputs_are_read(tmp_path):
    ratings = write(tmp_path / "ratings.dat.gz", rating_lines(b"::"))
    movies = write(tmp_path / "movies.dat.gz", MOVIES_1M)
    movielens.prepare(ratings, movies, str(tmp_path / "out"), test_fraction=0.0)
    assert read_lines(tmp_path / "out", TRAIN_FILE) == samples("Drama")


def test_same_seed_same_bytes_other_seed_other_samples(tmp_path):
    rng = np.random.default_rng(0)
    ratings = write(tmp_path / "ratings", [b"%d::%d::%d::%d" % (user, rng.integers(50), rng.integers(1, 6), t)
                                           for user in range(200) for t in range(10)])
    movies = write(tmp_path / "movies", [b"%d::M::G%d" % (movie, movie % 7) for movie in range(50)])
    outputs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        movielens.prepare(ratings, movies, str(tmp_path / name), seed=seed)
        outputs[name] = [(tmp_path / name / file).read_bytes() for file in (TRAIN_FILE, TEST_FILE, "mid_voc.txt")]
    assert outputs["a"] == outputs["b"]
    assert outputs["a"][:2] != outputs["c"][:2]


BAD_RATINGS = {  # ML-1M line -> what the error names
    "too few fields": (b"7::20::5", "has 3 fields, not 4"),
    "too many fields": (b"7::20::5::300::1", "has 5 fields, not 4"),
    "non-numeric user": (b"u7::20::5::300", "UserID 'u7' is not a non-negative integer"),
    "non-numeric movie": (b"7::ten::5::300", "MovieID 'ten' is not a non-negative integer"),
    "non-numeric rating": (b"7::20::five::300", "Rating 'five' is not a non-negative decimal number"),
    "non-numeric timestamp": (b"7::20::5::3e2", "Timestamp '3e2' is not an integer"),
    "100k separator": (b"7\t20\t5\t300", "has 1 fields, not 4"),
}


@pytest.mark.parametrize("bad, problem", BAD_RATINGS.values(), ids=BAD_RATINGS.keys())
def test_bad_rating_line_is_an_error_with_its_line_number(tmp_path, bad, problem):
    lines = rating_lines(b"::")
    ratings = write(tmp_path / "ratings", lines[:2] + [b"", bad] + lines[2:])
    with pytest.raises(DataError, match=r"ratings:4: ") as error:
        movielens.prepare(ratings, write(tmp_path / "movies", MOVIES_1M), str(tmp_path / "out"))
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_bad_100k_lines_are_errors_with_their_line_numbers(tmp_path):
    movies = write(tmp_path / "movies", MOVIES_100K)
    ratings = write(tmp_path / "ratings", rating_lines(b"\t") + [b"7\t20\t5"])
    with pytest.raises(DataError, match=r"ratings:8: has 3 fields, not 4 \(tab-separated "):
        movielens.prepare(ratings, movies, str(tmp_path / "out"))
    ratings = write(tmp_path / "ratings", rating_lines(b"\t"))
    bad_flag = write(tmp_path / "movies", MOVIES_100K + [b"50|F|d||u|" + flags_100k().replace(b"0", b"x", 1)])
    with pytest.raises(DataError, match=r"movies:4: genre flag 'unknown' is 'x', not 0 or 1"):
        movielens.prepare(ratings, bad_flag, str(tmp_path / "out"))
    short = write(tmp_path / "movies", MOVIES_100K + [b"50|F|d||u|0|1"])
    with pytest.raises(DataError, match=r"movies:4: has 7 fields, not 24"):
        movielens.prepare(ratings, short, str(tmp_path / "out"))


def test_bad_lines_are_counted_with_skip(tmp_path):
    lines = rating_lines(b"::")
    ratings = write(tmp_path / "ratings", lines[:2] + [bad for bad, _ in BAD_RATINGS.values()] + lines[2:])
    movies = write(tmp_path / "movies", MOVIES_1M + [b"x::Bad::Drama", b"50::No genre field"])
    with pytest.raises(DataError, match=r"movies:4: MovieID 'x' is not a non-negative integer"):
        movielens.prepare(write(tmp_path / "good", lines), movies, str(tmp_path / "out"))
    out = tmp_path / "out"
    stats = movielens.prepare(ratings, movies, str(out), test_fraction=0.0, on_bad_line="skip")
    assert (stats.bad_rating_lines, stats.ratings) == (len(BAD_RATINGS), 7)
    assert (stats.bad_movie_lines, stats.movies) == (2, 3)
    assert read_lines(out, TRAIN_FILE) == samples("Drama")


def test_unrecognised_or_mismatched_layouts_are_data_errors(tmp_path):
    csv = write(tmp_path / "ratings.csv", [b"userId,movieId,rating,timestamp", b"1,10,4.0,1"])
    movies_1m, movies_100k = write(tmp_path / "m1", MOVIES_1M), write(tmp_path / "m100", MOVIES_100K)
    with pytest.raises(DataError, match=r"ratings\.csv:1: is in neither the ML-1M nor the ML-100k ratings layout"):
        movielens.prepare(csv, movies_1m, str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"m100: is in the ml-100k layout but .*ratings is in the ml-1m layout"):
        movielens.prepare(write(tmp_path / "ratings", rating_lines(b"::")), movies_100k, str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"empty: has no ratings; "):
        movielens.prepare(write(tmp_path / "empty", [b"", b"  "]), movies_1m, str(tmp_path / "out"))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.dat: no such file"):
        movielens.prepare(write(tmp_path / "ratings", rating_lines(b"::")), str(tmp_path / "nowhere.dat"),
                          str(tmp_path / "out"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m input_pipeline.movielens ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "input_pipeline.movielens", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prepares_and_prints_a_summary(layout, tmp_path):
    ratings, movies, cat = layout
    result = run_cli("--ratings", ratings, "--movies", movies, "--out_dir", str(tmp_path / "out"),
                     "--test_fraction", "0")
    assert result.returncode == 0, result.stderr
    assert "train_pairs" in result.stdout and "items_without_genre" in result.stdout
    assert read_lines(tmp_path / "out", TRAIN_FILE) == samples(cat)


def test_cli_reports_a_data_error_in_one_line(tmp_path):
    ratings = write(tmp_path / "ratings", rating_lines(b"::") + [b"7::20::five::1"])
    result = run_cli("--ratings", ratings, "--movies", write(tmp_path / "movies", MOVIES_1M),
                     "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {ratings}:8: Rating 'five' is not a non-negative decimal number")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
