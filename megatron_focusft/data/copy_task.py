"""A copy task for a model's first steps: repeat a random sequence of words.

Every reply token is a copy from the context, so a model trained from random init on these rows
learns to copy (attend to the previous occurrence of the current word and emit what followed)
within a few hundred steps; on the RAG task's questions alone, whose answers are a few copied
tokens, it does not within the CPU budget (README, block attention Evidence). The words are
the RAG task's (`rag_task.vocabulary_texts`), so its word-level tokenizer knows them all.

Row (a chat row for any training mode):
    {"messages": [{"role": "user", "content": w_1 ... w_n}, {"role": "assistant", "content": w_1 ... w_n}]}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from megatron_focusft.data.rag_task import vocabulary_texts


def task_words() -> list[str]:
    """The distinct words of the RAG task (no punctuation, no digits), sorted."""
    return sorted({w for text in vocabulary_texts() for w in re.findall(r"[A-Za-z]+", text)})


@dataclass(frozen=True)
class CopyTaskConfig:
    """num_samples rows of `words` words each, drawn uniformly with replacement; sample i
    depends on (seed, i) alone."""

    num_samples: int = 1000
    words: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "words"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def copy_rows(config: CopyTaskConfig) -> list[dict[str, Any]]:
    vocabulary = task_words()
    rows = []
    for index in range(config.num_samples):
        rng = random.Random(f"{config.seed}:copy:{index}")
        text = " ".join(rng.choice(vocabulary) for _ in range(config.words))
        rows.append({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]})
    return rows
