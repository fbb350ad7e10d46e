"""Copy tasks for a model's first steps: repeat a random sequence of words, or continue it after a key.

Every reply token is a copy from the context, so a model trained from random init on these rows
learns to copy; on the RAG task's questions alone, whose answers are a few copied tokens, it does
not within the CPU budget (README, block attention Evidence). The words are the RAG task's
(`rag_task.vocabulary_texts`), so its word-level tokenizer knows them all.

Forms (chat rows for any training mode):
    repeat:   user "w_1 ... w_n"                   assistant "w_1 ... w_n"
    continue: user "w_1 ... w_n ? w_k"             assistant "The w_k w_(k+1) ... w_(k+span-1)"
n is drawn per row, uniform in [min_words, words]. With one length (min_words = words) a repeat
row is answered by a fixed offset (reply token i is the prompt's token i), which does not carry
over to looking anything up; with lengths that vary, the next reply token is found by content:
the token after the earlier occurrence of the current one (an induction pattern), the copy that
answers the RAG task's label questions ("The <entity> <code words>.", rag_task.py). Continue rows
draw distinct words and supervise only the span after the key (sparser: a 0.9M model trained on
them from random init learned nothing in 1200 steps, where one on varying repeat rows forms the
copy; README, Evidence).
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


COPY_FORMS = ("repeat", "continue")


@dataclass(frozen=True)
class CopyTaskConfig:
    """num_samples rows; sample i depends on (seed, form, i) alone; a row has n words, n uniform in
    [min_words, words]. repeat: words drawn uniformly with replacement. continue: distinct words,
    a key drawn among the first n - span + 1, and a reply of `span` words from it."""

    num_samples: int = 1000
    words: int = 60
    seed: int = 0
    form: str = "repeat"
    min_words: int = 10
    span: int = 5

    def __post_init__(self) -> None:
        for name in ("num_samples", "words", "min_words", "span"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.form not in COPY_FORMS:
            raise ValueError(f"--form must be one of {COPY_FORMS}, got {self.form!r}")
        if self.form == "continue" and not self.span <= self.min_words <= self.words <= len(task_words()):
            raise ValueError(f"--form continue needs --span <= --min-words <= --words <= {len(task_words())} (the "
                             f"task's distinct words), got span={self.span}, min_words={self.min_words}, "
                             f"words={self.words}")
        if self.min_words > self.words:
            raise ValueError(f"--min-words must be <= --words, got min_words={self.min_words}, words={self.words}")


def copy_rows(config: CopyTaskConfig) -> list[dict[str, Any]]:
    vocabulary = task_words()
    rows = []
    for index in range(config.num_samples):
        rng = random.Random(f"{config.seed}:{'copy' if config.form == 'repeat' else 'continue'}:{index}")
        length = rng.randint(config.min_words, config.words)
        if config.form == "repeat":
            prompt = reply = " ".join(rng.choice(vocabulary) for _ in range(length))
        else:
            sequence = rng.sample(vocabulary, length)
            key = rng.randrange(len(sequence) - config.span + 1)
            prompt = f"{' '.join(sequence)} ? {sequence[key]}"
            reply = "The " + " ".join(sequence[key:key + config.span])
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    return rows
