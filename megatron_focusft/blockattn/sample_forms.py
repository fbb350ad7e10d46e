"""Block-attention samples: a chat row in full form and in block form (arXiv 2409.15355's rules).

A form is the row's tokens with a block id per token (`data.chat.SampleForm`): the full form has
one block (block 0: causal attention over the whole sample); the block form has local blocks
0..n-1, each seeing only itself, and the global block n (the question with the assistant header,
then the response) that sees everything. Both forms hold the same tokens, plus, in block form, k
sink slots at the start of every local block (`sink_tokens`; the model puts its learned sink
embeddings there, models/block_sinks.py).

Where the blocks come from:
- a row with ``blocks`` (pre-segmented context, e.g. retrieved passages: the RAG layout): one
  local block per entry; the rendered conversation is the global block;
- a plain chat (the reference's rules, block_attention.md): the final assistant message is the
  response and the last user message before it the global block (for a single-turn chat: that
  message's last chunk); every earlier message is split into chunks by the segmenter
  (`--block-segmenter`, default the reference's ``delimiter``), and chunks never cross a
  message. With 12 or more messages each earlier message is one block; otherwise adjacent
  chunks are merged (smallest pair first) until there are fewer than 15 blocks. A chat whose
  messages hold code (a ``` fence) or that gives fewer than 2 blocks has no block form. Only the
  final assistant turn is a response in block form (earlier replies are context).

Chunk cuts are placed on token boundaries of the rendered conversation: a cut at character c of
a message's content is used where the content's tokens appear in the rendering and the tokens of
content[:c] are a prefix of them (true at the delimiters of every tokenizer we ship); other
cuts are dropped. So the block form never re-tokenises: its tokens are the full form's.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_focusft.data.chat import ChatRow, SampleForm, tokenize_chat
from megatron_focusft.data.tokenizer import ChatTokenizer, flatten_segments
from megatron_focusft.segment.registry import Segmenter

# The reference's merging rule (block_attention.md, "Merging").
MANY_MESSAGES = 12
MAX_BLOCKS = 14  # "fewer than 15 blocks", the global block included


@dataclass(frozen=True)
class BlockFormConfig:
    """Which forms a row trains on.

    full_form        include the full form of every row (block fine-tuning: yes; distillation:
                     no, the student reads the block form, rows without one in full form).
    block_ratio      probability that an eligible row also gives its block form (seeded per row).
    sink_tokens      k sink slots at the start of every local block (0: none).
    seed             seed of the per-row choice.
    """

    full_form: bool = True
    block_ratio: float = 1.0
    sink_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.block_ratio <= 1.0:
            raise ValueError(f"--block-ratio must be in [0, 1], got {self.block_ratio}")
        if self.sink_tokens < 0:
            raise ValueError(f"--block-sink-tokens must be >= 0, got {self.sink_tokens}")


@dataclass(frozen=True)
class BlockSampleForms:
    """`data.chat.SampleForms` for block attention: the full form and/or the block form of a row."""

    config: BlockFormConfig
    segmenter: Segmenter
    seq_length: int

    @property
    def identity(self) -> str:
        c = self.config
        return (f"block-forms-v1(full={c.full_form},ratio={c.block_ratio},sinks={c.sink_tokens},seed={c.seed},"
                f"segmenter={self.segmenter.identity})")

    def __call__(self, row: ChatRow, tokenizer: ChatTokenizer, row_key: str) -> list[SampleForm]:
        ids, response = tokenize_chat(tokenizer, row.messages, row.tools, self.seq_length, row.blocks)
        full = SampleForm(ids, response, [0] * len(ids), [0] * len(ids))
        block = self._block_form(row, tokenizer, ids, response)
        chosen = block is not None and _draw(self.config.seed, row_key) < self.config.block_ratio
        if not chosen:
            return [full]
        return [full, block] if self.config.full_form else [block]

    def _block_form(self, row: ChatRow, tokenizer: ChatTokenizer, ids: list[int],
                    response: list[int]) -> SampleForm | None:
        if row.blocks:
            lengths = [len(block) for block in row.blocks]
            starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]  # the last: the global block
            return with_sinks(ids, response, starts, self.config.sink_tokens, tokenizer.pad_id)
        starts = chat_block_starts(row, tokenizer, self.segmenter, ids)
        if starts is None:
            return None
        final_turn = _final_response_start(response)
        response = [0] * final_turn + response[final_turn:]
        return with_sinks(ids, response, starts, self.config.sink_tokens, tokenizer.pad_id)


def _draw(seed: int, row_key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{row_key}".encode()).digest()
    return random.Random(digest).random()


def _final_response_start(response: Sequence[int]) -> int:
    """Start of the last run of response tokens (the final assistant turn)."""
    end = max(i for i, flag in enumerate(response) if flag) + 1
    start = end
    while start > 0 and response[start - 1]:
        start -= 1
    return start


def with_sinks(ids: Sequence[int], response: Sequence[int], starts: Sequence[int], sink_tokens: int,
               sink_id: int = 0) -> SampleForm:
    """The block form: local blocks begin at starts[:-1] (starts[0] = 0), the global block at
    starts[-1]; `sink_tokens` slots (id `sink_id`, context) open every local block."""
    if list(starts) != sorted(set(starts)) or starts[0] != 0 or starts[-1] >= len(ids):
        raise ValueError(f"block starts {list(starts)} must rise from 0 and leave a global block in {len(ids)} tokens")
    out_ids: list[int] = []
    out_response: list[int] = []
    block_ids: list[int] = []
    sink: list[int] = []
    edges = [*starts, len(ids)]
    for block, (lo, hi) in enumerate(zip(edges, edges[1:])):
        local = block < len(starts) - 1
        k = sink_tokens if local else 0
        out_ids += [sink_id] * k + list(ids[lo:hi])
        out_response += [0] * k + list(response[lo:hi])
        block_ids += [block] * (k + hi - lo)
        sink += [1] * k + [0] * (hi - lo)
    return SampleForm(out_ids, out_response, block_ids, sink)


def chat_block_starts(row: ChatRow, tokenizer: ChatTokenizer, segmenter: Segmenter,
                      ids: Sequence[int]) -> list[int] | None:
    """Token starts of the local blocks and (last) of the global block in the rendered chat
    `ids`, by the reference's rules (module doc); None when the chat has no block form."""
    messages = row.messages
    if any("```" in (m.get("content") or "") for m in messages):
        return None
    final = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [i for i, m in enumerate(messages[:final]) if m["role"] == "user"]
    if not users:
        return None
    spans = _message_spans(tokenizer, messages[:final], row.tools, ids)
    if spans is None:
        return None
    global_message = users[-1]
    earlier = range(global_message)
    chunked = {i: [spans[i][0]] for i in earlier}
    if len(messages[:final]) < MANY_MESSAGES:
        to_split = list(earlier)
        single_turn = len(users) == 1 and global_message == final - 1
        if single_turn:
            to_split.append(global_message)
        contents = [messages[i].get("content") or "" for i in to_split]
        cut_lists = segmenter.segment(contents)
        for i, content, cuts in zip(to_split, contents, cut_lists):
            token_cuts = _token_cuts(tokenizer, content, cuts, ids, spans[i])
            chunked[i] = [spans[i][0], *token_cuts]
    starts = [t for i in earlier for t in chunked[i]]
    global_start = spans[global_message][0]
    if global_message in chunked:  # single turn: the last chunk of the user message is global
        *local, global_start = chunked[global_message]
        starts += local
    starts = _merge(sorted(set(starts)), global_start)
    if not starts or global_start <= starts[-1]:
        return None
    return [*starts, global_start]


