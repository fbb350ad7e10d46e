"""Varlen plan: a SegmentMask as at most two variable-length attention calls.

Legend: ``b`` batch rows, ``s`` tokens per row, ``t`` = b * s flat token positions (row-major:
token ``p`` of row ``r`` is flat index ``r * s + p``), ``n`` segments in one call, ``tq`` / ``tkv``
packed query / key tokens of one call, ``h`` heads, ``d`` head dim.

Every block of a SegmentMask (a run of equal ``block_index``) decomposes the mask exactly:
its queries see (the keys of earlier blocks it may see) + (its own block, causal or full), and
what they see of earlier blocks is the same for every query of the block. So each block
becomes one varlen *segment*:

    q  = the block's tokens (contiguous),
    kv = [kv_start_of_block, block_start) minus private keys of other blocks, then the block's
         own tokens LAST.

With its own tokens last, a causal block is exactly *bottom-right* causal over its kv list
(query ``i`` of ``n_q`` sees kv ``j`` iff ``j <= i + n_kv - n_q``) and a bidirectional block
is *no mask*. Segments of each kind form one call, so a whole mask is at most two varlen
calls, each expressible by flash-attn / cuDNN / TE kernels without an arbitrary mask.

Memory cost: keys and values are gathered (duplicated) into packed tensors, so one call holds
``sum over its blocks of (visible keys of the block)`` K/V tokens. Plain causal masks cost
nothing extra (one segment per document, no duplication); a document of ``m`` blocks that all
see their prefix (a focusft multi-turn sample, say) holds between 1 and ``m`` times its length,
about ``(m + 1) / 2`` times for equal blocks. Attention FLOPs do not grow: every score a kernel
computes is a visible (query, key) pair.

Building a plan synchronises with the device a few times (``nonzero``, ``max``); it runs once
per mask and is cached on it (``mask.derived("varlen", ...)``), so every layer of a step
shares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_focusft.masks.layout import SegmentMask, run_bounds


@dataclass(frozen=True, eq=False)
class VarlenCall:
    """One variable-length attention call over ``n`` segments.

    q_index       [tq] long: flat token index (into b * s) of each packed query, segment by
                  segment; the queries of segment i are ``q_index[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``.
    kv_index      [tkv] long: flat token index of each packed key/value, segment by segment.
    cu_seqlens_q  [n + 1] int32: segment offsets into q_index, starting at 0.
    cu_seqlens_kv [n + 1] int32: segment offsets into kv_index, starting at 0.
    max_seqlen_q  longest query segment; max_seqlen_kv longest key segment.
    causal        True: bottom-right causal inside every segment; False: no mask.

    Invariants: every segment has n_kv >= n_q >= 1 and its last n_q keys are its queries
    (same flat indices, same order); all indices of a segment lie in one batch row.
    """

    q_index: torch.Tensor
    kv_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int
    causal: bool

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_q.numel() - 1


# A segment kernel: (q [tq, hq, d], k [tkv, hkv, d], v [tkv, hkv, dv], call, scale) -> [tq, hq, dv].
SegmentAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VarlenCall, float], torch.Tensor]


def varlen_plan(mask: SegmentMask) -> tuple[VarlenCall, ...]:
    """The mask as varlen calls: causal-bottom-right first, then no-mask; empty ones omitted.

    Every non-padding token is the query of exactly one segment of one call; padding tokens
    appear in no call (as queries or keys). Cached per mask object.
    """
    return mask.derived("varlen", _build_plan)


def run_varlen_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: tuple[VarlenCall, ...],
    scale: float,
    segment_attention: SegmentAttentionFn,
) -> torch.Tensor:
    """Execute a plan with any segment kernel: gather packed q/k/v, attend, scatter back.

    query [b, hq, s, d], key [b, hkv, s, d], value [b, hkv, s, dv] -> out [b, hq, s, dv].
    Tokens in no call (padding) keep the zero they start with. Autograd flows through the
    gathers, so keys duplicated across segments accumulate their gradients.
    """
    b, hq, s, _ = query.shape
    dv = value.shape[-1]
    out = query.new_zeros(b * s, hq, dv)
    for call in plan:
        q_row, q_pos = call.q_index // s, call.q_index % s
        kv_row, kv_pos = call.kv_index // s, call.kv_index % s
        # Advanced indexing gathers [b, h, s, d] -> [t, h, d] straight from any layout (no
        # token-major copy of the whole tensor); its backward accumulates duplicated keys.
        packed_out = segment_attention(
            query[q_row, :, q_pos],
            key[kv_row, :, kv_pos],
            value[kv_row, :, kv_pos],
            call,
            scale,
        )
        # Out of place: each query index is in exactly one call, so copies never overlap.
        out = out.index_copy(0, call.q_index, packed_out.to(out.dtype))
    # [b * s, hq, dv] -> a [b, hq, s, dv] view.
    return out.view(b, s, hq, dv).transpose(1, 2)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """[n] lengths -> [n + 1] int32 offsets starting at 0 (the cu_seqlens layout)."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _segment_offsets(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a packed layout of segments with `lengths` [n]: (segment id, offset inside it), [total]."""
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                      output_size=total)
    starts = lengths.cumsum(0) - lengths
    offset = torch.arange(total, device=lengths.device) - starts[segment]
    return segment, offset


