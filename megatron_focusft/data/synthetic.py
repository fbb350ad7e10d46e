"""Deterministic synthetic data: a packed multi-turn retrieval task, and benchmark mask layouts.

Legend: ``b`` rows of a micro-batch, ``s`` tokens per row; every packed tensor is ``[b, s]``.

Retrieval task. One sample is a multi-turn conversation over a table of key/value pairs::

    BOS k1 v1 k2 v2 ... kn vn | QUERY kq ANSWER | vq EOS | QUERY kq' ANSWER | vq' EOS ...
    '------------- context -------------------'  resp.    '--- context ---'   resp.

Keys are distinct within a sample, values are drawn independently. The response of each turn
(``vq EOS``) is the loss region, so under the FocuSFT mask the table and each question form
bidirectional context blocks and every answer is a causal response block that sees its prefix.
A model can only answer by looking the key up in its own sample's table (chance is 1 / n),
which makes the task a small stand-in for long-context retrieval (needle/kv-retrieval).

Samples are packed greedily into rows of ``s`` tokens (``doc_ids`` 0, 1, ... per row, -1 on
the padding tail); a sample never straddles two rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_focusft.masks import MaskKind

# Token ids reserved by the task; content tokens (keys, then values) start at FIRST_CONTENT_ID.
PAD_ID, BOS_ID, QUERY_ID, ANSWER_ID, EOS_ID = 0, 1, 2, 3, 4
FIRST_CONTENT_ID = 8
TURN_OVERHEAD = 5  # QUERY kq ANSWER vq EOS


@dataclass(frozen=True)
class RetrievalTaskConfig:
    """Shape of the retrieval samples.

    vocab_size: model vocabulary; ids [FIRST_CONTENT_ID, FIRST_CONTENT_ID + num_keys) are keys,
        the rest up to vocab_size are values.
    num_keys: size of the key alphabet (None: half of the content ids).
    min_pairs / max_pairs: table size n per sample, uniform in [min, max].
    min_queries / max_queries: question/answer turns per sample, uniform in [min, max] (<= n).
    """

    vocab_size: int = 512
    num_keys: int | None = None
    num_values: int | None = None
    min_pairs: int = 4
    max_pairs: int = 16
    min_queries: int = 1
    max_queries: int = 3

    def __post_init__(self) -> None:
        content = self.vocab_size - FIRST_CONTENT_ID
        if content < 4:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for keys and values "
                             f"(ids below {FIRST_CONTENT_ID} are reserved)")
        if not 1 <= self.min_pairs <= self.max_pairs:
            raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {self.min_pairs}, {self.max_pairs}")
        if not 1 <= self.min_queries <= self.max_queries:
            raise ValueError(f"need 1 <= min_queries <= max_queries, got {self.min_queries}, {self.max_queries}")
        if self.max_queries > self.min_pairs:
            raise ValueError(f"max_queries ({self.max_queries}) must not exceed min_pairs ({self.min_pairs}): "
                             f"each question asks a distinct key of the table")
        if not 0 < self.keys < content:
            raise ValueError(f"num_keys must be in (0, {content}), got {self.num_keys}")
        if not 0 < self.values <= content - self.keys:
            raise ValueError(f"num_values must be in (0, {content - self.keys}] (content ids after the keys), "
                             f"got {self.num_values}")
        if self.keys < self.max_pairs:
            raise ValueError(f"num_keys ({self.keys}) must be >= max_pairs ({self.max_pairs}): keys are distinct")

    @property
    def keys(self) -> int:
        return self.num_keys if self.num_keys is not None else (self.vocab_size - FIRST_CONTENT_ID) // 2

    @property
    def values(self) -> int:
        return self.num_values if self.num_values is not None else self.vocab_size - FIRST_CONTENT_ID - self.keys

    @property
    def value_range(self) -> tuple[int, int]:
        """[first, end) of the value token ids."""
        first = FIRST_CONTENT_ID + self.keys
        return first, first + self.values

    @property
    def max_sample_length(self) -> int:
        return 1 + 2 * self.max_pairs + TURN_OVERHEAD * self.max_queries

    @classmethod
    def fitting(cls, seq_length: int, **overrides: int) -> RetrievalTaskConfig:
        """The default task with max_pairs lowered, if needed, so that a sample fits seq_length."""
        base = cls(**overrides)
        room = (seq_length - 1 - TURN_OVERHEAD * base.max_queries) // 2
        if room < base.min_pairs:
            raise ValueError(f"seq_length {seq_length} is too short for the retrieval task: a sample with "
                             f"{base.min_pairs} pairs and {base.max_queries} questions needs "
                             f"{1 + 2 * base.min_pairs + TURN_OVERHEAD * base.max_queries} tokens")
        return cls(**{**overrides, "max_pairs": min(base.max_pairs, room)})


@dataclass(frozen=True)
class RetrievalSample:
    """One conversation: token ids and a same-length 0/1 list, 1 on response tokens."""

    tokens: list[int]
    response: list[int]
    num_pairs: int


def retrieval_sample(config: RetrievalTaskConfig, rng: random.Random) -> RetrievalSample:
    """Draw one sample from `rng` (see the module docstring for the format)."""
    n = rng.randint(config.min_pairs, config.max_pairs)
    keys = rng.sample(range(FIRST_CONTENT_ID, FIRST_CONTENT_ID + config.keys), n)
    value_lo, value_hi = config.value_range
    values = [rng.randrange(value_lo, value_hi) for _ in range(n)]
    tokens = [BOS_ID]
    for key, value in zip(keys, values):
        tokens += [key, value]
    response = [0] * len(tokens)
    for i in rng.sample(range(n), rng.randint(config.min_queries, config.max_queries)):
        tokens += [QUERY_ID, keys[i], ANSWER_ID, values[i], EOS_ID]
        response += [0, 0, 0, 1, 1]
    return RetrievalSample(tokens, response, n)


@dataclass(frozen=True, eq=False)
class PackedRows:
    """Packed samples: tokens, doc_ids (-1 = padding) and response (0/1), each [b, s] long."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    response: torch.Tensor

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(self.tokens.to(device), self.doc_ids.to(device), self.response.to(device))


