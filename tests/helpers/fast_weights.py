"""Test-side helpers for fast weights: validation, sample selection, unsharding, a one-call LoRA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_focusft.fastweights.linear import SHARD_DIMS, FastWeightKey, FastWeights, FastWeightShape, TensorPair
from megatron_focusft.fastweights.segmented import TokenGroups, add_segmented_lora
from megatron_focusft.parallel.tensor_parallel import unshard


def check_fast_weights(
    layout: Sequence[FastWeightShape], weights: Mapping[FastWeightKey, TensorPair], rank: int
) -> None:
    """Raises unless `weights` (e.g. supplied by the caller) are unsharded fast weights for `layout`."""
    expected = {shape.key: shape for shape in layout}
    if set(weights) != set(expected):
        raise KeyError(f"fast weights for {sorted(weights)}, expected {sorted(expected)}")
    sizes = set()
    for key, (A, B) in weights.items():
        shape = expected[key]
        n = A.shape[0]
        sizes.add(n)
        if tuple(A.shape) != (n, rank, shape.in_features) or tuple(B.shape) != (n, shape.out_features, rank):
            raise ValueError(f"fast weights of {key}: expected A [n, {rank}, {shape.in_features}] and B "
                             f"[n, {shape.out_features}, {rank}], got {tuple(A.shape)} and {tuple(B.shape)}")
    if len(sizes) > 1:
        raise ValueError(f"fast weights hold different numbers of samples: {sorted(sizes)}")


def select_samples(weights: Mapping[FastWeightKey, TensorPair], samples: Sequence[int]) -> FastWeights:
    """The fast weights of some samples, renumbered 0..len(samples)-1 in the given order."""
    index = torch.tensor(list(samples), dtype=torch.long)
    return {key: (A.index_select(0, index.to(A.device)), B.index_select(0, index.to(B.device)))
            for key, (A, B) in weights.items()}


def unshard_fast_weights(per_rank: Sequence[Mapping[FastWeightKey, TensorPair]]) -> FastWeights:
    """Unsharded tensors (e.g. gradients) from every rank's local ones, rank order.

    Replicated tensors are taken from rank 0 (with the gradient convention above they are the
    same on every rank).
    """
    full: FastWeights = {}
    for key in per_rank[0]:
        pair = []
        for i, dim in enumerate(SHARD_DIMS[key[1]]):
            shards = [rank_weights[key][i] for rank_weights in per_rank]
            pair.append(shards[0] if dim is None else unshard(shards, dim))
        full[key] = (pair[0], pair[1])
    return full


def segmented_lora(
    x: torch.Tensor, sample_of_token: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """The adapter term alone: [T, out], row t = scale * x[t] A_s^T B_s^T with s = sample_of_token[t], 0 where s = -1.

    x [T, in], sample_of_token [T] long, A [n, r, in], B [n, out, r].
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"A must be [n, r, in] and B [n, out, r]; got {tuple(A.shape)} and {tuple(B.shape)}")
    groups = TokenGroups.from_sample_index(sample_of_token, A.shape[0])
    return add_segmented_lora(x.new_zeros((x.shape[0], B.shape[1])), x, groups, A, B, scale)
