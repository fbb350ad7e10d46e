"""GPTModel run in parts, so the layers below the fast weights run once per step.

`forward_layers(model, ..., layers)` runs a contiguous range of decoder layers; `embed` and
`lm_head_loss` are GPTModel's own pre- and post-processing. embed -> all layers -> lm_head_loss
is GPTModel.forward for the configurations we build (no SP or pipeline; CP included), which
tests/focusft/test_step.py checks bit for bit (and tests/parallel/test_cp_model.py under CP).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_focusft.masks import SegmentMask


def embed(model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, position_ids [b, s] -> (hidden [s, b, h], rotary embedding [s, 1, 1, d]).

    Under context parallelism s is this rank's share of S = s * cp tokens: the table is asked
    for S rows (the length GPTModel computes, by the same method) and RotaryEmbedding keeps this
    rank's rows, chunks r and 2cp-1-r, so every token is rotated by its global position.
    """
    hidden = model.embedding(input_ids=tokens, position_ids=position_ids)
    rotary_len = model.rotary_pos_emb.get_rotary_seq_len(None, model.decoder, hidden, model.config)
    rotary = model.rotary_pos_emb(rotary_len)
    return hidden, rotary


def forward_layers(
    model: GPTModel, hidden: torch.Tensor, mask: SegmentMask, rotary: torch.Tensor, layers: range
) -> torch.Tensor:
    """Decoder layers with 0-based indices `layers` (into this model's layer list), [s, b, h] -> [s, b, h]."""
    for index in layers:
        hidden, _ = model.decoder.layers[index](hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
    return hidden


def lm_head_loss(
    model: GPTModel, hidden: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """Final norm, output layer and vocab-parallel CE: hidden [s, b, h], labels [b, s] -> loss [b, s] fp32.

    With `scored` [b, s] bool, only those positions go through the head (the vocabulary
    projection dominates the head's cost); the loss elsewhere is 0. Every op is row-wise, so the
    scored entries equal the full computation's.
    """
    if scored is None or not bool(scored.any()):
        logits, _ = model.output_layer(model.decoder.final_layernorm(hidden))
        loss = model.compute_language_model_loss(labels, logits)
        return loss if scored is None else loss * 0.0
    scored_sb = scored.t()
    picked = model.decoder.final_layernorm(hidden[scored_sb].unsqueeze(1))  # [T, 1, h]
    logits, _ = model.output_layer(picked)
    picked_loss = model.compute_language_model_loss(labels.t()[scored_sb].unsqueeze(0), logits)  # [1, T]
    loss_sb = torch.zeros(scored_sb.shape, dtype=picked_loss.dtype, device=picked_loss.device)
    return loss_sb.masked_scatter(scored_sb, picked_loss.squeeze(0)).t()
