"""Automatic segmentation of texts into self-contained blocks (block attention's block ids).

corpus      the JSONL format with gold boundaries (+ levels), released-set reader
synthetic   offline mixed-genre texts with known boundaries at two granularities
candidates  candidate cut points (``<cut i>`` after each separator match)
tokens      tokens as character positions (budgets and metrics count tokens)
decode      threshold + recursive splitting of blocks over a token budget
baselines   fixed, delimiter (the block-attention reference's rules), texttiling
learned     the boundary classifier: features, training, save/load, LearnedSegmenter
registry    the methods by name: build_segmenter(name, settings, tokenizer)
metrics     boundary P/R/F1 (exact, within w), Pk, WindowDiff (nltk's convention)
evaluate    scoring predictions against gold files, in tokens
bench       `focusft segment bench`: learned vs each baseline on held-out synthetic data
cli         the flags of `focusft segment apply | train | eval | bench | synthetic`
lexical     content words with their spans (TextTiling and the learned model's word features)
"""

from megatron_focusft.segment.corpus import SegDocument, SegmentDataError
from megatron_focusft.segment.registry import (
    Segmenter,
    SegmenterSettings,
    build_segmenter,
    segmenter_method,
    segmenter_names,
)

__all__ = [
    "SegDocument",
    "SegmentDataError",
    "Segmenter",
    "SegmenterSettings",
    "build_segmenter",
    "segmenter_method",
    "segmenter_names",
]