@dataclass(frozen=True)
class _Blocks:
    """Per-block facts, each [num_blocks], blocks in flat (row-major) order.

    q_lo, q_hi:   flat [start, end) of the block's own tokens.
    prefix_rank:  number of public tokens before the block's first visible key (flat order).
    n_prefix:     visible keys before the block (public keys in [kv_start, block_start)).
    causal:       the block is causal inside.
    """

    q_lo: torch.Tensor
    q_hi: torch.Tensor
    prefix_rank: torch.Tensor
    n_prefix: torch.Tensor
    causal: torch.Tensor

    def select(self, keep: torch.Tensor) -> _Blocks:
        return _Blocks(self.q_lo[keep], self.q_hi[keep], self.prefix_rank[keep], self.n_prefix[keep],
                       self.causal[keep])


def _blocks(mask: SegmentMask, public_rank: torch.Tensor) -> _Blocks:
    """Find every block and its visible prefix; public_rank [b * s + 1] counts public tokens."""
    b, s = mask.shape
    pos = torch.arange(s, device=mask.device).expand(b, s)
    block_start, block_end = run_bounds(mask.block_index)
    kv_start, _ = mask.kv_interval
    first = (mask.block_index >= 0) & (pos == block_start)
    rows, starts = first.nonzero(as_tuple=True)
    row_offset = rows * s
    q_lo = row_offset + starts
    key_lo = row_offset + kv_start[rows, starts]
    prefix_rank = public_rank[key_lo]
    return _Blocks(
        q_lo=q_lo,
        q_hi=row_offset + block_end[rows, starts],
        prefix_rank=prefix_rank,
        # Every key before the block start is another block's, so "public" is "visible" there.
        n_prefix=public_rank[q_lo] - prefix_rank,
        causal=mask.causal[rows, starts],
    )


def _call(blocks: _Blocks, public_index: torch.Tensor, causal: bool) -> VarlenCall:
    """Pack the segments of `blocks` (all of one causal kind) into one VarlenCall."""
    n_q = blocks.q_hi - blocks.q_lo
    n_kv = blocks.n_prefix + n_q
    cu_q, cu_kv = _cumulative(n_q), _cumulative(n_kv)
    total_q, total_kv = int(cu_q[-1]), int(cu_kv[-1])

    segment, offset = _segment_offsets(n_q, total_q)
    q_index = blocks.q_lo[segment] + offset

    segment, offset = _segment_offsets(n_kv, total_kv)
    n_prefix = blocks.n_prefix[segment]
    in_prefix = offset < n_prefix
    # Prefix keys: the next public tokens from the block's first visible key; own keys follow.
    # The clamp only guards the lanes torch.where discards (own keys, or no public token at all).
    rank = (blocks.prefix_rank[segment] + offset).clamp(max=max(public_index.numel() - 1, 0))
    prefix_key = public_index[rank] if public_index.numel() else torch.zeros_like(rank)
    kv_index = torch.where(in_prefix, prefix_key, blocks.q_lo[segment] + offset - n_prefix)

    return VarlenCall(
        q_index=q_index,
        kv_index=kv_index,
        cu_seqlens_q=cu_q,
        cu_seqlens_kv=cu_kv,
        max_seqlen_q=int(n_q.max()),
        max_seqlen_kv=int(n_kv.max()),
        causal=causal,
    )


def _build_plan(mask: SegmentMask) -> tuple[VarlenCall, ...]:
    # Public keys may be seen from other blocks: everything but private keys and padding.
    public = (~mask.private & (mask.block_index >= 0)).reshape(-1)
    public_rank = F.pad(public.long().cumsum(0), (1, 0))  # [t + 1]: public tokens before index i
    public_index = public.nonzero().squeeze(1)  # flat index of the k-th public token
    blocks = _blocks(mask, public_rank)
    calls = []
    for causal in (True, False):
        chosen = blocks.select(blocks.causal == causal)
        if chosen.q_lo.numel() > 0:
            calls.append(_call(chosen, public_index, causal))
    return tuple(calls)
