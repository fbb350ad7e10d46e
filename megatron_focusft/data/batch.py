"""One micro-batch of packed samples, with everything a step needs to compute its loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_focusft.masks import MaskKind, SegmentMask, segment_mask


@dataclass(frozen=True, eq=False)
class SegmentBatch:
    """Packed micro-batch; every tensor is [b, s].

    tokens       input token ids (padding positions hold any valid id).
    labels       the next token of the same document (0 where there is none).
    loss_mask    float, 1 where labels[t] is a response token to score, else 0.
    response     long {0, 1}, 1 on response tokens themselves (the FocuSFT blocks follow it).
    doc_ids      sample index in the pack, -1 = padding.
    position_ids 0.. per row (RoPE attention is relative, so packing needs no restart).
    attention    the SegmentMask of the step.

    Facts computed once, where the batch is made or split for CP (data/cp_split.py), read by
    every step: under CP the per-token tensors are this rank's [b, S / cp] while `attention`,
    `num_samples` and the numbering stay those of the whole micro-batch [b, S].
    sample_index      [b, s] long: the micro-batch-wide sample of each token (-1 = padding;
                      row i's documents are numbered after those of rows 0..i-1).
    num_samples       samples in the whole micro-batch (the same on every CP rank).
    next_in_document  [b, s] bool: the token's global successor is in the same document.
    global_positions  [s] long: the tokens' positions in the unsplit row (arange when unsplit).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    response: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: SegmentMask
    sample_index: torch.Tensor
    num_samples: int
    next_in_document: torch.Tensor
    global_positions: torch.Tensor

    def to(self, device: torch.device | str) -> SegmentBatch:
        """The same batch with every tensor on `device`."""
        return SegmentBatch(**{field.name: _to(getattr(self, field.name), device) for field in dataclasses.fields(self)})


def _to(value, device: torch.device | str):
    return value if isinstance(value, int) else value.to(device)


def next_in_same_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] bool from doc ids [b, s]: position t's successor t+1 is in t's document (not padding)."""
    following = torch.zeros_like(doc_ids, dtype=torch.bool)
    following[:, :-1] = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, :-1] >= 0)
    return following


def count_samples(sample_index: torch.Tensor) -> int:
    return int(sample_index.max()) + 1 if sample_index.numel() and bool((sample_index >= 0).any()) else 0


def sample_index_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Micro-batch-wide sample index [b, s] from per-row document ids [b, s] (-1 stays -1).

    Row i's documents are numbered after those of rows 0..i-1 (each row counts max + 1).
    """
    per_row = (doc_ids.max(dim=1).values + 1).clamp(min=0)
    offsets = torch.cumsum(per_row, 0) - per_row
    return torch.where(doc_ids >= 0, doc_ids + offsets[:, None], doc_ids)


def make_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    response: torch.Tensor,
    *,
    mask_kind: MaskKind = "focusft",
    block_ids: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
) -> SegmentBatch:
    """Labels, loss mask and attention mask for packed tokens [b, s].

    The logit at t is scored on token t+1 when t+1 is a response token of the same document.
    mask_kind "block" takes block_ids [b, s] and optionally sink_mask [b, s] (block sink slots,
    private to their block: `attention.private`).
    """
    if tokens.shape != doc_ids.shape or tokens.shape != response.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, doc_ids {tuple(doc_ids.shape)} and response "
                         f"{tuple(response.shape)} must have the same [b, s] shape")
    kwargs: dict = {"doc_ids": doc_ids}
    if mask_kind == "focusft":
        kwargs["loss_mask"] = response
    elif mask_kind == "block":
        kwargs.update(block_ids=block_ids, sink_mask=sink_mask)
    attention = segment_mask(mask_kind, **kwargs)
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    next_in_same_doc = next_in_same_document(doc_ids)
    next_is_response = torch.zeros_like(next_in_same_doc)
    next_is_response[:, :-1] = response[:, 1:].bool()
    loss_mask = (next_in_same_doc & next_is_response).float()
    labels = labels.masked_fill(~next_in_same_doc, 0)
    s = tokens.shape[1]
    positions = torch.arange(s, device=tokens.device)
    position_ids = positions.expand_as(tokens).contiguous()
    sample_index = sample_index_from_doc_ids(doc_ids)
    return SegmentBatch(tokens, labels, loss_mask, response.long(), doc_ids, position_ids, attention,
                        sample_index=sample_index, num_samples=count_samples(sample_index),
                        next_in_document=next_in_same_doc, global_positions=positions)
