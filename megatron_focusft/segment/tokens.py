"""Tokens as character positions: block budgets, fixed blocks and the metrics count tokens.

`token_starts(tokenizer, text)` is the character offset where each token starts. A character
boundary c falls before token ``searchsorted(starts, c)``: a token that straddles c (a
multi-character token) stays in the block before it. With the built-in ByteChatTokenizer a
token is one UTF-8 byte, so every byte of a character starts at that character.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_focusft.data.tokenizer import ByteChatTokenizer, ChatTokenizer, HFChatTokenizer


def token_starts(tokenizer: ChatTokenizer, text: str) -> np.ndarray:
    """int64 [n_tokens], non-decreasing: the character where each token of `text` starts."""
    if isinstance(tokenizer, ByteChatTokenizer):
        if text.isascii():
            return np.arange(len(text), dtype=np.int64)
        widths = [len(ch.encode("utf-8")) for ch in text]
        return np.repeat(np.arange(len(text), dtype=np.int64), widths)
    if isinstance(tokenizer, HFChatTokenizer):
        encoding = tokenizer.hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64).reshape(-1)
    raise TypeError(f"token offsets need a ByteChatTokenizer or an HFChatTokenizer, got {type(tokenizer).__name__}")


def chars_to_tokens(starts: np.ndarray, boundaries: Sequence[int]) -> list[int]:
    """Token boundaries of character boundaries: distinct, in (0, n_tokens), increasing.

    Two character boundaries inside one token, or one before the first token boundary, collapse.
    """
    tokens = np.searchsorted(starts, np.asarray(boundaries, dtype=np.int64), side="left")
    return sorted({int(t) for t in tokens if 0 < t < len(starts)})


def tokens_to_chars(starts: np.ndarray, boundaries: Sequence[int]) -> list[int]:
    """Character boundaries of token boundaries: distinct, in (0, len(text)), increasing.

    Tokens that start at the same character (the bytes of one character) give one boundary.
    """
    return sorted({int(starts[t]) for t in boundaries if 0 < int(starts[t])})
