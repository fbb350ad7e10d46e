"""Segmentation metrics: Pk and WindowDiff equal nltk's on random segmentations (default and
explicit k), boundary F1 exact and within a tolerance on hand-made cases."""

from __future__ import annotations

import itertools
import random

import pytest

from megatron_focusft.segment.metrics import (
    boundary_counts,
    default_window,
    match_boundaries,
    pk,
    score_corpus,
    to_nltk,
    windowdiff,
)

segmentation = pytest.importorskip("nltk.metrics.segmentation", reason="nltk is not installed (the `test` extra)")


def _random_segmentation(rng: random.Random, n: int) -> list[int]:
    density = rng.choice((0.02, 0.1, 0.3, 0.8))
    return [b for b in range(1, n) if rng.random() < density]


def test_nltk_string_convention():
    # '1' at the last unit of each block: one '1' per block, the final unit always '1'.
    assert to_nltk([], 4) == "0001"
    assert to_nltk([1, 3], 5) == "10101"
    assert to_nltk([2], 3) == "011"
    assert default_window([], 10) == 5 and default_window([5], 10) == 2  # round(2.5) = 2, half to even


def test_pk_and_windowdiff_equal_nltk_on_random_segmentations():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        n = rng.randint(1, 120)
        ref, hyp = _random_segmentation(rng, n), _random_segmentation(rng, n)
        ref_s, hyp_s = to_nltk(ref, n), to_nltk(hyp, n)
        assert pk(ref, hyp, n) == segmentation.pk(ref_s, hyp_s)  # nltk's default k
        k = default_window(ref, n)
        assert windowdiff(ref, hyp, n) == segmentation.windowdiff(ref_s, hyp_s, k)
        for k in {0, 1, rng.randint(0, n), n}:
            assert pk(ref, hyp, n, k) == segmentation.pk(ref_s, hyp_s, k)
            assert windowdiff(ref, hyp, n, k) == segmentation.windowdiff(ref_s, hyp_s, k)
            checked += 1
    assert checked > 1000


def test_pk_and_windowdiff_on_known_cases():
    # nltk's docstring examples, in our convention: '0100' * 100 has a block end at every 4i + 1.
    n = 400
    ref = [4 * i + 2 for i in range(100) if 4 * i + 2 < n]
    assert to_nltk(ref, n)[:8] == "01000100"
    assert pk(ref, ref, n, 2) == 0.0
    assert pk(ref, list(range(1, n)), n, 2) == pytest.approx(0.5, abs=0.01)
    assert windowdiff(ref, ref, n, 3) == 0.0


def test_metrics_reject_bad_segmentations():
    with pytest.raises(ValueError, match="strictly increasing"):
        pk([3, 2], [], 5)
    with pytest.raises(ValueError, match=r"in \(0, 5\)"):
        windowdiff([5], [], 5)
    with pytest.raises(ValueError, match="window k"):
        pk([2], [2], 5, k=6)


@pytest.mark.parametrize(("ref", "hyp", "w", "matched"), [
    ([10, 20, 30], [10, 20, 30], 0, 3),
    ([10, 20, 30], [11, 20, 29], 0, 1),
    ([10, 20, 30], [11, 20, 29], 1, 3),
    ([10, 12], [11], 1, 1),  # one prediction matches one reference, never two
    ([10], [9, 11], 1, 1),
    ([10, 20], [14, 16], 5, 2),  # greedy left to right: 14-10 and 16-20, not 14-20 leaving 10
    ([5, 10], [9], 5, 1),
    ([], [3], 2, 0),
    ([3], [], 2, 0),
])
def test_boundary_matching(ref, hyp, w, matched):
    assert match_boundaries(ref, hyp, w) == matched


def test_greedy_matching_is_a_maximum_matching():
    rng = random.Random(1)
    for _ in range(300):
        ref = sorted(rng.sample(range(1, 40), rng.randint(0, 6)))
        hyp = sorted(rng.sample(range(1, 40), rng.randint(0, 6)))
        w = rng.randint(0, 4)
        best = 0
        for size in range(min(len(ref), len(hyp)), 0, -1):  # brute force over matchings of each size
            if any(all(abs(r - h) <= w for r, h in zip(rs, hs))
                   for rs in itertools.combinations(ref, size) for hs in itertools.permutations(hyp, size)):
                best = size
                break
        assert match_boundaries(ref, hyp, w) == best, (ref, hyp, w)


def test_precision_recall_f1():
    counts = boundary_counts([10, 20, 30, 40], [10, 21, 50])
    assert (counts.matched, counts.predicted, counts.reference) == (1, 3, 4)
    assert counts.precision == pytest.approx(1 / 3) and counts.recall == pytest.approx(1 / 4)
    assert counts.f1 == pytest.approx(2 / 7)
    tolerant = boundary_counts([10, 20, 30, 40], [10, 21, 50], tolerance=1)
    assert tolerant.f1 == pytest.approx(4 / 7)
    empty = boundary_counts([], [])
    assert empty.precision == empty.recall == empty.f1 == 1.0  # nothing to find, nothing found
    assert boundary_counts([5], []).f1 == 0.0


def test_corpus_scores_sum_counts_and_average_windows():
    docs = [([10, 20], [10, 20], 30), ([5], [], 10)]
    scores = score_corpus(docs, tolerance=2)
    assert scores.documents == 2 and scores.reference_boundaries == 3 and scores.predicted_boundaries == 2
    assert scores.precision == 1.0 and scores.recall == pytest.approx(2 / 3) and scores.f1 == pytest.approx(0.8)
    assert scores.pk == pytest.approx((0.0 + pk([5], [], 10)) / 2)
    assert scores.windowdiff == pytest.approx((0.0 + windowdiff([5], [], 10)) / 2)
    with pytest.raises(ValueError, match="no documents"):
        score_corpus([], tolerance=0)
