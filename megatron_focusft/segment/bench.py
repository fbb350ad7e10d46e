"""`focusft segment bench`: the learned segmenter against each baseline on held-out synthetic data.

Train and test texts come from the synthetic source with different seeds. At each granularity
(level 1: topic sections, level 2: every passage) every method gets the setting it would get in
practice, chosen on the training texts only, never on the test texts:
- fixed: blocks of the mean gold block length (tokens) of the training texts at that level;
- delimiter: the reference's rules (nothing to set);
- texttiling: Hearst's cutoff, and the depth cutoff of best training F1 at that level;
- learned: trained once on both levels; that level's output at threshold 0.5.
Tokens are those of the built-in byte tokenizer (one token per UTF-8 byte).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_focusft.data.tokenizer import ByteChatTokenizer, ChatTokenizer
from megatron_focusft.segment.baselines import DelimiterSegmenter, FixedSegmenter, TextTilingSegmenter
from megatron_focusft.segment.corpus import SegDocument
from megatron_focusft.segment.evaluate import score_documents
from megatron_focusft.segment.learned import BoundaryModelConfig, LearnedSegmenter, TrainConfig, train_boundary_model
from megatron_focusft.segment.metrics import SegmentationScores
from megatron_focusft.segment.registry import Segmenter
from megatron_focusft.segment.synthetic import SyntheticConfig, synthetic_documents
from megatron_focusft.segment.tokens import token_starts

LEVEL_NAMES = {1: "coarse (topic sections)", 2: "fine (passages)"}


@dataclass(frozen=True)
class SegmentBenchConfig:
    """Settings of ``focusft segment bench``.

    train_documents / test_documents  synthetic texts to train on / to score on.
    seed        the training texts' seed (the test texts use seed + 1) and the training seed.
    epochs      training epochs of the learned segmenter.
    tolerance   w of the tolerant F1, in tokens.
    """

    train_documents: int = 800
    test_documents: int = 200
    seed: int = 0
    epochs: int = 12
    tolerance: int = 16

    def __post_init__(self) -> None:
        if self.train_documents < 1 or self.test_documents < 1 or self.epochs < 1 or self.tolerance < 0:
            raise ValueError(f"documents and epochs must be >= 1, tolerance >= 0, got {self}")


@dataclass(frozen=True)
class BenchRow:
    level: int
    method: str
    setting: str
    scores: SegmentationScores


def mean_block_tokens(documents: Sequence[SegDocument], tokenizer: ChatTokenizer, level: int) -> int:
    """Mean gold block length in tokens at `level`, rounded (at least 1)."""
    tokens = sum(len(token_starts(tokenizer, d.text)) for d in documents)
    blocks = sum(len(d.at_level(level)) + 1 for d in documents)
    return max(1, round(tokens / blocks))


def tune_texttiling(documents: Sequence[SegDocument], tokenizer: ChatTokenizer, level: int) -> float:
    """The depth cutoff of best exact F1 on `documents` at `level` (over the deciles of the valleys)."""
    tiler = TextTilingSegmenter()
    scored = [tiler.scores(d.text) for d in documents]
    depths = np.concatenate([depth[depth > 0] for _, depth in scored])
    best, best_f1 = float(np.inf), -1.0
    for cutoff in np.unique(np.quantile(depths, np.linspace(0.0, 0.9, 10))):
        predicted = [[int(c) for c, s in zip(cuts[1:], depth[1:]) if s >= cutoff] for cuts, depth in scored]
        f1 = score_documents(documents, predicted, tokenizer, level=level).f1
        if f1 > best_f1:
            best, best_f1 = float(cutoff), f1
    return best


def run_segment_bench(config: SegmentBenchConfig, levels: Sequence[int] = (1, 2)) -> list[BenchRow]:
    """Every method at every level on the test texts (module docstring)."""
    tokenizer = ByteChatTokenizer()
    train = synthetic_documents(SyntheticConfig(documents=config.train_documents, seed=config.seed))
    test = synthetic_documents(SyntheticConfig(documents=config.test_documents, seed=config.seed + 1))
    texts = [d.text for d in test]
    model, _ = train_boundary_model(train, BoundaryModelConfig(), TrainConfig(epochs=config.epochs, seed=config.seed))
    rows = []
    for level in levels:
        budget = mean_block_tokens(train, tokenizer, level)
        cutoff = tune_texttiling(train, tokenizer, level)
        methods: list[tuple[str, str, Segmenter]] = [
            ("fixed", f"{budget} tokens (mean gold block on train)", FixedSegmenter(budget, tokenizer)),
            ("delimiter", "reference rules", DelimiterSegmenter()),
            ("texttiling", "Hearst cutoff (mean - std/2)", TextTilingSegmenter()),
            ("texttiling", f"cutoff {cutoff:.3f} (best F1 on train)", TextTilingSegmenter(threshold=cutoff)),
            ("learned", "threshold 0.5", LearnedSegmenter(model, digest="bench", level=level)),
        ]
        for name, setting, segmenter in methods:
            scores = score_documents(test, segmenter.segment(texts), tokenizer, level=level,
                                     tolerance=config.tolerance)
            rows.append(BenchRow(level, name, setting, scores))
    return rows


def format_table(rows: Sequence[BenchRow], tolerance: int) -> str:
    """The README table: one line per (granularity, method)."""
    lines = [f"| granularity | method | setting | F1 | F1 (w={tolerance}) | Pk | WindowDiff | blocks / text |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        s = row.scores
        blocks, gold = 1 + s.predicted_boundaries / s.documents, 1 + s.reference_boundaries / s.documents
        lines.append(f"| {LEVEL_NAMES.get(row.level, f'level {row.level}')} | {row.method} | {row.setting} | "
                     f"{s.f1:.3f} | {s.tolerant_f1:.3f} | {s.pk:.3f} | {s.windowdiff:.3f} | "
                     f"{blocks:.1f} (gold {gold:.1f}) |")
    return "\n".join(lines)


def print_segment_bench(config: SegmentBenchConfig, as_json: bool = False) -> None:
    start = time.perf_counter()
    rows = run_segment_bench(config)
    if as_json:
        for row in rows:
            print(json.dumps({"level": row.level, "method": row.method, "setting": row.setting,
                              **row.scores.as_dict()}))
        return
    print(format_table(rows, config.tolerance))
    print(f"\n{config.train_documents} training / {config.test_documents} test texts, seed {config.seed}, "
          f"{time.perf_counter() - start:.0f} s")
