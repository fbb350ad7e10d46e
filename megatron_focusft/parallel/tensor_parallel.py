"""Reassembling tensor-parallel shards into the unsharded (TP = 1) layout."""

from __future__ import annotations

import torch


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Full tensor from per-rank shards of a Megatron parallel parameter.

    Megatron splits the master tensor into world_size * stride chunks along `dim` and gives rank r
    chunks r, r + world_size, ... (stride 2 for a fused [gate; up] fc1). Inverse of that.
    """
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][j] for j in range(stride) for rank in range(len(shards))], dim=dim)
