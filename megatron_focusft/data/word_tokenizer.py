"""A word-level Hugging Face tokenizer built from a corpus, for tiny models of synthetic tasks.

Byte tokens make a tiny model's task long and its facts many tokens apart; a word-level tokenizer
of the task's own vocabulary (`focusft data tokenizer`) keeps a sample short, so a model trained
from scratch on CPU can learn to look things up. It is an ordinary HF fast tokenizer directory
(tokenizer.json + tokenizer_config.json with a chat template), read by `--tokenizer-model` like any.

Splitting (lossless: ``decode(encode(t)) == t`` for any text of known words):
    text -> each newline alone -> Metaspace (a space becomes part of the next word, "▁code"; no space is prepended)
         -> every digit alone (a six-digit code is six tokens)  -> punctuation alone.
The chat template joins turns with special tokens only (no whitespace between them):
    <|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>{reply}<|im_end|>
and marks the reply and its <|im_end|> with ``{% generation %}`` (the response tokens).
Words not in the corpus encode as <unk>.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<unk>", "<pad>", "<|im_start|>", "<|im_sep|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}<|im_sep|>"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{%- else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}")
ROLES = ("system", "user", "assistant", "tool")


def row_texts(row: Any, where: str) -> Iterator[str]:
    """The texts of one JSONL row: its `blocks` (texts), `global` (text) and message contents."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for block in row.get("blocks") or ():
        if isinstance(block, str):
            yield block
    if isinstance(row.get("global"), str):
        yield row["global"]
    for message in row.get("messages") or ():
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message["content"]


def corpus_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Every text of every row of the JSONL files (row_texts), in order."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from None
                    yield from row_texts(row, f"{path} line {number}")


def build_word_tokenizer(texts: Iterable[str]) -> Any:
    """A transformers PreTrainedTokenizerFast whose vocabulary is SPECIAL_TOKENS (ids 0-4), the
    ten digits and the role names, then the words of `texts` in order of first appearance."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for text in [*"0123456789", *ROLES, *texts]:
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_word_tokenizer(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                        extra_texts: Iterable[str] = ()) -> int:
    """Build the tokenizer of `extra_texts` and the JSONL files `inputs`, save it to the directory
    `output` (created) and return its vocabulary size."""
    inputs, extra_texts = list(inputs), list(extra_texts)
    if not inputs and not extra_texts:
        raise ValueError("no words: pass --input JSONL rows (or --rag-vocabulary) for the tokenizer to know")
    tokenizer = build_word_tokenizer(itertools.chain(extra_texts, corpus_texts(inputs)))
    Path(output).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(os.fspath(output))
    return len(tokenizer)
