"""Heuristic and statistical segmenters: fixed length, the block-attention reference's delimiter
rules, and TextTiling over the candidate cuts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.segment.candidates import DEFAULT_SEPARATOR, candidate_cuts
from megatron_focusft.segment.decode import decode, fixed_cuts
from megatron_focusft.segment.lexical import Words, content_words
from megatron_focusft.segment.registry import SegmenterSettings
from megatron_focusft.segment.tokens import token_starts


@dataclass(frozen=True)
class FixedSegmenter:
    """Blocks of `max_block_tokens` tokens of `tokenizer`, the last one shorter (decode.fixed_cuts)."""

    max_block_tokens: int
    tokenizer: ChatTokenizer

    def __post_init__(self) -> None:
        if self.max_block_tokens < 1:
            raise ValueError(f"the block budget must be at least one token, got {self.max_block_tokens}")

    @property
    def identity(self) -> str:
        return f"fixed(max_block_tokens={self.max_block_tokens},tokenizer={self.tokenizer.identity})"

    def segment(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text in texts:
            starts = token_starts(self.tokenizer, text)
            out.append(fixed_cuts(starts, 0, len(starts), self.max_block_tokens) if len(starts) else [])
        return out


def fixed_segmenter(settings: SegmenterSettings, tokenizer: ChatTokenizer) -> FixedSegmenter:
    if settings.max_block_tokens is None:
        raise ValueError("method 'fixed' needs max_block_tokens (--max-block-tokens N)")
    return FixedSegmenter(settings.max_block_tokens, tokenizer)


# The reference's delimiters, in the order tried (block_attention.md, "Splitting"): (literal that
# must be present, the pattern of one separator run, whether a run is a chunk of its own).
DELIMITERS: tuple[tuple[str, str, bool], ...] = (
    ("\n\n", r"\n{2,}", False),
    ("---", r"-{3,}", True),
    ("===", r"={3,}", True),
    ("\n\t", r"(?:\n\t)+", True),
    ("\n", r"\n+", False),
)


@dataclass(frozen=True)
class DelimiterSegmenter:
    """The block-attention reference's split: only the first delimiter present is used (blank line,
    ``---``, ``===``, newline + tab, newline); a ``---`` / ``===`` / newline + tab run is a chunk of
    its own, a blank-line or newline run ends the chunk before it. Adjacent chunks are then merged
    until fewer than ``max_blocks + 1`` remain; which ones is not stated there [ours: the adjacent
    pair of smallest combined length, leftmost first, so merging evens out block sizes].
    """

    max_blocks: int = 14

    def __post_init__(self) -> None:
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {self.max_blocks}")

    @property
    def identity(self) -> str:
        return f"delimiter(reference-v1,max_blocks={self.max_blocks})"

    def segment(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._merge(delimiter_chunks(text), len(text)) for text in texts]

    def _merge(self, boundaries: list[int], length: int) -> list[int]:
        edges = [0, *boundaries, length]
        while len(edges) - 1 > self.max_blocks:
            pair = [edges[i + 2] - edges[i] for i in range(len(edges) - 2)]
            del edges[1 + pair.index(min(pair))]
        return edges[1:-1]


def delimiter_chunks(text: str) -> list[int]:
    """Chunk starts of the reference's split (before merging), character offsets."""
    for literal, run, own_chunk in DELIMITERS:
        if literal in text:
            cuts = set()
            for match in re.finditer(run, text):
                cuts.add(match.end())
                if own_chunk:
                    cuts.add(match.start())
            return sorted(c for c in cuts if 0 < c < len(text))
    return []


def delimiter_segmenter(settings: SegmenterSettings, tokenizer: ChatTokenizer) -> DelimiterSegmenter:
    return DelimiterSegmenter()


def _cosine(left: Counter[str], right: Counter[str]) -> float:
    dot = sum(count * right[word] for word, count in left.items())
    norm = math.sqrt(sum(c * c for c in left.values()) * sum(c * c for c in right.values()))
    return dot / norm if norm else 0.0


def similarity_curve(words: Words, cuts: np.ndarray, window_words: int) -> np.ndarray:
    """[c] cosine similarity of the `window_words` content words before and after each cut (cut 0: 1)."""
    curve = np.ones(len(cuts))
    for i, cut in enumerate(cuts[1:], start=1):
        left, right = words.before(int(cut), window_words), words.after(int(cut), window_words)
        curve[i] = _cosine(Counter(words.words[slice(*left)]), Counter(words.words[slice(*right)]))
    return curve


def depth_scores(curve: np.ndarray) -> np.ndarray:
    """[c] TextTiling depth of each local minimum of `curve` (0 elsewhere and at cut 0).

    Depth = (left peak - s) + (right peak - s), the peaks found by climbing while the curve rises.
    """
    depth = np.zeros(len(curve))
    inner = curve[1:]
    for i in range(len(inner)):
        s = inner[i]
        if (i and inner[i - 1] < s) or (i + 1 < len(inner) and inner[i + 1] < s):
            continue
        left = i
        while left and inner[left - 1] >= inner[left]:
            left -= 1
        right = i
        while right + 1 < len(inner) and inner[right + 1] >= inner[right]:
            right += 1
        depth[i + 1] = (inner[left] - s) + (inner[right] - s)
    return depth


@dataclass(frozen=True)
class TextTilingSegmenter:
    """TextTiling (Hearst 1997) over the candidate cuts: lexical cosine similarity of the content
    words on each side, depth of each valley, a cut where the depth exceeds the cutoff.

    threshold  the depth cutoff; None: Hearst's per-document mean - std / 2 of the valley depths.
    max_block_tokens, tokenizer  blocks over budget are split at their deepest valley (decode.py).
    """

    window_words: int = 20
    separator: str = DEFAULT_SEPARATOR
    threshold: float | None = None
    max_block_tokens: int | None = None
    tokenizer: ChatTokenizer | None = None

    def __post_init__(self) -> None:
        if self.window_words < 1:
            raise ValueError(f"window_words must be >= 1, got {self.window_words}")
        if self.max_block_tokens is not None and self.tokenizer is None:
            raise ValueError("a block budget needs a tokenizer to count tokens")

    @property
    def identity(self) -> str:
        tokenizer = None if self.tokenizer is None else self.tokenizer.identity
        return (f"texttiling(window_words={self.window_words},separator={self.separator!r},threshold="
                f"{self.threshold},max_block_tokens={self.max_block_tokens},tokenizer={tokenizer})")

    def scores(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(cuts [c], depth [c]) of one text."""
        cuts = candidate_cuts(text, self.separator)
        return cuts, depth_scores(similarity_curve(content_words(text), cuts, self.window_words))

    def segment(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text in texts:
            cuts, depth = self.scores(text)
            valleys = depth[1:][depth[1:] > 0]
            cutoff = self.threshold
            if cutoff is None:
                # Strictly above Hearst's cutoff; a text without valleys gets none.
                cutoff = np.nextafter(valleys.mean() - valleys.std() / 2, np.inf) if len(valleys) else np.inf
            starts = token_starts(self.tokenizer, text) if self.max_block_tokens is not None else np.zeros(0)
            out.append(decode(cuts, depth, float(cutoff), starts, self.max_block_tokens))
        return out


def texttiling_segmenter(settings: SegmenterSettings, tokenizer: ChatTokenizer) -> TextTilingSegmenter:
    return TextTilingSegmenter(threshold=settings.threshold, max_block_tokens=settings.max_block_tokens,
                               tokenizer=tokenizer)
