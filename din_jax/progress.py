"""The training progress bar: redrawn in place on a terminal, a plain line now and then anywhere else.

tqdm redraws its bar by writing '\r' and the new state. Into a pipe (launch.local prefixes each line of a
process) or a log file those redraws become a line each, or pile up into one line; there the bar's latest
state is written as a plain line at most every LINE_SECONDS seconds instead, and once more when it closes.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

LINE_SECONDS = 30.0  # not a terminal: the bar's state at most this often


def progress_bar(total: float, initial: int = 0, disable: bool = False, file: TextIO | None = None) -> tqdm:
    """The bar of training steps on `file` (default stderr): tqdm's own on a terminal, else PeriodicLines."""
    file = sys.stderr if file is None else file
    where = dict(file=file, dynamic_ncols=True) if file.isatty() else dict(file=PeriodicLines(file), ascii=True)
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, **where)


class PeriodicLines:
    """A text stream for tqdm: of its redraws ('\\r' + state), the latest becomes a plain line on `out` once
    `seconds` have passed since the previous line, and when the bar ends its line ('\\n')."""

    def __init__(self, out: TextIO, seconds: float = LINE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._out, self._seconds, self._clock = out, seconds, clock
        self._state, self._written = "", -math.inf

    def write(self, text: str) -> None:
        *ended, rest = text.split("\n")
        for line in ended:
            self._state = (self._state + line).rsplit("\r", 1)[-1]
            self._write_state()
        self._state = (self._state + rest).rsplit("\r", 1)[-1]
        if self._clock() - self._written >= self._seconds:
            self._write_state()

    def flush(self) -> None:
        self._out.flush()

    def _write_state(self) -> None:
        if self._state.strip():
            self._out.write(self._state.rstrip() + "\n")
            self._out.flush()
            self._written = self._clock()
        self._state = ""
