"""Candidate cut points, the released segmenter's scheme: ``<cut 0>`` at the start of the text
and ``<cut i>`` right after each match of a separator pattern. A block can only start at a
candidate; the separator stays at the end of the block before the cut.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

# Every run of newlines: paragraph breaks and line breaks alike, so a boundary that only a
# single newline marks (a list after a table) is still a candidate.
DEFAULT_SEPARATOR = r"\n+"


@lru_cache(maxsize=32)
def compile_separator(separator: str) -> re.Pattern[str]:
    """The compiled pattern; ValueError for a bad one or one that matches the empty string."""
    try:
        pattern = re.compile(separator)
    except re.error as error:
        raise ValueError(f"bad separator pattern {separator!r}: {error}") from None
    if pattern.fullmatch(""):
        raise ValueError(f"separator pattern {separator!r} matches the empty string")
    return pattern


def candidate_cuts(text: str, separator: str = DEFAULT_SEPARATOR) -> np.ndarray:
    """int64 [c]: character offsets of the candidates, increasing; element 0 is ``<cut 0>`` = 0.

    A match that ends at the end of the text starts no block and gives no candidate.
    """
    ends = {m.end() for m in compile_separator(separator).finditer(text)}
    return np.asarray([0, *sorted(e for e in ends if 0 < e < len(text))], dtype=np.int64)
