"""Context parallelism for segment masks: load-balanced chunks, all-gathered K/V (Llama 3 style).

Legend: ``b`` batch rows, ``hq``/``hkv`` query and key/value heads, ``d`` head dim, ``S`` the
full (padded) sequence length, ``cp`` the CP group size, ``C = S / (2 cp)`` the chunk length,
``s = S / cp = 2C`` the tokens one rank holds. Tensors here are [b, h, s, d] like the backends.

Layout (Megatron's convention). The sequence is cut into 2*cp chunks; CP rank r holds chunks r
and 2cp-1-r, in that order. Under a causal mask chunk i costs ~i, so every rank gets the same
work: (r) + (2cp-1-r) = 2cp-1.

Attention. Megatron/TE cannot combine CP with a custom mask, so this is our own: each rank
all-gathers K and V of the whole sequence, puts them back in global order and attends its s
local queries against all S keys. The mask is the GLOBAL SegmentMask (its [b, S] per-token
tensors are small, every rank holds them) evaluated at the local queries' global positions: a
query keeps exactly the keys it sees without CP. No [S, S] tensor is formed: the dense path
builds a [b, s, S] slice (the CPU/reference path: S^2/cp bools per row, fine for tests and
short sequences), the flex path a BlockMask with Q_LEN = s whose tiles are rows of the global
tile classification and whose mask_mod maps local query index -> global position.

Backward. The all-gather is an autograd Function whose backward is a reduce-scatter: the
gradient of rank r's keys is the sum over all ranks of what their queries sent to those keys.
Queries are never communicated, so dQ stays local.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from megatron_focusft.attention.flex import flex_attention_for
from megatron_focusft.masks import SegmentMask
from megatron_focusft.masks.flex import FLEX_BLOCK_SIZE, ordered_tiles, segment_mask_mod, tile_classes
from megatron_focusft.parallel.cp_layout import check_cp_layout, cp_positions, rank_major_positions

CpBackend = Literal["dense", "flex"]
CP_BACKENDS: tuple[str, ...] = ("dense", "flex")

# torch 2.13 renamed the tensor collectives (the old names warn); 2.11 only has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- collectives ---------------------------------------------------------------------------


def reduce_scatter_dim0(
    x: torch.Tensor, group: dist.ProcessGroup | None, method: Literal["auto", "native", "all_to_all"] = "auto"
) -> torch.Tensor:
    """Rank r gets sum over ranks of x[r*n:(r+1)*n]: [cp * n, ...] -> [n, ...].

    "native" is torch's reduce_scatter: NCCL's real one on GPUs. Gloo has no real one: torch
    accepts reduce_scatter_tensor on gloo but simulates it as all_reduce + chunk (pytorch#118911),
    twice the traffic, and older torch refused it. "all_to_all" sends each rank its piece from
    every rank (all_to_all_single, which gloo implements) and sums the cp pieces locally: a real
    reduce-scatter's traffic, summed in a fixed rank order. "auto" picks all_to_all for CPU
    tensors (gloo), native otherwise.
    """
    cp_size = dist.get_world_size(group)
    if x.shape[0] % cp_size:
        raise ValueError(f"reduce_scatter_dim0: dim 0 ({x.shape[0]}) is not a multiple of the group size {cp_size}")
    if method == "auto":
        method = "all_to_all" if x.device.type == "cpu" else "native"
    x = x.contiguous()
    if method == "native":
        out = x.new_empty(x.shape[0] // cp_size, *x.shape[1:])
        _reduce_scatter_single(out, x, group=group)
        return out
    if method != "all_to_all":
        raise ValueError(f"unknown reduce-scatter method {method!r}; expected auto, native or all_to_all")
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=group)
    # Low-precision gradients are summed in fp32 (NCCL accumulates in its wire dtype; this is
    # at least as accurate).
    accumulate = torch.promote_types(x.dtype, torch.float32)
    return received.view(cp_size, -1, *x.shape[1:]).sum(dim=0, dtype=accumulate).to(x.dtype)


class _GatherSequence(torch.autograd.Function):
    """All-gather of the ranks' load-balanced parts into global order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup | None, seq_dim: int) -> torch.Tensor:
        cp_size = dist.get_world_size(group)
        rows = local.movedim(seq_dim, 0).contiguous()  # collectives concatenate along dim 0
        seq_len = cp_size * rows.shape[0]
        rank_major = rank_major_positions(seq_len, cp_size, local.device)
        gathered = rows.new_empty(seq_len, *rows.shape[1:])
        _all_gather_single(gathered, rows, group=group)
        ctx.group, ctx.seq_dim = group, seq_dim
        ctx.save_for_backward(rank_major)
        return gathered.index_select(0, torch.argsort(rank_major)).movedim(0, seq_dim)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rank_major,) = ctx.saved_tensors
        # Rows back in rank order, so piece r holds every grad of rank r's tokens; summing each
        # piece over ranks adds up what every rank's queries sent to those keys.
        rows = grad_full.movedim(ctx.seq_dim, 0).index_select(0, rank_major)
        return reduce_scatter_dim0(rows, ctx.group).movedim(0, ctx.seq_dim), None, None


