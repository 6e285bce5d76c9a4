"""Review texts and rich meta lines of the built-in generator's Amazon files (`synthetic.generate(text_bytes=...)`)."""

from __future__ import annotations

import numpy as np


class Texts:
    """Review and description texts: runs of pseudo-words, a few with quotes and accents."""

    def __init__(self, rng: np.random.Generator, words: int = 4_000, pool_words: int = 400_000):
        letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
        lengths = rng.integers(1, 10, words)
        vocabulary = [letters[rng.integers(0, 26, n)].tobytes().decode() for n in lengths.tolist()]
        vocabulary[:4] = ["it's", 'a "quoted" one', "caf\\u00e9", "well,"]
        drawn = rng.zipf(1.3, pool_words) % words
        self.json_pool = " ".join(vocabulary[w].replace('"', '\\"') for w in drawn.tolist()) + " "
        self.python_pool = " ".join(vocabulary[w].replace("'", "\\'").replace("\\u00e9", "\\xe9")
                                    for w in drawn.tolist()) + " "
        self.json_starts = _word_starts(self.json_pool)
        self.python_starts = _word_starts(self.python_pool)
        self.rng = rng

    def pieces(self, count: int, mean_bytes: int, python: bool = False) -> list[str]:
        """`count` texts of whole words, lengths exponential around `mean_bytes`, JSON- or Python-escaped."""
        pool, starts = (self.python_pool, self.python_starts) if python else (self.json_pool, self.json_starts)
        lengths = np.minimum(self.rng.exponential(mean_bytes, count).astype(np.int64) + 1, len(pool) // 2)
        begin = starts[self.rng.integers(0, np.searchsorted(starts, len(pool) // 2), count)]
        end = starts[np.searchsorted(starts, begin + lengths)] - 1  # the space before the next word
        return [pool[b:e] for b, e in zip(begin.tolist(), end.tolist())]


def _word_starts(pool: str) -> np.ndarray:
    """Offsets of the words of a space-separated pool."""
    spaces = np.flatnonzero(np.frombuffer(pool.encode(), dtype=np.uint8) == ord(" "))
    return np.r_[0, spaces + 1]


def rich_meta_line(asins: list[str], item: int, category: str, description: str) -> str:
    """A meta line shaped like the real ones: related items, sales rank, categories before or after the text."""
    related = ", ".join("'%s'" % asins[(item * 7919 + k * 104_729) % len(asins)] for k in range(1 + item % 40))
    categories = "'categories': [['Books', '%s']]" % category
    head, tail = (categories + ", ", "") if item % 2 else ("", ", " + categories)
    return ("{'asin': '%s', %s'related': {'also_bought': [%s]}, 'title': 'Item %d', 'price': %.2f, "
            "'salesRank': {'Books': %d}, 'description': '%s'%s}\n"
            % (asins[item], head, related, item, 5 + (item % 50), 1 + item * 31 % 1_000_000, description, tail))
