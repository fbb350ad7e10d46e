"""From scored candidates to block boundaries: a threshold, then recursive splitting to a budget.

Shared by every method that scores candidate cut points (`learned`: boundary probabilities,
`texttiling`: depth of the similarity valley). Boundaries are character offsets; budgets count
tokens through `token_starts` (segment/tokens.py).

Budget invariant: with ``max_block_tokens = N`` every block has at most N tokens, except that a
character is never split (with byte tokens a block of one multi-byte character may exceed N).
"""

from __future__ import annotations

import itertools

import numpy as np


def fixed_cuts(starts: np.ndarray, first: int, last: int, budget: int) -> list[int]:
    """Character boundaries that cut tokens [first, last) into runs of `budget` tokens."""
    cuts = {int(starts[t]) for t in range(first + budget, last, budget)}
    return sorted(c for c in cuts if c > starts[first])


def split_to_budget(boundaries: list[int], cuts: np.ndarray, scores: np.ndarray, starts: np.ndarray,
                    budget: int) -> list[int]:
    """`boundaries` plus the cuts that bring every block under `budget` tokens.

    A block over budget is split at its interior candidate of highest score, recursively; a block
    without an interior candidate is cut into fixed runs of `budget` tokens.
    cuts [c] candidate character offsets, scores [c] their scores (cuts[0] = 0 is never chosen).
    """
    # The end edge only needs to lie past every candidate and every token start.
    edges = [0, *boundaries, max(int(cuts[-1]), int(starts[-1])) + 1]
    out: list[int] = []
    stack = list(itertools.pairwise(edges))[::-1]
    while stack:
        a, b = stack.pop()
        first, last = (int(t) for t in np.searchsorted(starts, [a, b]))
        if a:
            out.append(a)
        if last - first <= budget:
            continue
        lo, hi = np.searchsorted(cuts, a, side="right"), np.searchsorted(cuts, b, side="left")
        if lo < hi:
            best = int(cuts[lo + int(np.argmax(scores[lo:hi]))])
            stack += [(best, b), (a, best)]
        else:
            out.extend(fixed_cuts(starts, first, last, budget))
    return sorted(set(out))


def decode(cuts: np.ndarray, scores: np.ndarray, threshold: float, starts: np.ndarray,
           budget: int | None) -> list[int]:
    """Candidates scoring at least `threshold` (never cut 0), then `split_to_budget` when a budget is set."""
    chosen = [int(c) for c, s in zip(cuts[1:], scores[1:]) if s >= threshold]
    if budget is None or not len(starts):  # a text without tokens has no block over budget
        return chosen
    return split_to_budget(chosen, cuts, scores, starts, budget)
