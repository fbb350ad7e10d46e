"""A SegmentBatch cut for context parallelism: local tokens, global mask.

Legend: ``b`` rows, ``S`` the padded global length (a multiple of 2 cp), ``s = S / cp`` the
tokens of one CP rank.

`split_batch_for_cp` gives CP rank r the tokens at `cp_positions(S, cp, r)` (chunks r and
2cp-1-r, the layout Megatron's RotaryEmbedding slices its table with) of every per-token
tensor, and keeps the attention mask GLOBAL ([b, S]): SegmentCoreAttention evaluates it at the
rank's global positions against the all-gathered keys. Everything derived per token from
neighbours (labels, loss mask) is computed on the unsplit batch first, so a document that
straddles a chunk border keeps its targets.

Per-document things stay global too: doc ids are not renumbered, so `sample_index_for_cp`
numbers the samples of the micro-batch from the global mask's doc ids, identically on every CP
rank, whatever tokens a rank holds (a rank holding no token of a sample still knows it).
"""

from __future__ import annotations

import torch

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.fastweights.linear import sample_index_from_doc_ids
from megatron_focusft.parallel.context_parallel import (
    cp_padded_length, cp_positions, pad_mask_for_cp, pad_packed_for_cp, split_for_cp,
)

_PER_TOKEN = ("tokens", "labels", "loss_mask", "response", "doc_ids", "position_ids")


def split_batch_for_cp(batch: SegmentBatch, cp_size: int, cp_rank: int, *, chunk_multiple: int = 1) -> SegmentBatch:
    """CP rank cp_rank's part of an unsplit batch [b, s0]: per-token tensors [b, S / cp], mask [b, S].

    The batch is first padded at the end of every row to S, the smallest multiple of
    2 * cp * chunk_multiple >= s0 (doc id -1, loss weight 0, token / label / response 0,
    position ids continuing s0..S-1); padding sees nothing and is seen by nothing, so the real
    tokens' outputs are those of the unpadded batch. The flex backend needs every chunk to be
    whole tiles: chunk_multiple = its block size (128). cp_size = 1 returns the batch unchanged.
    """
    if chunk_multiple < 1:
        raise ValueError(f"chunk_multiple must be >= 1, got {chunk_multiple}")
    if cp_size == 1:
        if cp_rank != 0:
            raise ValueError(f"cp_rank must be 0 with cp_size = 1, got {cp_rank}")
        return batch
    seq_len = batch.tokens.shape[1]
    if tuple(batch.attention.shape) != tuple(batch.tokens.shape):
        raise ValueError(f"the batch's mask is {tuple(batch.attention.shape)} for tokens "
                         f"{tuple(batch.tokens.shape)}: it is already split (split an unsplit batch once)")
    # The padding helpers pad to a multiple of 2 * (their cp argument).
    pad_unit = cp_size * chunk_multiple
    padded = pad_packed_for_cp({name: getattr(batch, name) for name in _PER_TOKEN}, pad_unit)
    full_len = cp_padded_length(seq_len, pad_unit)
    padded["position_ids"][:, seq_len:] = torch.arange(seq_len, full_len, device=batch.position_ids.device)
    local = {name: split_for_cp(tensor, cp_size, cp_rank) for name, tensor in padded.items()}
    return SegmentBatch(**local, attention=pad_mask_for_cp(batch.attention, pad_unit))


def local_positions(batch: SegmentBatch, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions of the batch's tokens, LongTensor [s]: arange for an unsplit batch.

    Raises unless the batch is split for exactly this CP layout (tokens [b, S / cp], mask [b, S]).
    """
    local_len, full_len = batch.tokens.shape[1], batch.attention.shape[1]
    if local_len * cp_size != full_len:
        hint = "split it with split_batch_for_cp" if local_len == full_len else "it was split for another CP size"
        raise ValueError(f"batch of {local_len} tokens per row with a [b, {full_len}] mask does not fit "
                         f"context_parallel_size = {cp_size}: {hint}")
    if cp_size == 1:
        return torch.arange(local_len, device=batch.tokens.device)
    return cp_positions(full_len, cp_size, cp_rank, batch.tokens.device)


def sample_index_for_cp(batch: SegmentBatch, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, int]:
    """(sample index of the local tokens [b, s], number of samples n of the whole micro-batch).

    Numbered as `sample_index_from_doc_ids` numbers the unsplit batch, from the global mask's
    doc ids: the same numbers and the same n on every CP rank.
    """
    positions = local_positions(batch, cp_size, cp_rank)
    global_index = sample_index_from_doc_ids(batch.attention.doc_ids)
    num_samples = int(global_index.max()) + 1 if global_index.numel() else 0
    if cp_size == 1:
        return global_index, num_samples
    return global_index.index_select(1, positions), num_samples


def next_in_document(batch: SegmentBatch, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[b, s] bool: the token's global successor is in the same document (from the global doc ids)."""
    doc = batch.attention.doc_ids
    following = torch.zeros_like(doc, dtype=torch.bool)
    following[:, :-1] = (doc[:, 1:] == doc[:, :-1]) & (doc[:, :-1] >= 0)
    if cp_size == 1:
        return following
    return following.index_select(1, local_positions(batch, cp_size, cp_rank))
