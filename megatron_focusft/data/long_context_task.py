"""The synthetic long-context chat task of the demo: generating its chats and loading them back.

A tiny relative of RULER's common-words extraction: a system message holds a haystack of
lower-case filler words with ``num_symbols`` distinct symbols (digits and punctuation, which
occur nowhere else) at random word gaps; the user asks ``?``; the assistant answers the symbols
that occur, sorted::

    <bos><system>grass tree # the wind 7 quiet ... birds<end><user>?<end><assistant>#7@<end>
                                                                                   '-------' response

Every answer token depends on the context. Chats are measured in byte-chat tokens (one token
per character, ``data.tokenizer.ByteChatTokenizer``) and written as the chat pipeline's JSONL.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_focusft.data.chat import ChatDataConfig, ChatSamples, load_chat_samples
from megatron_focusft.data.tokenizer import ByteChatTokenizer

# Characters that occur nowhere else in a chat (the filler is lower-case words and spaces, the
# question "?"); sorted by byte value, so sorted(answer) is also sorted by token id.
SYMBOLS = "!#$%&*+0123456789@^"
FILLER_WORDS = (
    "the grass is green and the sky is blue the sun is warm here and there we go again "
    "a river runs past an old stone bridge while birds sing in tall trees on the hill "
    "small boats drift on calm water near the town where people walk slowly at dusk "
    "rain falls on quiet roads and the wind moves through fields of wheat and corn"
).split()
# Tokens of a chat besides the haystack and the answer:
# <bos> <system> ... <end> <user> ? <end> <assistant> ... <end>
CHAT_OVERHEAD = 8


@dataclass(frozen=True)
class DemoTaskConfig:
    """The synthetic chats: `num_symbols` distinct symbols in the haystack, answered sorted."""

    num_symbols: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.num_symbols <= len(SYMBOLS):
            raise ValueError(f"num_symbols must be in [1, {len(SYMBOLS)}], got {self.num_symbols}")

    def context_free_loss(self) -> float:
        """Cross-entropy per response token (symbols + end) of the best model that ignores the context.

        Every set of num_symbols symbols is equally likely; its sorted spelling carries
        ln C(|SYMBOLS|, num_symbols) nats, the end token none.
        """
        return math.log(math.comb(len(SYMBOLS), self.num_symbols)) / (self.num_symbols + 1)

    def min_length(self) -> int:
        """Tokens of the shortest chat (no filler word): " s" per symbol in the haystack, s in the answer."""
        return CHAT_OVERHEAD + 3 * self.num_symbols


def _haystack(filler_chars: int, items: Sequence[str], rng: random.Random) -> str:
    """Filler words (exactly filler_chars characters) with " " + item in a random word gap for each item."""
    words: list[str] = []
    used = 0
    while used < filler_chars:
        word = rng.choice(FILLER_WORDS)
        take = (word if not words else " " + word)[: filler_chars - used]
        words.append(take)
        used += len(take)
    gaps = sorted(rng.randint(0, len(words)) for _ in items)  # gap g: before words[g]
    pieces: list[str] = []
    for gap in range(len(words) + 1):
        pieces += [" " + items[i] for i, g in enumerate(gaps) if g == gap]
        if gap < len(words):
            pieces.append(words[gap])
    return "".join(pieces)


def make_chat(task: DemoTaskConfig, length: int, rng: random.Random) -> dict[str, Any]:
    """One chat of exactly `length` byte-chat tokens: {"messages": [system, user, assistant], "answer": str}."""
    filler = length - task.min_length()
    if filler < 0:
        raise ValueError(f"length {length} < {task.min_length()} tokens (the task without filler)")
    symbols = rng.sample(SYMBOLS, task.num_symbols)  # in haystack order
    answer = "".join(sorted(symbols))
    messages = [{"role": "system", "content": _haystack(filler, symbols, rng)},
                {"role": "user", "content": "?"}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer}


def sample_lengths(count: int, low: int, high: int, rng: random.Random) -> list[int]:
    """`count` sample lengths in [low, high] with density proportional to 1 / length^2.

    Every octave of lengths then holds about the same share of the tokens; short samples are many.
    """
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    out = []
    for _ in range(count):
        u = rng.random()
        length = 1.0 / (1.0 / low - u * (1.0 / low - 1.0 / high))  # inverse CDF of the 1/L^2 density
        out.append(min(high, max(low, round(length))))
    return out


def write_chats(path: Path, task: DemoTaskConfig, lengths: Sequence[int], seed: int) -> Path:
    """One chat per entry of `lengths` (tokens) as JSONL (the chat pipeline's input format)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for length in lengths:
            f.write(json.dumps(make_chat(task, length, rng)) + "\n")
    return path


def load_eval_samples(path: Path, length: int) -> ChatSamples:
    """The chats of `path` through the chat pipeline (byte tokenizer); every one must be `length` tokens."""
    samples = load_chat_samples(ChatDataConfig((str(path),), length), ByteChatTokenizer(), log=None)
    if not bool((samples.lengths == length).all()):
        raise ValueError(f"{path}: samples are {int(samples.lengths.min())}..{int(samples.lengths.max())} "
                         f"tokens, expected {length}")
    return samples
