"""Naive softmax attention against an explicit dense mask: the independent reference."""

from __future__ import annotations

import torch


def naive_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """query [b, hq, s, d], key/value [b, hkv, s, d], mask [b, s, s] bool -> [b, hq, s, d].

    Query heads are grouped over KV heads (GQA). Rows with no visible key give zeros.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    any_visible = mask.any(dim=-1)[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1) * any_visible
    return (probs @ value.double()).to(query.dtype)
