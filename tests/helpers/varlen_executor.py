"""Pure-PyTorch executor of a varlen plan: proves the decomposition on CPU, no TE needed.

Each segment runs on its own with SDPA and an explicit mask written from the kernel
definitions (bottom-right causal: query i of n_q sees key j of n_kv iff j <= i + n_kv - n_q),
in double precision, so a mismatch with the dense reference is a plan bug, not rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_focusft.masks import SegmentMask
from megatron_focusft.masks.varlen import VarlenCall, run_varlen_plan, varlen_plan


def segment_allowed(n_q: int, n_kv: int, causal: bool) -> torch.Tensor:
    """BoolTensor [n_q, n_kv]: bottom-right causal when `causal`, else all True."""
    if not causal:
        return torch.ones(n_q, n_kv, dtype=torch.bool)
    q = torch.arange(n_q)[:, None]
    kv = torch.arange(n_kv)[None, :]
    return kv <= q + (n_kv - n_q)


def sdpa_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: VarlenCall, scale: float
) -> torch.Tensor:
    """Same contract as the TE segment kernel: [tq, hq, d], [tkv, hkv, d] x2 -> [tq, hq, dv]."""
    cu_q, cu_kv = call.cu_seqlens_q.tolist(), call.cu_seqlens_kv.tolist()
    outs = []
    for i in range(call.num_segments):
        q_seg = q[cu_q[i]:cu_q[i + 1]].double().transpose(0, 1)  # [hq, n_q, d]
        k_seg = k[cu_kv[i]:cu_kv[i + 1]].double().transpose(0, 1)  # [hkv, n_kv, d]
        v_seg = v[cu_kv[i]:cu_kv[i + 1]].double().transpose(0, 1)
        allowed = segment_allowed(q_seg.shape[1], k_seg.shape[1], call.causal).to(q.device)
        out = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, attn_mask=allowed, scale=scale,
                                             enable_gqa=q_seg.shape[0] != k_seg.shape[0])
        outs.append(out.transpose(0, 1).to(q.dtype))
    return torch.cat(outs, dim=0)


def varlen_sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SegmentMask, scale: float
) -> torch.Tensor:
    """The attention backend contract, executed through the varlen plan with SDPA segments."""
    return run_varlen_plan(query, key, value, varlen_plan(mask), scale, sdpa_varlen_attention)


def plan_to_dense(plan: tuple[VarlenCall, ...], batch: int, seq: int) -> torch.Tensor:
    """The mask a plan computes, BoolTensor [batch, seq, seq], for exact comparison with dense_mask.

    Built over all b * s flat positions first, so a segment that pairs tokens of two batch rows
    (which a per-row view would hide) raises AssertionError.
    """
    t = batch * seq
    flat = torch.zeros(t, t, dtype=torch.bool)
    for call in plan:
        cu_q, cu_kv = call.cu_seqlens_q.tolist(), call.cu_seqlens_kv.tolist()
        for i in range(call.num_segments):
            q_idx = call.q_index[cu_q[i]:cu_q[i + 1]].cpu()
            kv_idx = call.kv_index[cu_kv[i]:cu_kv[i + 1]].cpu()
            allowed = segment_allowed(q_idx.numel(), kv_idx.numel(), call.causal)
            flat[q_idx[:, None], kv_idx[None, :]] |= allowed
    rows = torch.arange(batch)
    per_row = flat.view(batch, seq, batch, seq)
    off_row = per_row.clone()
    off_row[rows, :, rows, :] = False
    if off_row.any():
        raise AssertionError("a segment pairs a query with a key of another batch row")
    return per_row[rows, :, rows, :]
