"""The attention backends, by name. Each computes masked attention for one SegmentMask.

Contract of a backend function: ``fn(query, key, value, mask, scale) -> out`` with
query [b, hq, s, d], key/value [b, hkv, s, d] (hq a multiple of hkv: GQA), mask a SegmentMask
of shape [b, s], out [b, hq, s, d]. Rows that see no key (padding) return zeros, never NaN.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_focusft.masks import SegmentMask

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SegmentMask, float], torch.Tensor]

ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "flex", "te")


def get_attention_backend(name: str) -> AttentionFn:
    """The backend function called `name`; ImportError says what is missing for optional ones."""
    if name == "sdpa":
        from megatron_focusft.attention.sdpa import sdpa_attention

        return sdpa_attention
    if name == "flex":
        from megatron_focusft.attention.flex import flex_attention_backend

        return flex_attention_backend
    if name == "te":
        from megatron_focusft.attention.te import te_attention

        return te_attention
    raise ValueError(f"unknown attention backend {name!r}; expected one of {ATTENTION_BACKENDS}")
