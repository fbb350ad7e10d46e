"""One micro-batch of packed samples, with everything a step needs to compute its loss."""

from __future__ import annotations

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
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    response: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: SegmentMask

    @property
    def num_samples(self) -> int:
        return int(self.doc_ids.max()) + 1 if (self.doc_ids >= 0).any() else 0


def make_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    response: torch.Tensor,
    *,
    mask_kind: MaskKind = "focusft",
    block_ids: torch.Tensor | None = None,
) -> SegmentBatch:
    """Labels, loss mask and attention mask for packed tokens [b, s].

    The logit at t is scored on token t+1 when t+1 is a response token of the same document.
    """
    if tokens.shape != doc_ids.shape or tokens.shape != response.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, doc_ids {tuple(doc_ids.shape)} and response "
                         f"{tuple(response.shape)} must have the same [b, s] shape")
    kwargs: dict = {"doc_ids": doc_ids}
    if mask_kind == "focusft":
        kwargs["loss_mask"] = response
    elif mask_kind == "block":
        kwargs["block_ids"] = block_ids
    attention = segment_mask(mask_kind, **kwargs)
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    next_in_same_doc = torch.zeros_like(doc_ids, dtype=torch.bool)
    next_in_same_doc[:, :-1] = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, :-1] >= 0)
    next_is_response = torch.zeros_like(next_in_same_doc)
    next_is_response[:, :-1] = response[:, 1:].bool()
    loss_mask = (next_in_same_doc & next_is_response).float()
    labels = labels.masked_fill(~next_in_same_doc, 0)
    s = tokens.shape[1]
    position_ids = torch.arange(s, device=tokens.device).expand_as(tokens).contiguous()
    return SegmentBatch(tokens, labels, loss_mask, response.long(), doc_ids, position_ids, attention)
