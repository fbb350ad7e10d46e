"""Plain SFT: the forward step for Megatron's schedules, and one optimizer step."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.training.loss import masked_token_loss


def sft_forward_step(data_iterator: Iterator[SegmentBatch], model: torch.nn.Module):
    """Megatron forward_step_func: per-token CE on response tokens under the batch's mask."""
    batch = next(data_iterator)
    per_token_loss = model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
    return per_token_loss, functools.partial(masked_token_loss, loss_mask=batch.loss_mask)


def train_step(
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    micro_batches: list[SegmentBatch],
    forward_step=sft_forward_step,
) -> dict[str, float]:
    """One optimizer step over `micro_batches`: token-mean loss, token count, grad norm, and the mean
    of every other [sum, count] log of the forward step (e.g. inner_loss_before for FocuSFT)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    # Under context parallelism tokens are this rank's share; Megatron's schedules take the global length.
    b, s = micro_batches[0].tokens.shape[0], micro_batches[0].attention.shape[1]
    logs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    _, grad_norm, _ = optimizer.step()
    totals = {key: torch.stack([log[key] for log in logs]).sum(dim=0) for key in logs[0]}
    lm = totals.pop("lm loss")
    stats = {"loss": float(lm[0] / lm[1].clamp(min=1)), "num_tokens": int(lm[1]), "grad_norm": float(grad_norm)}
    # Other logs (e.g. the FocuSFT inner loop's) are [sum, count] pairs too: report their means.
    stats.update({key.replace(" ", "_"): float(v[0] / v[1].clamp(min=1)) for key, v in totals.items()})
    return stats
