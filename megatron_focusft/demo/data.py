"""The demo's tokenizer and chat data, written under <output_dir>/data.

tokenizer/           a word-level HF tokenizer of the tasks' vocabulary (data/word_tokenizer.py)
base.jsonl           the base model's data: short task chats (up to seq_length / 2 + 40 tokens),
                     corpus chats (filler text as the reply) and copy chats (repeat a word list)
finetune_s<k>.jsonl  seed k's fine-tuning chats: the tasks at seq_length / 4 to seq_length tokens

Streams (evaluation/task_chats.py): the base uses stream 1, seed k's fine-tuning set stream 1 + k;
evaluation samples use the eval seed 0, so no training chat is an evaluation sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from megatron_focusft.demo.config import DemoConfig
from megatron_focusft.evaluation.task_chats import copy_chats, corpus_chats, task_chats, write_chats

ANSWER_ROOM = 40  # tokens kept free in a row for the answer and the chat template


def write_tokenizer(out: Path) -> Callable[[str], int]:
    """Save the tokenizer to out/tokenizer; returns its token counter."""
    from megatron_focusft.data.word_tokenizer import build_word_tokenizer
    from megatron_focusft.evaluation.long_context_tasks import vocabulary_texts

    tokenizer = build_word_tokenizer(vocabulary_texts())
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return lambda text: len(tokenizer.encode(text))


def write_base_data(config: DemoConfig, out: Path, count_tokens: Callable[[str], int]) -> Path:
    short = config.seq_length // 2
    chats = (task_chats(config.tasks, config.base_chats_per_task, short + ANSWER_ROOM, count_tokens, stream=1)
             + corpus_chats(config.base_corpus_chats, short, count_tokens, seed=config.base_seed)
             + copy_chats(config.base_copy_chats, min((config.seq_length - ANSWER_ROOM) // 2, 100), count_tokens,
                        seed=config.base_seed))
    random.Random(config.base_seed).shuffle(chats)
    return write_chats(out / "base.jsonl", chats)


def write_finetune_data(config: DemoConfig, seed: int, out: Path, count_tokens: Callable[[str], int]) -> Path:
    chats = task_chats(config.tasks, config.finetune_chats_per_task, config.seq_length - ANSWER_ROOM,
                       count_tokens, stream=1 + seed, min_tokens=config.seq_length // 4)
    random.Random(seed).shuffle(chats)
    return write_chats(out / f"finetune_s{seed}.jsonl", chats)