def gather_sequence(local: torch.Tensor, group: dist.ProcessGroup | None, seq_dim: int) -> torch.Tensor:
    """Full sequence, in global order, from every rank's load-balanced part (differentiable).

    local [..., S / cp (at seq_dim), ...] -> [..., S, ...]. Backward returns to each rank the
    sum over ranks of the gradient of its own tokens.
    """
    if dist.get_world_size(group) == 1:
        return local
    return _GatherSequence.apply(local, group, seq_dim)


# --- attention of local queries against the global sequence --------------------------------


def _check_mask(mask: SegmentMask, cp_size: int, cp_rank: int) -> None:
    if not isinstance(mask, SegmentMask):
        raise TypeError(f"mask must be the global SegmentMask, got {type(mask).__name__}")
    check_cp_layout(mask.shape[1], cp_size, cp_rank)


def cp_local_dense_mask(mask: SegmentMask, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Rows of the global mask at rank cp_rank's queries: BoolTensor [b, s, S] (reference path).

    Equal to mask.to_dense()[:, cp_positions(...)] without forming [S, S]; cached on the mask.
    """
    _check_mask(mask, cp_size, cp_rank)
    return mask.derived(("cp_dense", cp_size, cp_rank), lambda m: _local_rows(m, cp_size, cp_rank))


def _local_rows(mask: SegmentMask, cp_size: int, cp_rank: int) -> torch.Tensor:
    b, seq_len = mask.shape
    positions = cp_positions(seq_len, cp_size, cp_rank, mask.device)
    rows = torch.arange(b, device=mask.device).view(b, 1, 1)
    return mask.visible(rows, positions.view(1, -1, 1), torch.arange(seq_len, device=mask.device).view(1, 1, -1))


def _rows_with_own_key_if_empty(mask: SegmentMask, cp_size: int, cp_rank: int) -> torch.Tensor:
    """cp_local_dense_mask, where a row that sees nothing sees its own key instead.

    An all-masked row is 0/0 under softmax: torch's math SDPA returns zeros for it, fused kernels
    need not. The caller zeroes those rows' outputs, which also zeroes every gradient through
    them. Built once per mask, so no layer pays a host sync to ask whether such rows exist.
    """
    seq_len = mask.shape[1]
    positions = cp_positions(seq_len, cp_size, cp_rank, mask.device)
    visible = cp_local_dense_mask(mask, cp_size, cp_rank)
    own_key = positions[:, None] == torch.arange(seq_len, device=mask.device)  # [s, S]
    return visible | (~visible.any(dim=-1, keepdim=True) & own_key)


def cp_block_mask(mask: SegmentMask, cp_size: int, cp_rank: int, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """FlexAttention BlockMask of rank cp_rank's queries against all keys: Q_LEN = s, KV_LEN = S.

    With C a multiple of block_size every local query tile is one global query tile, so its key
    tiles are that row of the global tile classification (built from intervals, O(nt^2)); the
    mask_mod reads the global mask at global position positions[q_idx]. Cached on the mask.
    """
    _check_mask(mask, cp_size, cp_rank)
    chunk = mask.shape[1] // (2 * cp_size)
    if block_size <= 0 or chunk % block_size:
        raise ValueError(f"the chunk length S / (2 cp) = {chunk} must be a multiple of block_size {block_size}; "
                         f"pad the sequence to a multiple of 2 * cp * block_size = {2 * cp_size * block_size}")
    return mask.derived(("cp_flex", cp_size, cp_rank, block_size),
                        lambda m: _build_local_block_mask(m, cp_size, cp_rank, block_size))


def _build_local_block_mask(mask: SegmentMask, cp_size: int, cp_rank: int, block_size: int) -> BlockMask:
    seq_len = mask.shape[1]
    positions = cp_positions(seq_len, cp_size, cp_rank, mask.device)
    partial, full = tile_classes(mask, block_size)  # [b, nt, nt], global query tiles
    query_tiles = positions[::block_size] // block_size
    kv_num_blocks, kv_indices = ordered_tiles(partial[:, query_tiles])
    full_kv_num_blocks, full_kv_indices = ordered_tiles(full[:, query_tiles])
    global_mask_mod = segment_mask_mod(mask)

    def local_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return global_mask_mod(b, h, positions[q_idx], kv_idx)

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                    BLOCK_SIZE=block_size, mask_mod=local_mask_mod,
                                    seq_lengths=(positions.numel(), seq_len))


def attend_local_queries(
    q_local: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    mask: SegmentMask,
    scale: float,
    cp_size: int,
    cp_rank: int,
    *,
    backend: CpBackend = "dense",
    block_size: int = FLEX_BLOCK_SIZE,
) -> torch.Tensor:
    """Attention of rank cp_rank's queries q_local [b, hq, s, d] against k/v_full [b, hkv, S, d].

    The compute half of cp_attention (no communication). Rows that see no key give zeros.
    """
    b, seq_len = mask.shape
    if q_local.shape[0] != b or q_local.shape[2] * cp_size != seq_len or k_full.shape[2] != seq_len:
        raise ValueError(f"q_local {tuple(q_local.shape)} and k_full {tuple(k_full.shape)} do not fit a "
                         f"[b={b}, S={seq_len}] mask split over cp = {cp_size} ranks")
    gqa = q_local.shape[1] != k_full.shape[1]
    positions = cp_positions(seq_len, cp_size, cp_rank, mask.device)
    kv_start, kv_end = mask.kv_interval
    sees_nothing = (kv_end <= kv_start)[:, positions]  # [b, s]: padding queries
    if backend == "dense":
        visible = mask.derived(("cp_dense_attend", cp_size, cp_rank),
                               lambda m: _rows_with_own_key_if_empty(m, cp_size, cp_rank))
        out = F.scaled_dot_product_attention(q_local, k_full, v_full, attn_mask=visible[:, None], scale=scale,
                                             enable_gqa=gqa)
    elif backend == "flex":
        block_mask = cp_block_mask(mask, cp_size, cp_rank, block_size)
        attend = flex_attention_for(q_local.device)
        with warnings.catch_warnings():
            # Off CUDA flex runs eagerly (forward only, scores materialised) and says so once.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile",
                                    category=UserWarning)
            out = attend(q_local, k_full, v_full, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    else:
        raise ValueError(f"unknown CP attention backend {backend!r}; expected one of {CP_BACKENDS}")
    return out.masked_fill(sees_nothing[:, None, :, None], 0.0)


def cp_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    mask: SegmentMask,
    scale: float,
    cp_group: dist.ProcessGroup | None,
    *,
    backend: CpBackend = "dense",
    block_size: int = FLEX_BLOCK_SIZE,
) -> torch.Tensor:
    """Segment-masked attention under context parallelism, for this rank's tokens.

    q_local [b, hq, s, d], k_local/v_local [b, hkv, s, d]: the rank's tokens (split_for_cp
    order, s = S / cp); mask: the GLOBAL SegmentMask [b, S] (identical on every rank of the
    group); cp_group: the CP process group (Megatron: parallel_state.get_context_parallel_group()).
    Returns [b, hq, s, d], equal to the rows of single-process attention at the rank's positions.

    backend "dense": [b, s, S] mask slice + SDPA, differentiable (the CPU/reference path).
    backend "flex": BlockMask with Q_LEN = s (flex_attention; its backward needs CUDA).
    Rows that see nothing, including a rank whose tokens are all padding, give zeros and zero
    gradients. Every rank of the group must call this (and its backward) in the same order.
    """
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    _check_mask(mask, cp_size, cp_rank)
    # Checked before the collective: a rank that raised after it would leave the others hanging.
    if k_local.shape != v_local.shape:
        raise ValueError(f"k_local {tuple(k_local.shape)} and v_local {tuple(v_local.shape)} differ")
    if k_local.shape[2] * cp_size != mask.shape[1] or k_local.shape[0] != mask.shape[0]:
        raise ValueError(f"k_local {tuple(k_local.shape)} is not this rank's part of a [b={mask.shape[0]}, "
                         f"S={mask.shape[1]}] sequence over cp = {cp_size} ranks (s must be S / cp)")
    # One collective for K and V together (and one reduce-scatter for dK and dV in backward).
    kv_full = gather_sequence(torch.stack((k_local, v_local)), cp_group, seq_dim=3)
    k_full, v_full = kv_full.unbind(0)
    return attend_local_queries(q_local, k_full, v_full, mask, scale, cp_size, cp_rank,
                                backend=backend, block_size=block_size)
