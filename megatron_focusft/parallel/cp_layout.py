"""Context-parallel sequence layout: which tokens each CP rank holds, and padding to fit it.

``S`` is the full (padded) sequence length, ``cp`` the CP group size, ``C = S / (2 cp)`` the
chunk length. Megatron's load-balanced convention: the sequence is cut into 2*cp chunks and CP
rank r holds chunks r and 2cp-1-r, in that order; under a causal mask chunk i costs ~i, so
every rank gets the same work, (r) + (2cp-1-r) = 2cp-1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_focusft.masks import SegmentMask

# --- load-balanced chunking ----------------------------------------------------------------


def cp_padded_length(seq_len: int, cp_size: int) -> int:
    """Smallest length >= seq_len that 2*cp_size chunks divide."""
    multiple = 2 * cp_size
    return -(-seq_len // multiple) * multiple


def check_cp_layout(seq_len: int, cp_size: int, cp_rank: int | None = None) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2 * cp = {2 * cp_size}; pad the "
                         f"batch first (pad_packed_for_cp) to {cp_padded_length(seq_len, cp_size)}")


def cp_positions(seq_len: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of CP rank `cp_rank`'s tokens, in local order: LongTensor [S / cp].

    Chunk cp_rank, then chunk 2*cp_size - 1 - cp_rank, each C = S / (2 cp) tokens.
    """
    check_cp_layout(seq_len, cp_size, cp_rank)
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk, device=device)])


def rank_major_positions(seq_len: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global position of each row of the ranks' local parts concatenated in rank order: [S]."""
    return torch.cat([cp_positions(seq_len, cp_size, rank, device) for rank in range(cp_size)])


def split_for_cp(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """Rank cp_rank's part of a full-sequence tensor: [b, S, ...] -> [b, S / cp, ...] (along seq_dim)."""
    positions = cp_positions(x.shape[seq_dim], cp_size, cp_rank, x.device)
    return x.index_select(seq_dim, positions)


def merge_cp_parts(parts: Sequence[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of split_for_cp over all ranks: parts[r] is rank r's [b, S / cp, ...] -> [b, S, ...]."""
    cp_size = len(parts)
    if cp_size == 0:
        raise ValueError("merge_cp_parts needs one part per CP rank, got none")
    rank_major = torch.cat(list(parts), dim=seq_dim)
    order = torch.argsort(rank_major_positions(rank_major.shape[seq_dim], cp_size, rank_major.device))
    return rank_major.index_select(seq_dim, order)


def pad_packed_for_cp(
    batch: Mapping[str, torch.Tensor],
    cp_size: int,
    *,
    doc_ids_key: str = "doc_ids",
    fill: Mapping[str, int | float] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad every per-token tensor [b, s, ...] of a packed batch along dim 1 to a multiple of 2*cp.

    The new tokens go at the END of each row with doc id -1 (`doc_ids_key`); every other tensor
    is filled with 0 unless `fill` names a value (e.g. {"labels": -100} for an ignore index).
    Invariant: padding belongs to no document, so it sees no key and no query sees it, and its
    loss weight is 0 (loss masks are filled with 0): the outputs, loss and gradients of the real
    tokens are exactly those of the unpadded batch. Real tokens keep their positions (nothing is
    inserted before them), so position ids and RoPE are unchanged. A row may end with more than
    a chunk of padding, which can leave a CP rank with padding only: cp_attention returns zeros
    there (no NaN), and the loss must count tokens, not average per rank (see cp_attention).
    """
    if doc_ids_key not in batch:
        raise ValueError(f"the batch has no {doc_ids_key!r} tensor (doc ids, -1 = padding)")
    fill = dict(fill or {})
    unknown = fill.keys() - batch.keys()
    if unknown:
        raise ValueError(f"fill names tensors not in the batch: {sorted(unknown)}")
    if doc_ids_key in fill and fill[doc_ids_key] != -1:
        raise ValueError(f"padding must have doc id -1, not {fill[doc_ids_key]}")
    fill[doc_ids_key] = -1
    seq_len = batch[doc_ids_key].shape[1]
    extra = cp_padded_length(seq_len, cp_size) - seq_len
    padded = {}
    for name, tensor in batch.items():
        if tensor.dim() < 2 or tensor.shape[1] != seq_len:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; per-token tensors are [b, {seq_len}, ...]")
        tail = tensor.new_full((tensor.shape[0], extra, *tensor.shape[2:]), fill.get(name, 0))
        padded[name] = torch.cat([tensor, tail], dim=1)
    return padded


def pad_mask_for_cp(mask: SegmentMask, cp_size: int) -> SegmentMask:
    """`mask` with padding appended to a multiple of 2*cp (same invariant as pad_packed_for_cp).

    Equal, field by field, to the segment_mask of the padded inputs.
    """
    b, seq_len = mask.shape
    extra = cp_padded_length(seq_len, cp_size) - seq_len

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        return torch.cat([t, t.new_full((b, extra), value)], dim=1)

    return SegmentMask(doc_ids=pad(mask.doc_ids, -1), block_index=pad(mask.block_index, -1),
                       causal=pad(mask.causal, False), sees_prefix=pad(mask.sees_prefix, False),
                       private=pad(mask.private, False))
