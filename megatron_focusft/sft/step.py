"""Plain SFT: per-token cross-entropy on response tokens under the batch's mask."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.engine.loss import masked_token_loss
from megatron_focusft.engine.split_model import forward_layers, lm_head_loss, stage_input
from megatron_focusft.engine.train_step import ForwardStep


class SftForwardStep(ForwardStep):
    """Megatron forward_step_func: per-token CE on response tokens under the batch's mask.

    GPTModel.forward, except under full activation recomputation: Megatron's checkpoint saves
    every argument with save_for_backward, which cannot hold a SegmentMask, so the layers then
    run through engine/split_model, which checkpoints them itself (the same computation, tested
    bit for bit against GPTModel.forward).
    """

    def __call__(self, data_iterator: Iterator[SegmentBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        gpt = model.module if hasattr(model, "module") else model
        if gpt.config.recompute_granularity != "full":
            per_token_loss = model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
        else:
            hidden, rotary = stage_input(gpt, batch.tokens, batch.position_ids)
            hidden = forward_layers(gpt, hidden, batch.attention, rotary, range(len(gpt.decoder.layers)))
            per_token_loss = lm_head_loss(gpt, hidden, batch.labels) if gpt.post_process else hidden
        return per_token_loss, functools.partial(masked_token_loss, loss_mask=batch.loss_mask)


sft_forward_step = SftForwardStep()
