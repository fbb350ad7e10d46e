"""Block-attention inference with KV reuse: each local block is encoded alone and cached; a
prompt is assembled from cached blocks at any offset, then its global block is prefilled and
the reply decoded (arXiv 2409.15355; `focusft generate --blocks`).

Exact by construction: Megatron's static KV cache holds keys BEFORE RoPE and rotates every key
by its cache slot's position at attention time, so a block's cached keys and values, written
into slots [o, o + L), are those a full forward over the assembled prompt computes for it
(inside a local block attention sees only the block, and RoPE attention depends only on the
distance between positions: any RoPE variant whose rotations compose, llama3 scaling
included). The global block and the reply see every earlier token.

Block sink tokens (a model trained with `--block-sink-tokens k`, models/block_sinks.py): every
local block is encoded as k sink slots (the model's sink embeddings) then its tokens, at local
positions 0..k+L-1, and its cache entry holds k + L keys and values; in the assembled prompt the
sink keys stay private to their block, as in training (the global block never sees them).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_focusft.attention.core_attention import SegmentCoreAttention
from megatron_focusft.generation.decode import Generation, GenerationConfig, _results
from megatron_focusft.generation.sampling import next_tokens
from megatron_focusft.masks import SegmentMask, segment_mask
from megatron_focusft.models.block_sinks import block_sinks_of, sink_slots

LayerKV = tuple[torch.Tensor, torch.Tensor]  # pre-RoPE keys, values: [L, groups/tp, head_dim] each


@dataclass(frozen=True)
class BlockPrompt:
    """Local blocks (each encoded alone, reusable) and the global block (the question and the
    assistant header), as token ids."""

    blocks: tuple[tuple[int, ...], ...]
    global_block: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.global_block:
            raise ValueError("a block prompt needs a non-empty global block")
        if any(not block for block in self.blocks):
            raise ValueError("local blocks must not be empty")

    def folded(self, max_blocks: int | None) -> BlockPrompt:
        """Local blocks beyond the first `max_blocks` joined to the front of the global block."""
        if max_blocks is None or len(self.blocks) <= max_blocks:
            return self
        rest = tuple(t for block in self.blocks[max_blocks:] for t in block)
        return BlockPrompt(self.blocks[:max_blocks], rest + self.global_block)

    def tokens(self, sink_tokens: int = 0) -> list[int]:
        """The assembled prompt's token ids; each local block opens with `sink_tokens` slots
        (id SINK_SLOT_ID: the model writes its sink embeddings there)."""
        sinks = [SINK_SLOT_ID] * sink_tokens
        return [t for block in self.blocks for t in (*sinks, *block)] + list(self.global_block)

    def block_ids(self, sink_tokens: int = 0) -> list[int]:
        """Block number of every token of `tokens(sink_tokens)`; the global block has the highest."""
        ids = [i for i, block in enumerate(self.blocks) for _ in range(sink_tokens + len(block))]
        return ids + [len(self.blocks)] * len(self.global_block)

    def sink_flags(self, sink_tokens: int = 0) -> list[int]:
        """1 on the sink slots of `tokens(sink_tokens)`."""
        flags = [f for block in self.blocks for f in [1] * sink_tokens + [0] * len(block)]
        return flags + [0] * len(self.global_block)


SINK_SLOT_ID = 0  # any valid id: the sink embedding replaces its embedding


def block_mask(block_ids: Sequence[int], device: torch.device | str, sink_flags: Sequence[int] | None = None,
               ) -> SegmentMask:
    ids = torch.tensor([list(block_ids)], device=device)
    sinks = None if sink_flags is None or not any(sink_flags) else torch.tensor([list(sink_flags)], device=device)
    return segment_mask("block", doc_ids=torch.zeros_like(ids), block_ids=ids, sink_mask=sinks)


def sink_count(model: GPTModel) -> int:
    sinks = block_sinks_of(model)
    return 0 if sinks is None else sinks.num_tokens


def embed_with_sinks(model: GPTModel, tokens: torch.Tensor, positions: torch.Tensor,
                     sink_flags: torch.Tensor) -> torch.Tensor:
    """The decoder input [s, b, h] of tokens [b, s] with the model's sink embeddings at the
    positions flagged in sink_flags [b, s] (slot j = j-th of each run)."""
    hidden = model.embedding(input_ids=tokens, position_ids=positions)
    return block_sinks_of(model)(hidden, sink_slots(sink_flags.bool()).t())


@dataclass
class BlockKVCache:
    """Each distinct block's per-layer K/V, keyed by its token ids (LRU, at most `capacity`
    blocks); shared across requests. hits / misses count lookups."""

    capacity: int = 1024
    entries: OrderedDict[str, dict[int, LayerKV]] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0

    @staticmethod
    def key(block: Sequence[int]) -> str:
        return hashlib.sha256(torch.tensor(list(block), dtype=torch.int64).numpy().tobytes()).hexdigest()

    def get(self, model: GPTModel, block: Sequence[int]) -> dict[int, LayerKV]:
        key = self.key(block)
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        self.entries[key] = encode_block(model, block)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return self.entries[key]


def _forward(model: GPTModel, tokens: torch.Tensor, start: int, mask: SegmentMask,
             context: StaticInferenceContext, sink_flags: torch.Tensor | None = None) -> torch.Tensor:
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    decoder_input = None if sink_flags is None else embed_with_sinks(model, tokens, positions, sink_flags)
    logits = model(tokens, positions, attention_mask=mask, inference_context=context, decoder_input=decoder_input)
    context.sequence_len_offset += tokens.shape[1]
    return gather_from_tensor_model_parallel_region(logits[:, -1:].contiguous())[:, -1].float()


def _layer_numbers(model: GPTModel) -> list[int]:
    return [m.layer_number for m in model.modules() if isinstance(m, SegmentCoreAttention)]


@torch.no_grad()
def encode_block(model: GPTModel, block: Sequence[int]) -> dict[int, LayerKV]:
    """One block alone at positions 0..k+L-1 (after the model's k sink slots), causal: every
    layer's pre-RoPE keys and values, [k + L, ...]."""
    device = next(model.parameters()).device
    num_sinks = sink_count(model)
    tokens = torch.tensor([[SINK_SLOT_ID] * num_sinks + list(block)], device=device)
    flags = torch.tensor([[1] * num_sinks + [0] * len(block)], device=device) if num_sinks else None
    context = StaticInferenceContext(1, tokens.shape[1])
    _forward(model, tokens, 0, segment_mask("causal", doc_ids=torch.zeros_like(tokens)), context, flags)
    return {layer: (k[:, 0].clone(), v[:, 0].clone()) for layer, (k, v) in context.key_value_memory_dict.items()}


@torch.no_grad()
def generate_with_blocks(model: GPTModel, prompt: BlockPrompt, config: GenerationConfig, cache: BlockKVCache,
                         generator: torch.Generator | None = None) -> Generation:
    """Assemble `prompt` from the cache (encoding blocks it lacks), prefill the global block,
    decode. Collective over TP (each rank caches its own K/V heads)."""
    if model.config.sequence_parallel or model.config.context_parallel_size > 1:
        raise ValueError("block generation runs without sequence or context parallelism")
    model.eval()
    device = next(model.parameters()).device
    num_sinks = sink_count(model)
    prefix = sum(num_sinks + len(b) for b in prompt.blocks)
    total = prefix + len(prompt.global_block) + config.max_new_tokens
    context = StaticInferenceContext(1, total)
    cached = [cache.get(model, block) for block in prompt.blocks]
    for layer in _layer_numbers(model):
        if not cached:
            break
        k0, v0 = cached[0][layer]
        keys = torch.zeros(total, 1, *k0.shape[1:], dtype=k0.dtype, device=device)
        values = torch.zeros(total, 1, *v0.shape[1:], dtype=v0.dtype, device=device)
        offset = 0
        for kv in cached:
            k, v = kv[layer]
            keys[offset:offset + k.shape[0], 0], values[offset:offset + k.shape[0], 0] = k, v
            offset += k.shape[0]
        context.key_value_memory_dict[layer] = (keys, values)
    context.sequence_len_offset = prefix
    block_ids, sinks = prompt.block_ids(num_sinks), prompt.sink_flags(num_sinks)
    global_tokens = torch.tensor([list(prompt.global_block)], device=device)
    logits = _forward(model, global_tokens, prefix, block_mask(block_ids, device, sinks), context)
    if generator is None:
        generator = torch.Generator().manual_seed(config.sampling.seed)
    stop = set(config.stop_token_ids)
    tokens: list[int] = []
    kept: list[torch.Tensor] = []
    for step in range(config.max_new_tokens):
        if config.keep_logits:
            kept.append(logits.cpu())
        token = int(next_tokens(logits, config.sampling, generator)[0])
        tokens.append(token)
        if token in stop or step == config.max_new_tokens - 1:
            break
        block_ids.append(block_ids[-1])  # the reply continues the global block
        sinks.append(0)
        logits = _forward(model, torch.tensor([[token]], device=device), len(block_ids) - 1,
                          block_mask(block_ids, device, sinks), context)
    return _results(torch.tensor([tokens]), kept, config)[0]