def _message_spans(tokenizer: ChatTokenizer, messages: Sequence[dict[str, Any]], tools: Any,
                   ids: Sequence[int]) -> list[tuple[int, int]] | None:
    """[start, end) of each message's tokens in `ids`, from renderings of growing prefixes (the
    first message also holds what precedes it); None if a prefix renders to other tokens."""
    ends = []
    for i in range(1, len(messages) + 1):
        try:
            prefix, _ = flatten_segments(tokenizer.render_chat(messages[:i], tools))
        except Exception:  # noqa: BLE001 - a template that cannot render a prefix: no block form
            return None
        if list(ids[:len(prefix)]) != prefix:
            return None
        ends.append(len(prefix))
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends))


def _token_cuts(tokenizer: ChatTokenizer, content: str, cuts: Sequence[int], ids: Sequence[int],
                span: tuple[int, int]) -> list[int]:
    """Character cuts of a message's content as token indices in `ids` (module doc: cuts that do
    not fall on a token boundary are dropped)."""
    if not cuts:
        return []
    content_ids = tokenizer.encode(content)
    lo, hi = span
    where = _find(ids, content_ids, lo, hi)
    if where is None:
        return []
    out = []
    for cut in cuts:
        head = tokenizer.encode(content[:cut])
        if 0 < len(head) < len(content_ids) and content_ids[:len(head)] == head:
            out.append(where + len(head))
    return out


def _find(ids: Sequence[int], needle: Sequence[int], lo: int, hi: int) -> int | None:
    n = len(needle)
    for start in range(lo, hi - n + 1):
        if list(ids[start:start + n]) == list(needle):
            return start
    return None


def _merge(starts: list[int], end: int) -> list[int]:
    """Merge adjacent local blocks (the pair of smallest combined length, leftmost first) until
    fewer than MAX_BLOCKS + 1 blocks remain with the global block."""
    edges = [*starts, end]
    while len(edges) - 1 > MAX_BLOCKS - 1:
        pair = [edges[i + 2] - edges[i] for i in range(len(edges) - 2)]
        del edges[1 + pair.index(min(pair))]
    return edges[:-1]

