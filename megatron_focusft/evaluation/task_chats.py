"""Training chats from the long-context task generators: the same tasks as `focusft eval`, other seeds.

A fine-tuning set for a task family is the task's own prompts with their answers as the
assistant turn, at a spread of lengths, so a model is trained at one length and evaluated at
longer ones on fresh samples. The answer is the references joined by ", " (one for NIAH and
BABILong, all of them for the multi-item tasks), which every metric of evaluation/scoring.py
scores as fully right.

Seeds: the i-th training sample of a call is `generate_samples(task, length, 1, ...,
seed=stream * 1_000_003 + i)` (i counts over all tasks of the call), so it is never one of the
evaluation samples (those use the eval seed, a small integer) as long as `stream` >= 1.

A corpus chat ("Write a passage.", then filler text with a few needles) puts the haystacks'
language under the loss, the plain-LM half of a base model's pretraining.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_focusft.evaluation.long_context_tasks import (
    TASKS, VALUE_WORDS, WORDS, _code, _filler, _insert, _keys, _needle, generate_samples)
from megatron_focusft.evaluation.samples import EvalSample

CORPUS_PROMPT = "Write a passage."
COPY_PROMPT = "Repeat this text exactly."


def answer_text(sample: EvalSample) -> str:
    return ", ".join(sample.references)


def chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def shortest_prompt(task: str, count_tokens: Callable[[str], int]) -> int:
    """Tokens of the task's prompt with one filler unit at a fixed seed, plus 8: other seeds draw
    longer keys and values (generate_samples raises if a drawn length is still too short)."""
    prompt, _ = TASKS[task].build(random.Random(f"{1_000_003}:{task}"), 1)
    return count_tokens(prompt) + 8


def task_chats(tasks: Sequence[str], per_task: int, max_tokens: int, count_tokens: Callable[[str], int],
               stream: int, min_tokens: int = 0) -> list[dict[str, Any]]:
    """`per_task` chats of each task, prompt lengths uniform between max(min_tokens, the task's
    shortest prompt) and `max_tokens` (the answer and the chat template come on top), in task
    order. `stream` >= 1 keeps them off the evaluation samples."""
    if stream < 1:
        raise ValueError(f"stream must be >= 1 (stream 0 could repeat evaluation samples), got {stream}")
    rng = random.Random(f"lengths:{stream}")
    chats = []
    for t, task in enumerate(tasks):
        low = max(min_tokens, shortest_prompt(task, count_tokens))
        if low > max_tokens:
            raise ValueError(f"{task}: its shortest prompt has about {low} tokens, more than {max_tokens}")
        for i in range(per_task):
            seed = stream * 1_000_003 + t * per_task + i
            (sample,) = generate_samples(task, rng.randint(low, max_tokens), 1, count_tokens, seed=seed)
            chats.append(chat(sample.prompt, answer_text(sample)))
    return chats


def _passage(rng: random.Random, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """Essay or noise filler with 0-2 needles, at most `max_tokens` tokens (at least one sentence)."""
    kind = rng.choice(("essay", "essay", "noise"))
    sentences = _filler(rng, kind, 2)
    while count_tokens(" ".join(sentences)) < max_tokens:
        sentences += _filler(rng, kind, 1)
    text = _insert(rng, sentences[:-1], [_needle(key, _code(rng)) for key in _keys(rng, rng.randint(0, 2))])
    while count_tokens(text) > max_tokens and ". " in text:
        text = text.rsplit(". ", 1)[0] + "."
    return text


def corpus_chats(count: int, max_tokens: int, count_tokens: Callable[[str], int], seed: int) -> list[dict[str, Any]]:
    """`count` chats whose reply is a passage (`_passage`) of at most `max_tokens` tokens."""
    rng = random.Random(f"corpus:{seed}")
    return [chat(CORPUS_PROMPT, _passage(rng, max_tokens, count_tokens)) for _ in range(count)]


def copy_chats(count: int, max_tokens: int, count_tokens: Callable[[str], int], seed: int) -> list[dict[str, Any]]:
    """`count` chats that ask for a random list of task words and value words (up to
    `max_tokens` tokens) to be repeated: every reply token is a copy that no language model
    could guess, the skill behind NIAH answers."""
    rng = random.Random(f"copy:{seed}")
    chats = []
    for _ in range(count):
        budget = rng.randint(max(8, max_tokens // 4), max_tokens)
        items = [rng.choice(WORDS)]
        while True:
            item = rng.choice(VALUE_WORDS) if rng.random() < 0.3 else rng.choice(WORDS)
            if count_tokens(" ".join([*items, item])) > budget:
                break
            items.append(item)
        text = " ".join(items)
        chats.append(chat(f"{COPY_PROMPT}\n\n{text}", text))
    return chats


def write_chats(path: str | os.PathLike, chats: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in chats:
            f.write(json.dumps(row) + "\n")
    return path
