"""Plain SFT: the forward step for Megatron's schedules, and one optimizer step."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.focusft.split_model import forward_layers, lm_head_loss, stage_input
from megatron_focusft.training.loss import masked_token_loss


def sft_forward_step(data_iterator: Iterator[SegmentBatch], model: torch.nn.Module):
    """Megatron forward_step_func: per-token CE on response tokens under the batch's mask.

    GPTModel.forward, except under full activation recomputation: Megatron's checkpoint saves
    every argument with save_for_backward, which cannot hold a SegmentMask, so the layers then
    run through focusft/split_model, which checkpoints them itself (the same computation, tested
    bit for bit against GPTModel.forward).
    """
    batch = next(data_iterator)
    gpt = model.module if hasattr(model, "module") else model
    if gpt.config.recompute_granularity != "full":
        per_token_loss = model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
    else:
        hidden, rotary = stage_input(gpt, batch.tokens, batch.position_ids)
        hidden = forward_layers(gpt, hidden, batch.attention, rotary, range(len(gpt.decoder.layers)))
        per_token_loss = lm_head_loss(gpt, hidden, batch.labels) if gpt.post_process else hidden
    return per_token_loss, functools.partial(masked_token_loss, loss_mask=batch.loss_mask)


def train_step(
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    micro_batches: list[SegmentBatch],
    forward_step=sft_forward_step,
) -> dict[str, float]:
    """One optimizer step over `micro_batches`: token-mean loss, token count, grad norm, and the mean
    of every other [sum, count] log of the forward step (e.g. inner_loss_before for FocuSFT).

    Under pipeline parallelism the losses exist on the last stage; every stage returns them.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    # A forward step may need the whole list first (FocuSFT with adapted layers on several stages).
    prepare = getattr(forward_step, "prepare", None)
    if prepare is not None:
        prepare(model, micro_batches)
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
    stats = _summarise(logs, float(grad_norm)) if parallel_state.is_pipeline_last_stage() else None
    return _from_last_stage(stats)


def _summarise(logs: list[dict[str, torch.Tensor]], grad_norm: float) -> dict[str, float]:
    totals = {key: torch.stack([log[key] for log in logs]).sum(dim=0) for key in logs[0]}
    lm = totals.pop("lm loss")
    stats = {"loss": float(lm[0] / lm[1].clamp(min=1)), "num_tokens": int(lm[1]), "grad_norm": grad_norm}
    # Other logs (e.g. the FocuSFT inner loop's) are [sum, count] pairs too: report their means.
    stats.update({key.replace(" ", "_"): float(v[0] / v[1].clamp(min=1)) for key, v in totals.items()})
    return stats


def _from_last_stage(stats: dict[str, float] | None) -> dict[str, float]:
    """The last pipeline stage's stats on every stage of its pipeline."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return stats
    box = [stats]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]
