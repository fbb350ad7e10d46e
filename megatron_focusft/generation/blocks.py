"""Block-attention inference with KV reuse: each local block is encoded alone and cached; a
prompt is assembled from cached blocks at any offset, then its global block is prefilled and
the reply decoded (arXiv 2409.15355; `focusft generate --blocks`).

Exact by construction: Megatron's static KV cache holds keys BEFORE RoPE and rotates every key
by its cache slot's position at attention time, so a block's cached keys and values, written
into slots [o, o + L), are those a full forward over the assembled prompt computes for it
(inside a local block attention sees only the block, and RoPE attention depends only on the
distance between positions: any RoPE variant whose rotations compose, llama3 scaling
included). The global block and the reply see every earlier token. No sink tokens yet.
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

    def tokens(self) -> list[int]:
        return [t for block in self.blocks for t in block] + list(self.global_block)

    def block_ids(self) -> list[int]:
        """Block number of every token; the global block has the highest."""
        ids = [i for i, block in enumerate(self.blocks) for _ in block]
        return ids + [len(self.blocks)] * len(self.global_block)


def block_mask(block_ids: Sequence[int], device: torch.device | str) -> SegmentMask:
    ids = torch.tensor([list(block_ids)], device=device)
    return segment_mask("block", doc_ids=torch.zeros_like(ids), block_ids=ids)


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
             context: StaticInferenceContext) -> torch.Tensor:
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    logits = model(tokens, positions, attention_mask=mask, inference_context=context)
    context.sequence_len_offset += tokens.shape[1]
    return gather_from_tensor_model_parallel_region(logits[:, -1:].contiguous())[:, -1].float()


def _layer_numbers(model: GPTModel) -> list[int]:
    return [m.layer_number for m in model.modules() if isinstance(m, SegmentCoreAttention)]


@torch.no_grad()
def encode_block(model: GPTModel, block: Sequence[int]) -> dict[int, LayerKV]:
    """One block alone at positions 0..L-1, causal: every layer's pre-RoPE keys and values."""
    device = next(model.parameters()).device
    tokens = torch.tensor([list(block)], device=device)
    context = StaticInferenceContext(1, len(block))
    _forward(model, tokens, 0, segment_mask("causal", doc_ids=torch.zeros_like(tokens)), context)
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
    prefix = sum(len(b) for b in prompt.blocks)
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
    block_ids = prompt.block_ids()
    global_tokens = torch.tensor([list(prompt.global_block)], device=device)
    logits = _forward(model, global_tokens, prefix, block_mask(block_ids, device), context)
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
        logits = _forward(model, torch.tensor([[token]], device=device), len(block_ids) - 1,
                          block_mask(block_ids, device), context)
    return _results(torch.tensor([tokens]), kept, config)[0]