class RetrievalPacker:
    """Endless, reproducible stream of packed [b, s] rows of retrieval samples.

    The same (config, seq_length, batch_size, seed) always yields the same rows; give every
    data-parallel rank its own seed.
    """

    def __init__(self, config: RetrievalTaskConfig, seq_length: int, batch_size: int, seed: int) -> None:
        if config.max_sample_length > seq_length:
            raise ValueError(f"seq_length {seq_length} is shorter than the longest retrieval sample "
                             f"({config.max_sample_length} tokens); use RetrievalTaskConfig.fitting(seq_length)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.seq_length = seq_length
        self.batch_size = batch_size
        self._rng = random.Random(seed)
        self._pending: RetrievalSample | None = None

    def _next_sample(self) -> RetrievalSample:
        sample, self._pending = self._pending, None
        return sample if sample is not None else retrieval_sample(self.config, self._rng)

    def next_rows(self) -> PackedRows:
        b, s = self.batch_size, self.seq_length
        tokens = torch.full((b, s), PAD_ID, dtype=torch.long)
        doc_ids = torch.full((b, s), -1, dtype=torch.long)
        response = torch.zeros((b, s), dtype=torch.long)
        for row in range(b):
            pos, doc = 0, 0
            while True:
                sample = self._next_sample()
                n = len(sample.tokens)
                if pos + n > s:
                    self._pending = sample  # opens the next row
                    break
                tokens[row, pos:pos + n] = torch.tensor(sample.tokens)
                response[row, pos:pos + n] = torch.tensor(sample.response)
                doc_ids[row, pos:pos + n] = doc
                pos, doc = pos + n, doc + 1
        return PackedRows(tokens, doc_ids, response)

    def __iter__(self) -> Iterator[PackedRows]:
        while True:
            yield self.next_rows()


# ---------------------------------------------------------------------------------------------
# Benchmark layouts: one representative, deterministic layout per mask kind.
# ---------------------------------------------------------------------------------------------

FOCUSFT_TURNS = 4
FOCUSFT_RESPONSE_FRACTION = 0.125
BLOCK_LOCAL_BLOCKS = 8


def _cuts(total: int, fractions: list[float]) -> list[int]:
    """Run lengths (each >= 1) of `total` tokens split by cumulative `fractions` (summing to 1)."""
    bounds, acc = [0], 0.0
    for fraction in fractions:
        acc += fraction
        bounds.append(round(acc * total))
    bounds[-1] = total
    lengths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    if min(lengths) < 1:
        raise ValueError(f"a layout of {len(fractions)} runs does not fit in {total} tokens")
    return lengths


def benchmark_layout(kind: MaskKind, seq_length: int, batch_size: int = 1) -> dict[str, torch.Tensor | str]:
    """Keyword arguments for ``segment_mask`` describing a typical long-context row of `kind`.

    Every row is one full-length sample (no padding), identical across the batch:
    - causal:  one causal document.
    - focusft: FOCUSFT_TURNS turns, each a context block (user message / tool output /
               retrieved documents; bidirectional) followed by a response block holding
               FOCUSFT_RESPONSE_FRACTION of the turn (causal, sees the whole prefix).
    - block:   BLOCK_LOCAL_BLOCKS equal local blocks (causal inside themselves only) over
               7/8 of the row, then the global block (question + response) over the last
               1/8, which sees the whole row causally.
    """
    s = seq_length
    doc_ids = torch.zeros((batch_size, s), dtype=torch.long)
    out: dict[str, torch.Tensor | str] = {"kind": kind, "doc_ids": doc_ids}
    if kind == "causal":
        return out
    if kind == "focusft":
        turn = 1.0 / FOCUSFT_TURNS
        fractions = [turn * (1 - FOCUSFT_RESPONSE_FRACTION), turn * FOCUSFT_RESPONSE_FRACTION] * FOCUSFT_TURNS
        flags = [0, 1] * FOCUSFT_TURNS
        row = torch.cat([torch.full((n,), f, dtype=torch.long) for n, f in zip(_cuts(s, fractions), flags)])
        out["loss_mask"] = row.expand(batch_size, s).contiguous()
        return out
    if kind == "block":
        local = (1 - 1 / 8) / BLOCK_LOCAL_BLOCKS
        lengths = _cuts(s, [local] * BLOCK_LOCAL_BLOCKS + [1 / 8])
        row = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])
        out["block_ids"] = row.expand(batch_size, s).contiguous()
        return out
    raise ValueError(f"unknown mask kind {kind!r}; expected causal, focusft or block")
