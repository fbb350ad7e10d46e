"""One optimizer step of any training method: Megatron's schedule over the micro-batches with the
method's forward step, then the optimizer; the stats come back on every pipeline stage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.parallel.context import ParallelContext


class ForwardStep:
    """A training method's Megatron `forward_step_func`, with one hook for train_step.

    `__call__(data_iterator, model)` -> (output, loss_func), as Megatron's schedules expect.
    `prepare(model, micro_batches)` runs once per optimizer step before the schedule, with every
    micro-batch of the step (FocuSFT's sequential pipeline schedule with adapted layers on several
    stages runs its inner loop there); the default does nothing. `forward_backward_func(model)` is
    the schedule (FocuSFT under PP: its interleaved one). `after_schedule(model)` runs after each
    schedule call; True asks for the call once more, from zeroed gradients (FocuSFT's guard under
    the sequential schedule); the default is False.
    """

    def prepare(self, model: torch.nn.Module, micro_batches: list[SegmentBatch]) -> None:
        return None

    def after_schedule(self, model: torch.nn.Module) -> bool:
        return False

    def forward_backward_func(self, model: torch.nn.Module) -> Callable[..., list]:
        """The schedule train_step runs this step with (the signature of Megatron's
        `get_forward_backward_func()` result); the default is Megatron's own."""
        return get_forward_backward_func()

    def __call__(self, data_iterator: Iterator[SegmentBatch], model: torch.nn.Module) -> tuple[Any, Any]:
        raise NotImplementedError


def train_step(
    model: DistributedDataParallel | list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    micro_batches: list[SegmentBatch],
    forward_step: ForwardStep,
) -> dict[str, float]:
    """One optimizer step over `micro_batches`: token-mean loss, token count, grad norm, and the mean
    of every other [sum, count] log of the forward step (e.g. inner_loss_before for FocuSFT).

    model: this rank's model, or its model chunks in order (virtual pipeline stages). Under
    pipeline parallelism the losses exist on the last stage; every stage returns them.
    """
    chunks = model if isinstance(model, list) else [model]
    optimizer.zero_grad()
    logs = forward_backward(chunks, micro_batches, forward_step)
    _, grad_norm, _ = optimizer.step()
    last_stage = chunks[-1].module.post_process
    stats = _summarise(logs, float(grad_norm)) if last_stage else None
    return _from_last_stage(stats, ParallelContext.of(chunks[0]))


def forward_backward(chunks: list[DistributedDataParallel], micro_batches: list[SegmentBatch],
                     forward_step: ForwardStep) -> list[dict[str, torch.Tensor]]:
    """The gradients of one optimizer step in the chunks' grad buffers (zeroed first) -> the
    schedule's logs (the last stage's; [] elsewhere): prepare, then the schedule, run again for as
    long as the forward step's after_schedule asks."""
    model = chunks[0]
    forward_step.prepare(model, micro_batches)
    # Under context parallelism tokens are this rank's share; Megatron's schedules take the global length.
    b, s = micro_batches[0].tokens.shape[0], micro_batches[0].attention.shape[1]
    while True:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        logs = forward_step.forward_backward_func(model)(
            forward_step_func=forward_step,
            data_iterator=chunk_data_iterators(micro_batches, len(chunks)),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=False,
        )
        if not forward_step.after_schedule(model):
            return logs


def chunk_data_iterators(micro_batches: list[SegmentBatch], num_chunks: int) -> Iterator | list[Iterator]:
    """A schedule's data_iterator: with model chunks Megatron's schedules take one iterator per
    chunk, each over every micro-batch; one iterator otherwise."""
    return [iter(micro_batches) for _ in range(num_chunks)] if num_chunks > 1 else iter(micro_batches)


def _summarise(logs: list[dict[str, torch.Tensor]], grad_norm: float) -> dict[str, float]:
    totals = {key: torch.stack([log[key] for log in logs]).sum(dim=0) for key in logs[0]}
    lm = totals.pop("lm loss")
    stats = {"loss": float(lm[0] / lm[1].clamp(min=1)), "num_tokens": int(lm[1]), "grad_norm": grad_norm}
    # Other logs (e.g. the FocuSFT inner loop's) are [sum, count] pairs too: report their means.
    stats.update({key.replace(" ", "_"): float(v[0] / v[1].clamp(min=1)) for key, v in totals.items()})
    return stats


def _from_last_stage(stats: dict[str, float] | None, parallel: ParallelContext) -> dict[str, float]:
    """The last pipeline stage's stats on every stage of its pipeline."""
    if parallel.pp.size() == 1:
        return stats
    box = [stats]
    dist.broadcast_object_list(box, src=dist.get_global_rank(parallel.pp, parallel.pp.size() - 1), group=parallel.pp)
    return box[0]
