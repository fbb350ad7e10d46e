"""A SegmentBatch cut for context parallelism: local tokens, global mask.

Legend: ``b`` rows, ``S`` the padded global length (a multiple of 2 cp), ``s = S / cp`` the
tokens of one CP rank.

`split_batch_for_cp` gives CP rank r the tokens at `cp_positions(S, cp, r)` (chunks r and
2cp-1-r, the layout Megatron's RotaryEmbedding slices its table with) of every per-token
tensor, and keeps the attention mask GLOBAL ([b, S]): SegmentCoreAttention evaluates it at the
rank's global positions against the all-gathered keys. Everything derived per token from
neighbours (labels, loss mask) is computed on the unsplit batch first, so a document that
straddles a chunk border keeps its targets.

Per-document facts stay global too: the sample index is numbered on the unsplit batch (doc ids
are not renumbered), and `num_samples` counts the whole micro-batch, identically on every CP
rank, whatever tokens a rank holds (a rank holding no token of a sample still knows it).
"""

from __future__ import annotations

import torch

from megatron_focusft.data.batch import SegmentBatch, next_in_same_document, sample_index_from_doc_ids
from megatron_focusft.parallel.cp_layout import (
    cp_padded_length,
    cp_positions,
    pad_mask_for_cp,
    pad_packed_for_cp,
    split_for_cp,
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
    padded["sample_index"] = sample_index_from_doc_ids(padded["doc_ids"])
    padded["next_in_document"] = next_in_same_document(padded["doc_ids"])
    local = {name: split_for_cp(tensor, cp_size, cp_rank) for name, tensor in padded.items()}
    return SegmentBatch(**local, attention=pad_mask_for_cp(batch.attention, pad_unit), num_samples=batch.num_samples,
                        global_positions=cp_positions(full_len, cp_size, cp_rank, batch.tokens.device))
