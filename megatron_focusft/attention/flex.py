"""`flex` backend: torch FlexAttention over the SegmentMask's BlockMask (long sequences).

The BlockMask is built from the per-row key intervals (never an [s, s] mask) and cached on the
mask, so all layers of a step share one. On CUDA the compiled kernel skips empty tiles and runs
full tiles without the mask_mod; on CPU the eager path (forward only, scores materialised) is
for tests and debugging at short lengths.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.nn.attention.flex_attention import flex_attention

from megatron_focusft.masks import SegmentMask
from megatron_focusft.masks.flex import FLEX_BLOCK_SIZE, flex_block_mask

_compiled_flex_attention: Callable[..., torch.Tensor] | None = None


def flex_attention_for(device: torch.device) -> Callable[..., torch.Tensor]:
    """Compiled flex_attention on CUDA (compiled once, on first use), eager elsewhere."""
    global _compiled_flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def flex_attention_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: SegmentMask,
    scale: float,
    *,
    block_size: int = FLEX_BLOCK_SIZE,
) -> torch.Tensor:
    """query [b, hq, s, d], key/value [b, hkv, s, d] (hq a multiple of hkv) -> [b, hq, s, d].

    Rows that see no key (padding: kv_start == kv_end) are zeroed explicitly, so the contract
    does not rest on how a given kernel version treats fully masked rows.
    """
    block_mask = flex_block_mask(mask, block_size)
    attend = flex_attention_for(query.device)
    with warnings.catch_warnings():
        # Eager flex warns once that it materialises the scores instead of fusing a kernel;
        # off CUDA that is the intended path (short test lengths), so only that warning goes.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile",
                                category=UserWarning)
        out = attend(query, key, value, block_mask=block_mask, scale=scale,
                     enable_gqa=query.shape[1] != key.shape[1])
    kv_start, kv_end = mask.kv_interval
    sees_nothing = kv_end <= kv_start
    return out.masked_fill(sees_nothing[:, None, :, None], 0.0)
