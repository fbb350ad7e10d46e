"""`sdpa` backend: torch scaled_dot_product_attention with the materialised mask (short sequences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_focusft.masks import SegmentMask


def _sdpa_mask(mask: SegmentMask) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_mask [b, 1, s, s], empty_rows [b, s]), built once per mask for every layer."""
    dense = mask.to_dense()
    empty_rows = ~dense.any(dim=-1)
    return (dense | torch.diag_embed(empty_rows))[:, None], empty_rows


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SegmentMask, scale: float
) -> torch.Tensor:
    """query [b, hq, s, d], key/value [b, hkv, s, d] -> [b, hq, s, d]; O(s^2) mask memory.

    Rows that see no key (padding) would be NaN under softmax; they are given their own
    diagonal entry to attend to and their output is zeroed, so values and gradients stay finite.
    """
    dense, empty_rows = mask.derived("sdpa", _sdpa_mask)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=dense, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.masked_fill(empty_rows[:, None, :, None], 0.0)


def sdpa_last_queries_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SegmentMask, scale: float
) -> torch.Tensor:
    """Incremental decoding: query [b, hq, q, d] holds the LAST q of the mask's S positions,
    key/value [b, hkv, S, d] all of them (a KV cache) -> [b, hq, q, d].

    Only the q x S rows of the mask are evaluated (O(q * S) per call, no S x S tensor), so every
    backend decodes through this one path; queries that see nothing (padding) output 0.
    """
    b, s = mask.shape
    q_len = query.shape[2]
    rows = torch.arange(s - q_len, s, device=query.device)
    cols = torch.arange(s, device=query.device)
    batch = torch.arange(b, device=query.device)[:, None, None]
    visible = mask.visible(batch, rows[None, :, None], cols[None, None, :])  # [b, q, S]
    empty_rows = ~visible.any(dim=-1)
    visible = visible | empty_rows[..., None]  # NaN-free softmax on rows zeroed below
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=visible[:, None], scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.masked_fill(empty_rows[:, None, :, None], 0.0)
