"""Content words of a text with their character spans, for the lexical similarity of TextTiling
and the word features of the learned segmenter.

A word is a maximal run of ``\\w`` characters, lowercased; function words (STOPWORDS) and
single characters are dropped, as TextTiling drops them, so similarity follows the topic.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
STOPWORDS = frozenset("""
a about after all also an and any are as at be been but by can could did do does for from had has
have he her his how i if in into is it its just may me more most my no not of on one or our out over
she so some such than that the their them then there these they this to up us was we were what when
which who will with would you your
""".split())


@dataclass(frozen=True)
class Words:
    """The content words of one text: words[i] spans characters [starts[i], ends[i])."""

    words: tuple[str, ...]
    starts: np.ndarray
    ends: np.ndarray

    def before(self, cut: int, count: int) -> tuple[int, int]:
        """Index range [i, j) of the last `count` words that end at or before character `cut`."""
        j = int(np.searchsorted(self.ends, cut, side="right"))
        return max(0, j - count), j

    def after(self, cut: int, count: int) -> tuple[int, int]:
        """Index range [i, j) of the first `count` words that start at or after character `cut`."""
        i = int(np.searchsorted(self.starts, cut, side="left"))
        return i, min(len(self.words), i + count)


def content_words(text: str) -> Words:
    kept = [m for m in _WORD.finditer(text) if len(m.group()) > 1 and m.group().lower() not in STOPWORDS]
    return Words(tuple(m.group().lower() for m in kept), np.asarray([m.start() for m in kept], dtype=np.int64),
                 np.asarray([m.end() for m in kept], dtype=np.int64))


def word_hash(word: str, buckets: int) -> int:
    """A stable hash (CRC-32; Python's str hash changes per process) in [0, buckets)."""
    return zlib.crc32(word.encode("utf-8")) % buckets
