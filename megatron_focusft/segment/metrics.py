"""Segmentation metrics: boundary precision / recall / F1 (exact or within w units), Pk, WindowDiff.

A segmentation of a text of n units (tokens) is its set of boundaries: the unit indices in
(0, n) where a block starts. Convention of Pk and WindowDiff, identical to
``nltk.metrics.segmentation.pk`` / ``windowdiff`` on the string written by `to_nltk`: n
characters, '1' at the last unit of every block (so the final unit is always '1' and the
string holds one '1' per block), '0' elsewhere. Over the n - k + 1 windows of k units
``[i, i + k)``, i = 0 .. n - k, Pk counts the windows where one segmentation has a block end in
the window and the other has none, WindowDiff those where the numbers of block ends differ;
each is divided by n - k + 1. The default k is nltk's: ``round(n / (2 * blocks of the
reference))``, half the mean reference block length, rounded half to even.

Corpus scores (`score_corpus`): precision, recall and F1 from boundary counts summed over the
documents (micro average); Pk and WindowDiff averaged over documents, each with its own k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def to_nltk(boundaries: Sequence[int], n: int) -> str:
    """The nltk string of a segmentation of n units (see the module docstring)."""
    marks = ["0"] * n
    for b in boundaries:
        marks[b - 1] = "1"
    marks[n - 1] = "1"
    return "".join(marks)


def _check(boundaries: Sequence[int], n: int) -> np.ndarray:
    array = np.asarray(boundaries, dtype=np.int64)
    if n < 1:
        raise ValueError(f"a segmentation needs at least one unit, got n={n}")
    if array.size and (array.min() <= 0 or array.max() >= n or np.any(np.diff(array) <= 0)):
        raise ValueError(f"boundaries must be strictly increasing in (0, {n}), got {list(boundaries)[:8]}")
    return array


def default_window(reference: Sequence[int], n: int) -> int:
    """nltk's default k: half the mean block length of the reference, rounded half to even."""
    return round(n / ((len(reference) + 1) * 2.0))


def _window_counts(boundaries: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n - k + 1] block ends in each window [i, i + k) (block ends at b - 1 and at n - 1)."""
    ends = np.zeros(n + 1, dtype=np.int64)
    ends[boundaries] = 1  # the block end at unit b - 1 sits at index b of the prefix sum below
    ends[n] = 1
    prefix = np.cumsum(ends)  # prefix[j] = block ends among units 0 .. j - 1
    return prefix[k:] - prefix[:n - k + 1]


def _windows(reference: Sequence[int], hypothesis: Sequence[int], n: int, k: int | None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    ref, hyp = _check(reference, n), _check(hypothesis, n)
    k = default_window(reference, n) if k is None else k
    if not 0 <= k <= n:
        raise ValueError(f"window k must be in [0, {n}], got {k}")
    return _window_counts(ref, n, k), _window_counts(hyp, n, k), k


def pk(reference: Sequence[int], hypothesis: Sequence[int], n: int, k: int | None = None) -> float:
    """Beeferman's Pk in nltk's convention (module docstring); 0 is perfect."""
    ref, hyp, k = _windows(reference, hypothesis, n, k)
    return int(np.count_nonzero((ref > 0) != (hyp > 0))) / (n - k + 1.0)


def windowdiff(reference: Sequence[int], hypothesis: Sequence[int], n: int, k: int | None = None) -> float:
    """Pevzner and Hearst's WindowDiff in nltk's convention (unweighted); 0 is perfect."""
    ref, hyp, k = _windows(reference, hypothesis, n, k)
    return int(np.count_nonzero(ref != hyp)) / (n - k + 1.0)


def match_boundaries(reference: Sequence[int], hypothesis: Sequence[int], tolerance: int = 0) -> int:
    """Size of a largest one-to-one matching of boundaries at most `tolerance` units apart.

    Both sorted: the greedy sweep that matches the leftmost compatible pair is optimal on a line.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    matched = i = j = 0
    while i < len(reference) and j < len(hypothesis):
        gap = hypothesis[j] - reference[i]
        if abs(gap) <= tolerance:
            matched, i, j = matched + 1, i + 1, j + 1
        elif gap < 0:
            j += 1
        else:
            i += 1
    return matched


def _ratio(num: int, den: int) -> float:
    # Nothing to find and nothing found is perfect, not undefined.
    return num / den if den else 1.0


@dataclass(frozen=True)
class BoundaryCounts:
    """Matched, predicted and reference boundaries, summed over documents."""

    matched: int = 0
    predicted: int = 0
    reference: int = 0

    def __add__(self, other: BoundaryCounts) -> BoundaryCounts:
        return BoundaryCounts(self.matched + other.matched, self.predicted + other.predicted,
                              self.reference + other.reference)

    @property
    def precision(self) -> float:
        return _ratio(self.matched, self.predicted)

    @property
    def recall(self) -> float:
        return _ratio(self.matched, self.reference)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.matched, self.predicted + self.reference)


def boundary_counts(reference: Sequence[int], hypothesis: Sequence[int], tolerance: int = 0) -> BoundaryCounts:
    return BoundaryCounts(match_boundaries(reference, hypothesis, tolerance), len(hypothesis), len(reference))


@dataclass(frozen=True)
class SegmentationScores:
    """Corpus scores (module docstring); `tolerant_*` count a match within `tolerance` units."""

    documents: int
    tolerance: int
    precision: float
    recall: float
    f1: float
    tolerant_precision: float
    tolerant_recall: float
    tolerant_f1: float
    pk: float
    windowdiff: float
    reference_boundaries: int
    predicted_boundaries: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_corpus(pairs: Iterable[tuple[Sequence[int], Sequence[int], int]], tolerance: int) -> SegmentationScores:
    """Scores of (reference, hypothesis, n units) per document; at least one document."""
    exact, tolerant = BoundaryCounts(), BoundaryCounts()
    pks: list[float] = []
    wds: list[float] = []
    for reference, hypothesis, n in pairs:
        exact += boundary_counts(reference, hypothesis)
        tolerant += boundary_counts(reference, hypothesis, tolerance)
        pks.append(pk(reference, hypothesis, n))
        wds.append(windowdiff(reference, hypothesis, n))
    if not pks:
        raise ValueError("no documents to score")
    return SegmentationScores(
        documents=len(pks), tolerance=tolerance, precision=exact.precision, recall=exact.recall, f1=exact.f1,
        tolerant_precision=tolerant.precision, tolerant_recall=tolerant.recall, tolerant_f1=tolerant.f1,
        pk=float(np.mean(pks)), windowdiff=float(np.mean(wds)),
        reference_boundaries=exact.reference, predicted_boundaries=exact.predicted)
