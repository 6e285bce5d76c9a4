"""The one exception type for bad input, so entry points print one sentence instead of a traceback."""

from __future__ import annotations

import os


class DataError(Exception):
    """Input a user must fix. The message is one sentence naming the file (and line) and what to do."""


def bad_line(path: str | os.PathLike, line_number: int, problem: str, fix: str = "") -> DataError:
    """A DataError for line `line_number` (1-based) of `path`: '<path>:<line>: <problem>; <fix>.'"""
    return _error(f"{os.fspath(path)}:{line_number}: {problem}", fix)


def bad_file(path: str | os.PathLike, problem: str, fix: str = "") -> DataError:
    """A DataError about a whole file: '<path>: <problem>; <fix>.'"""
    return _error(f"{os.fspath(path)}: {problem}", fix)


def _error(message: str, fix: str) -> DataError:
    if fix:
        message += f"; {fix}"
    return DataError(message.rstrip(".") + ".")
