"""Block dropout [ours, block_attention.md]: each step a random subset of local blocks is
promoted to global (its tokens see every earlier block and are distilled), so every block, not
only the last, yields a training signal about the blocks before it."""

from __future__ import annotations

import torch

from megatron_focusft.masks import SegmentMask


def promote_blocks(attention: SegmentMask, probability: float, generator: torch.Generator) -> SegmentMask:
    """`attention` with each local block (one that does not see its prefix) promoted with
    `probability`, independently; draws come from `generator` (CPU), one per block of the mask
    in row-major block order, so every rank holding the same mask promotes the same blocks.
    The global blocks, the sinks' privacy and the padding are unchanged."""
    if probability == 0:
        return attention
    b, s = attention.shape
    width = int(attention.block_index.max()) + 1 if attention.block_index.numel() else 0
    draws = torch.rand((b, max(width, 1)), generator=generator) < probability
    index = attention.block_index.clamp(min=0).cpu()
    promoted = torch.gather(draws, 1, index).to(attention.device) & (attention.block_index >= 0)
    local = ~attention.sees_prefix & (attention.doc_ids >= 0)
    return SegmentMask(doc_ids=attention.doc_ids, block_index=attention.block_index, causal=attention.causal,
                       sees_prefix=attention.sees_prefix | (local & promoted), private=attention.private)
