"""FlexAttention BlockMask for a SegmentMask, built from the per-row key intervals.

Legend: ``b`` batch rows, ``s`` tokens, ``B`` tile (sparse block) size, ``nt = ceil(s / B)``
tiles per axis; query tile ``i`` holds rows ``[i*B, (i+1)*B)``, key tile ``j`` keys
``[j*B, (j+1)*B)``, both cut at ``s``.

The tile classification is exact from the intervals, in O(b * (s + nt^2)) time and memory: no
[s, s] tensor is ever formed, so it scales to 128K tokens (nt^2 is the BlockMask's own size).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from megatron_focusft.masks.layout import SegmentMask

# mask_mod(b, h, q_idx, kv_idx) -> visible, FlexAttention's mask signature.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile: the one tile size every flex path uses


def flex_block_mask(mask: SegmentMask, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The BlockMask of `mask` for sequences of length s, B = block_size; cached per mask.

    Shape [b, 1, nt, nt] (one head row: every head shares the mask). Empty tiles are skipped,
    full tiles skip the mask_mod, partial tiles evaluate it per element.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return mask.derived(("flex", block_size), lambda m: _build_block_mask(m, block_size))


def segment_mask_mod(mask: SegmentMask) -> MaskMod:
    """Pure ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of `mask`, read from per-token tensors.

    It closes over plain [b, s] tensors and a Python flag only (not the mask object), so
    torch.compile traces it into the kernel without graph breaks.
    """
    kv_start, kv_end = mask.kv_interval
    block_index, private = mask.block_index, mask.private
    has_private_keys = mask.has_private_keys

    def interval_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = (kv_start[b, q_idx] <= kv_idx) & (kv_idx < kv_end[b, q_idx])
        if has_private_keys:
            own_block = block_index[b, kv_idx] == block_index[b, q_idx]
            seen = seen & (own_block | ~private[b, kv_idx])
        return seen

    return interval_mask_mod


def visible_pairs_per_tile(mask: SegmentMask, block_size: int) -> torch.Tensor:
    """Number of (query, key) pairs inside each row's interval, per tile: [b, nt, nt] long.

    Privacy is ignored (an upper bound when the mask has private keys). Exact otherwise.
    """
    kv_start, kv_end = mask.kv_interval
    b, s = mask.shape
    num_tiles = -(-s // block_size)
    # Pairs of query q within keys [0, x): g_q(x) = clamp(min(end_q, x) - start_q, 0), which is
    # (x - start_q)[start_q < x] - (x - end_q)[end_q < x] since start_q <= end_q. The pairs in
    # key tile [x0, x1) are g_q(x1) - g_q(x0); summed over a query tile, each term only needs
    # how many starts (ends) of the tile fall before x and their sum: prefix sums of per-tile
    # histograms bucketed by key tile. Padding rows (start = end = 0) add nothing.
    query_tile = torch.arange(s, device=mask.device) // block_size
    tile_bounds = torch.arange(num_tiles + 1, device=mask.device) * block_size  # x = j*B, j = 0..nt
    pairs_before = torch.zeros(b, num_tiles, num_tiles + 1, dtype=torch.long, device=mask.device)
    for bound, sign in ((kv_start, 1), (kv_end, -1)):
        count_before, sum_before = _tile_prefix_histogram(bound, query_tile, num_tiles, block_size)
        pairs_before += sign * (tile_bounds * count_before - sum_before)
    return pairs_before[:, :, 1:] - pairs_before[:, :, :-1]


def _tile_prefix_histogram(
    bound: torch.Tensor, query_tile: torch.Tensor, num_tiles: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For bound [b, s]: how many rows of query tile i have bound < j*B, and their sum.

    Returns two [b, nt, nt + 1] long tensors indexed (row, i, j), j = 0..nt.
    """
    b = bound.shape[0]
    # bound < j*B  <=>  bound // B < j; bound <= s puts bound // B in [0, nt], one bucket more
    # than there are tiles, dropped by the exclusive prefix sum.
    bucket = query_tile * (num_tiles + 1) + bound // block_size
    count = torch.zeros(b, num_tiles * (num_tiles + 1), dtype=torch.long, device=bound.device)
    total = torch.zeros_like(count)
    count.scatter_add_(1, bucket, torch.ones_like(bound))
    total.scatter_add_(1, bucket, bound)
    count, total = (t.view(b, num_tiles, num_tiles + 1) for t in (count, total))
    return _exclusive_cumsum(count), _exclusive_cumsum(total)


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    """Prefix sums along the last dim, excluding the element itself: out[..., j] = sum(t[..., :j])."""
    return torch.cumsum(t, dim=-1) - t


def tile_classes(mask: SegmentMask, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) BoolTensors [b, nt, nt]; tiles in neither are empty.

    full: every element of the B x B tile is visible. Tiles cut by the sequence end are never
    full (their out-of-range part counts as masked, as in torch's create_block_mask). A key tile
    holding a private key is never full, so its tiles go through the mask_mod: partial may then
    hold tiles whose visible pairs are all hidden by privacy (a superset, never a miss).
    """
    pairs = visible_pairs_per_tile(mask, block_size)
    full = pairs == block_size * block_size
    if mask.has_private_keys:
        b, s = mask.shape
        num_tiles = pairs.shape[-1]
        private = torch.zeros(b, num_tiles * block_size, dtype=torch.bool, device=mask.device)
        private[:, :s] = mask.private
        key_tile_has_private = private.view(b, num_tiles, block_size).any(dim=-1)
        full = full & ~key_tile_has_private[:, None, :]
    partial = (pairs > 0) & ~full
    return partial, full


def ordered_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, nt, nt] bool -> (num_blocks [b, 1, nt], indices [b, 1, nt, nt]), int32, BlockMask's layout.

    indices lists each query tile's selected key tiles first, ascending, then the rest.
    """
    selected = tiles.to(torch.int32)[:, None]
    num_blocks = selected.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(selected, dim=-1, descending=True, stable=True).to(torch.int32)
    return num_blocks.contiguous(), indices.contiguous()


def _build_block_mask(mask: SegmentMask, block_size: int) -> BlockMask:
    s = mask.shape[1]
    partial, full = tile_classes(mask, block_size)
    kv_num_blocks, kv_indices = ordered_tiles(partial)
    full_kv_num_blocks, full_kv_indices = ordered_tiles(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=segment_mask_mod(mask),
        seq_lengths=(s, s),
    )
