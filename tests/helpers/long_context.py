"""Hand counts for the long-context task's tests (shared by the evaluation and demo tests)."""

from __future__ import annotations

from megatron_focusft.data.long_context_task import SYMBOLS


def baseline_by_hand(answer: str) -> list[bool]:
    """Per answer character: is the context-free guess (successor of the previous symbol) right?"""
    guesses = [SYMBOLS[0]] + [SYMBOLS[min(SYMBOLS.index(c) + 1, len(SYMBOLS) - 1)] for c in answer[:-1]]
    return [g == c for g, c in zip(guesses, answer)]
