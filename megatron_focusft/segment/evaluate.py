"""Scoring predicted boundaries against gold ones, in tokens (segment/metrics.py for the metrics).

Boundaries are converted from characters to tokens of the tokenizer (segment/tokens.py), so a
tolerance of w means w tokens, and Pk / WindowDiff windows count tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.segment.corpus import SegDocument, SegmentDataError, document_from_row, iter_rows
from megatron_focusft.segment.metrics import SegmentationScores, score_corpus
from megatron_focusft.segment.tokens import chars_to_tokens, token_starts


def score_documents(gold: Sequence[SegDocument], predicted: Sequence[Sequence[int]], tokenizer: ChatTokenizer,
                    *, level: int | None = None, tolerance: int = 0) -> SegmentationScores:
    """Scores of `predicted` character boundaries (one list per gold document) at gold `level`."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold documents but {len(predicted)} predictions")

    def pairs():
        for document, boundaries in zip(gold, predicted):
            starts = token_starts(tokenizer, document.text)
            yield (chars_to_tokens(starts, document.at_level(level)), chars_to_tokens(starts, boundaries),
                   len(starts))

    return score_corpus(pairs(), tolerance)


def score_files(gold_path: str | os.PathLike[str], pred_path: str | os.PathLike[str], tokenizer: ChatTokenizer,
                *, level: int | None = None, tolerance: int = 0) -> SegmentationScores:
    """Scores of a prediction file against a gold file: same rows, same texts, in the same order."""
    gold_path, pred_path = os.fspath(gold_path), os.fspath(pred_path)
    gold = [(row, document_from_row(r, gold_path, row, gold=True)) for row, r in iter_rows(gold_path)]
    pred = [(row, document_from_row(r, pred_path, row, gold=True)) for row, r in iter_rows(pred_path)]
    if len(gold) != len(pred):
        raise SegmentDataError(pred_path, None, f"{len(pred)} rows, but the gold file {gold_path} has {len(gold)}")
    for (gold_row, g), (row, p) in zip(gold, pred):
        if g.text != p.text:
            raise SegmentDataError(pred_path, row, f"its text differs from row {gold_row} of the gold file "
                                   f"{gold_path} (rows are matched in order)")
    return score_documents([g for _, g in gold], [p.boundaries for _, p in pred], tokenizer, level=level,
                           tolerance=tolerance)
