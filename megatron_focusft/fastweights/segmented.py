"""Segmented multi-adapter (multi-LoRA) matmul: every token uses the adapter of its own sample.

Legend: T tokens, T' the tokens that belong to a sample (padding dropped), n samples, r adapter
rank, `in` / `out` feature sizes.

Tokens are grouped by sample once per step (`TokenGroups`, one argsort and one host sync) and
the grouping is shared by every adapted linear of the step. Each linear then gathers its T'
input rows once, runs one small matmul per sample on a contiguous slice, and adds the result
back with one index_add. No per-token weight gather ([T, r, in]) is ever formed. A GPU grouped
GEMM can replace the per-sample loop behind the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TokenGroups:
    """The tokens of a step grouped by sample.

    order       [T'] long: positions of the tokens that belong to a sample, sorted by sample
                (stable, so each sample keeps its token order).
    counts      tokens per sample (length n): `order.split(counts)` are the samples' tokens.
    num_tokens  T, tokens of no sample included.
    """

    order: torch.Tensor
    counts: tuple[int, ...]
    num_tokens: int

    @property
    def num_samples(self) -> int:
        return len(self.counts)

    @classmethod
    def from_sample_index(cls, sample_of_token: torch.Tensor, num_samples: int) -> TokenGroups:
        """Groups from sample_of_token [T] (long, -1 = no sample) for n = num_samples samples."""
        if sample_of_token.dim() != 1 or sample_of_token.dtype != torch.long:
            raise ValueError(f"sample_of_token must be a 1-D long tensor, got {sample_of_token.dtype} "
                             f"of shape {tuple(sample_of_token.shape)}")
        if sample_of_token.numel() and (int(sample_of_token.min()) < -1 or int(sample_of_token.max()) >= num_samples):
            raise ValueError(f"sample indices must lie in [-1, {num_samples}); got "
                             f"[{int(sample_of_token.min())}, {int(sample_of_token.max())}]")
        active = sample_of_token >= 0
        # Tokens of no sample get the key n, so the stable sort puts them after every sample.
        keys = sample_of_token.masked_fill(~active, num_samples)
        order = torch.argsort(keys, stable=True)
        counts = torch.bincount(sample_of_token[active], minlength=num_samples).tolist()
        return cls(order=order[: sum(counts)], counts=tuple(counts), num_tokens=sample_of_token.numel())


def segmented_matmul(rows: torch.Tensor, groups: TokenGroups, weight: torch.Tensor) -> torch.Tensor:
    """rows [T', in] in `groups.order`, weight [n, out, in] -> [T', out]: sample s's rows times weight[s]^T."""
    if weight.dim() != 3 or weight.shape[0] != groups.num_samples or weight.shape[2] != rows.shape[1]:
        raise ValueError(f"weight must be [n={groups.num_samples}, out, in={rows.shape[1]}], "
                         f"got {tuple(weight.shape)}")
    if rows.shape[0] != len(groups.order):
        raise ValueError(f"rows hold {rows.shape[0]} tokens, the groups {len(groups.order)}")
    if groups.num_samples == 0:
        return rows.new_zeros((0, weight.shape[1]))
    pieces = rows.split(groups.counts)
    return torch.cat([piece @ w.t() for piece, w in zip(pieces, weight.unbind(0))])


def add_segmented_lora(
    base: torch.Tensor, x: torch.Tensor, groups: TokenGroups, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """base [T, out] + scale * x A_s^T B_s^T for every token of sample s; tokens of no sample keep base.

    x [T, in], A [n, r, in], B [n, out, r]; differentiable w.r.t. base, x, A and B.
    """
    if x.shape[0] != groups.num_tokens or base.shape[0] != groups.num_tokens:
        raise ValueError(f"x has {x.shape[0]} and base {base.shape[0]} tokens, the groups {groups.num_tokens}")
    rows = x.index_select(0, groups.order)
    h = segmented_matmul(rows, groups, A)
    y = segmented_matmul(h, groups, B)
    return base.index_add(0, groups.order, y, alpha=scale)
