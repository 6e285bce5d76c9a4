"""MovieLens ratings + movies (ML-1M or ML-100k layout) -> DIEN sample files and vocabularies.

The mapping onto the DIEN preparation of `input_pipeline.amazon` (whose pairing, negative
sampling, split, vocabularies and writers are used as they are):

1. A positive is a rating >= `min_rating` (default 4); lower ratings are dropped before anything
   else, so they are neither targets, history, nor candidates for negatives.
2. Each user's positives are ordered by timestamp, stably (file order on equal times). The last
   one becomes a (negative, positive) pair whose history is the earlier positives, oldest first.
   A user with a single positive is dropped.
3. The negative is drawn uniformly from the list of all positive ratings' movies (so weighted by
   how often a movie is rated positively), re-drawn while it equals the positive movie.
4. A movie's category is its first listed genre (ML-100k: the first flag set, in GENRES_100K
   order). MovieLens lists genres alphabetically in practice and the ML-100k flags are in
   alphabetical order, so both layouts give the same genre. Movies missing from the movies file,
   or whose only genre is `unknown` (ML-100k) or `(no genres listed)`, get `default_cat`.
5. Pairs go to the test file with probability `test_fraction`; vocabularies are counted on train.

Layouts, told apart by the first non-blank line of each file:
- ML-1M (also ML-10M): `ratings.dat` `UserID::MovieID::Rating::Timestamp`; `movies.dat`
  `MovieID::Title::Genres`, genres `|`-separated.
- ML-100k: `u.data` `user item rating timestamp`, tab-separated; `u.item` `|`-separated, 24
  fields: id, title, release date, video release date, IMDb URL, then 19 genre flags (0/1) in the
  order of GENRES_100K.
Both movie files are latin-1 text. Ids are kept as written (digits only). Files may be gzipped.

Outputs in `out_dir`, as `input_pipeline.amazon` writes them: the sample files and vocabularies,
plus `reviews-info` (`uid\\tmovie\\trating\\ttime` of every positive, in file order) and
`item-info` (`movie\\tcategory` for every movies-file line, in file order).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import numpy as np
from absl import app, flags

from input_pipeline.amazon import (DEFAULT_CAT, _checked, _first_categories, _item_categories, _Malformed, _parse_lines,
                                   _read, _review_columns, check_options, checked_fields, write_samples)
from input_pipeline import cli
from input_pipeline.errors import bad_file, bad_line
from input_pipeline.textio import open_lines

ML_1M = "ml-1m"
ML_100K = "ml-100k"
# ML-100k's u.item genre flag columns, in file order (the README's u.genre order).
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
# Genre names that say the movie has no genre information.
NO_GENRE = frozenset({"unknown", "(no genres listed)"})

_RATINGS_SEPARATOR = {ML_1M: b"::", ML_100K: b"\t"}
_MOVIES_SEPARATOR = {ML_1M: b"::", ML_100K: b"|"}
_RATINGS_LAYOUT = {ML_1M: "UserID::MovieID::Rating::Timestamp",
                   ML_100K: "tab-separated user item rating timestamp"}
_MOVIES_LAYOUT = {ML_1M: "MovieID::Title::Genres",
                  ML_100K: f"'|'-separated id|title|date|video date|URL and {len(GENRES_100K)} genre flags"}
_MOVIES_FIELDS = {ML_1M: 3, ML_100K: 5 + len(GENRES_100K)}
_RATINGS_HINT = "pass an ML-1M ratings.dat or an ML-100k u.data file"
_MOVIES_HINT = "pass an ML-1M movies.dat or an ML-100k u.item file"
_ID = rb"[0-9]{1,18}"
_TIME = rb"-?[0-9]{1,18}"
_RATING = rb"[0-9]{1,18}(?:\.[0-9]{1,18})?"
_RATING_FIELDS = (("UserID", _ID, "a non-negative integer"), ("MovieID", _ID, "a non-negative integer"),
                  ("Rating", _RATING, "a non-negative decimal number"), ("Timestamp", _TIME, "an integer"))
_RATING_LINE = {layout: re.compile(b"^" + separator.join(b"(" + pattern + b")" for _, pattern, _ in _RATING_FIELDS)
                                   + b"$", re.MULTILINE)
                for layout, separator in _RATINGS_SEPARATOR.items()}


@dataclasses.dataclass(frozen=True)
class PrepareStats:
    """Counts of one preparation, for the CLI summary and tests."""

    ratings: int  # rating lines used
    positives: int  # ratings >= min_rating
    users: int  # users with a positive
    items: int  # distinct positively rated movies
    train_pairs: int
    test_pairs: int
    dropped_users: int  # users with a single positive (no history)
    items_without_genre: int  # positively rated movies given default_cat
    movies: int  # movies-file lines used
    bad_rating_lines: int  # skipped with on_bad_line='skip'
    bad_movie_lines: int
    truncated: tuple[str, ...]  # files whose gzip stream ended early, as '<path> (after line <n>)' (on_bad_line='skip')
    seconds: float


def prepare(ratings: str, movies: str, out_dir: str, *, min_rating: float = 4.0, seed: int = 3,
            test_fraction: float = 0.1, on_bad_line: str = "error", samples: str = "last_event",
            split_time: int | None = None) -> PrepareStats:
    """Writes the DIEN sample files (or the every-event storage), vocabularies and info files of a MovieLens
    release to `out_dir`; `samples` and `split_time` as in `input_pipeline.amazon.prepare`."""
    check_options(on_bad_line, test_fraction, samples, split_time)
    start = time.perf_counter()
    layout = _detect_layout(ratings, _RATINGS_SEPARATOR, "ratings", _RATINGS_HINT)
    movies_layout = _detect_layout(movies, _MOVIES_SEPARATOR, "movies", _MOVIES_HINT)
    if movies_layout != layout:
        raise bad_file(movies, f"is in the {movies_layout} layout but {ratings} is in the {layout} layout",
                       "pass the ratings and movies files of one MovieLens release")
    skip = on_bad_line == "skip"
    parts, bad_ratings, truncated = _read(ratings, skip, functools.partial(_rating_rows, layout=layout))
    table = np.concatenate(parts)  # [N, 4] bytes: user, movie, rating, timestamp
    if not len(table):
        problem = (f"has no usable rating lines ({bad_ratings} bad lines skipped)" if bad_ratings
                   else "has no ratings")
        raise bad_file(ratings, problem, _RATINGS_HINT)
    positive = table[table[:, 2].astype(np.float64) >= min_rating]
    if not len(positive):
        raise bad_file(ratings, f"has no rating >= {min_rating:g}", "lower --min_rating")
    data = _review_columns(positive)
    movie_parts, bad_movies, movies_truncated = _read(
        movies, skip, functools.partial(_parse_lines, parse_line=functools.partial(_movie_fields, layout=layout)))
    movie_rows = [row for part in movie_parts for row in part]
    item_cat, cat_tokens = _item_categories(data.item_tokens, _first_categories(movie_rows))
    train_pairs, test_pairs, dropped_users = write_samples(
        ratings, out_dir, data, item_cat, cat_tokens, movie_rows, samples=samples, seed=seed,
        test_fraction=test_fraction, split_time=split_time, bad_lines=bad_ratings + bad_movies,
        truncated=truncated + movies_truncated)
    return PrepareStats(
        ratings=len(table), positives=len(positive), users=len(data.uid_tokens), items=len(data.item_tokens),
        train_pairs=train_pairs, test_pairs=test_pairs, dropped_users=dropped_users,
        items_without_genre=int((cat_tokens[item_cat] == DEFAULT_CAT.encode()).sum()),
        movies=len(movie_rows), bad_rating_lines=bad_ratings, bad_movie_lines=bad_movies,
        truncated=truncated + movies_truncated, seconds=time.perf_counter() - start)


def _detect_layout(path: str, separators: dict[str, bytes], what: str, hint: str) -> str:
    """ML_1M or ML_100K, by which separator the first non-blank line of `path` contains."""
    with open_lines(path) as lines:
        for number, line in lines:
            if line.strip():
                break
        else:
            raise bad_file(path, f"has no {what}", hint)
    for layout, separator in separators.items():  # ML_1M first: its titles and genres may hold '|'
        if separator in line:
            return layout
    raise bad_line(path, number, f"is in neither the ML-1M nor the ML-100k {what} layout", hint)


# ---------------------------------------------------------------------------------------------
# Parsing


def _rating_rows(path: str, numbers: list[int], lines: list[bytes], skip: bool, *,
                 layout: str) -> tuple[np.ndarray, int]:
    """[n, 4] bytes (user, movie, rating, timestamp) of the lines, and the bad-line count."""
    rows = _RATING_LINE[layout].findall(b"\n".join(lines))
    bad = 0
    if len(rows) < len(lines):  # some line is malformed or blank: find it, line by line
        rows, bad = _parse_lines(path, numbers, lines, skip, functools.partial(_rating_fields, layout=layout))
    return np.array(rows, dtype=bytes).reshape(len(rows), 4), bad


def _rating_fields(line: bytes, *, layout: str) -> tuple[bytes, ...]:
    """(user, movie, rating, timestamp) of one rating line; says what is wrong with a bad one."""
    return checked_fields(line, _RATINGS_SEPARATOR[layout], _RATING_FIELDS, _RATINGS_LAYOUT[layout])


def _movie_fields(line: bytes, *, layout: str) -> tuple[bytes, bytes | None]:
    """(movie id, first genre or None) of one movies-file line; says what is wrong with a bad one."""
    fields = line.split(_MOVIES_SEPARATOR[layout])
    if len(fields) != _MOVIES_FIELDS[layout]:
        raise _Malformed(f"has {len(fields)} fields, not {_MOVIES_FIELDS[layout]} ({_MOVIES_LAYOUT[layout]})")
    if not re.fullmatch(_ID, fields[0]):
        raise _Malformed(f"MovieID {fields[0].decode('latin-1')!r} is not a non-negative integer")
    genres = fields[2].decode("latin-1").split("|") if layout == ML_1M else _flagged_genres(fields[5:])
    genre = next((genre for genre in genres if genre and genre not in NO_GENRE), None)
    return fields[0], _checked(genre, "genre") if genre else None


def _flagged_genres(values: list[bytes]) -> list[str]:
    """The ML-100k genres whose flag is 1, in GENRES_100K order."""
    for name, flag in zip(GENRES_100K, values):
        if flag not in (b"0", b"1"):
            raise _Malformed(f"genre flag {name!r} is {flag.decode('latin-1')!r}, not 0 or 1")
    return [name for name, flag in zip(GENRES_100K, values) if flag == b"1"]


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    """The CLI flags; defined only when run as a program, so importing `prepare` defines none."""
    flags.DEFINE_string("ratings", None, "ML-1M ratings.dat or ML-100k u.data (optionally .gz).", required=True)
    flags.DEFINE_string("movies", None, "ML-1M movies.dat or ML-100k u.item (optionally .gz).", required=True)
    flags.DEFINE_float("min_rating", 4.0, "Ratings >= this are positives; lower ones are dropped.")
    cli.define_common_flags()


def main(argv: list[str]) -> None:
    """Prepares one MovieLens release and prints the counts; a DataError is one line on stderr, status 1."""
    cli.run(argv, lambda args: prepare(args.ratings, args.movies, args.out_dir, min_rating=args.min_rating,
                                       seed=args.seed, test_fraction=args.test_fraction,
                                       on_bad_line=args.on_bad_line, samples=args.samples,
                                       split_time=args.split_time))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
