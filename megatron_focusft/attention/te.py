"""`te` backend: Transformer Engine's fused varlen attention, driven by the mask's varlen plan.

Every segment mask is at most two THD calls of TE's ``DotProductAttention`` (see
``megatron_focusft.masks.varlen``): one with ``padding_causal_bottom_right`` for causal blocks,
one with ``padding`` (no mask inside a segment) for bidirectional ones. Both mask types run on
TE's flash and cuDNN fused backends; the ``arbitrary`` type, which would fall back to TE's
O(s^2) unfused backend, is never used.

TE facts relied on (read in TE's attention ``dot_product_attention.py``, ``backends.py`` and
``utils.py``, v2.8 and main):
- THD tensors are [t, heads, head_dim]; the THD output comes back as [t, heads * head_dim].
- THD needs a mask type containing "padding", int32 ``cu_seqlens_q`` / ``cu_seqlens_kv`` of the
  same shape [n + 1], and accepts ``max_seqlen_q`` / ``max_seqlen_kv`` (passing them avoids a sync).
- ``num_gqa_groups`` is the number of key/value heads; ``softmax_scale`` replaces 1/sqrt(d).
- ``attention_type="cross"`` because a segment's query and key lengths differ (in "self" mode
  some backends derive the key padding from ``cu_seqlens_q``).
- ``module.training`` selects whether the fused backends keep what backward needs.
- Only CUDA tensors; FP16/BF16 everywhere (FP32 only on the unfused backend of recent TE).
"""

from __future__ import annotations

import torch

from megatron_focusft.masks import SegmentMask
from megatron_focusft.masks.varlen import VarlenCall, run_varlen_plan, varlen_plan

try:
    from transformer_engine.pytorch import DotProductAttention as _TEDotProductAttention
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError(
        "the 'te' attention backend needs NVIDIA Transformer Engine (PyTorch), which could not be "
        f"imported ({err}). Install the extra: pip install megatron-focusft[te] "
        "(it builds against your CUDA toolkit and torch), or choose the 'sdpa' or 'flex' backend."
    ) from err

_CAUSAL_MASK_TYPE = "padding_causal_bottom_right"
_FULL_MASK_TYPE = "padding"

# One TE module per (hq, hkv, head dim qk, head dim v, scale, mask type): a module fixes
# these at construction, and every layer of a model shares the few combinations there are.
_TE_MODULES: dict[tuple[int, int, int, int, float, str], torch.nn.Module] = {}


def _te_module(hq: int, hkv: int, d_qk: int, d_v: int, scale: float, mask_type: str) -> torch.nn.Module:
    """The cached TE DotProductAttention for this configuration, created on first use."""
    cache_key = (hq, hkv, d_qk, d_v, scale, mask_type)
    module = _TE_MODULES.get(cache_key)
    if module is None:
        module = _TEDotProductAttention(
            num_attention_heads=hq,
            kv_channels=d_qk if d_qk == d_v else (d_qk, d_v),
            num_gqa_groups=hkv,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type=mask_type,
            attention_type="cross",
            softmax_scale=scale,
        )
        _TE_MODULES[cache_key] = module
    return module


def te_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: VarlenCall, scale: float
) -> torch.Tensor:
    """One varlen call on TE: q [tq, hq, d], k [tkv, hkv, d], v [tkv, hkv, dv] -> [tq, hq, dv]."""
    mask_type = _CAUSAL_MASK_TYPE if call.causal else _FULL_MASK_TYPE
    module = _te_module(q.shape[1], k.shape[1], q.shape[2], v.shape[2], scale, mask_type)
    # TE reads module.training to decide whether to keep the softmax statistics for backward;
    # follow autograd rather than the (unknown) mode of the model that calls this function.
    module.train(torch.is_grad_enabled())
    # TE reads the THD layout from strides; the gathered tensors are fresh, so this is a no-op.
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = module(
        q,
        k,
        v,
        qkv_format="thd",
        cu_seqlens_q=call.cu_seqlens_q,
        cu_seqlens_kv=call.cu_seqlens_kv,
        max_seqlen_q=call.max_seqlen_q,
        max_seqlen_kv=call.max_seqlen_kv,
    )
    return out.reshape(q.shape[0], q.shape[1], v.shape[2])


def te_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SegmentMask, scale: float
) -> torch.Tensor:
    """query [b, hq, s, d], key/value [b, hkv, s, d] -> [b, hq, s, d]; padding rows are zero.

    Keys and values are gathered per segment, so K/V memory grows with the number of blocks
    that see a shared prefix (see ``megatron_focusft.masks.varlen``). The mask must be on the
    tensors' device (the plan's index tensors are built there, once per mask).
    """
    if mask.device != query.device:
        raise ValueError(f"mask is on {mask.device} but query is on {query.device}; move the mask "
                         f"once per step (mask.to(device)) so its varlen plan is built there")
    return run_varlen_plan(query, key, value, varlen_plan(mask), scale, te_varlen_attention)
