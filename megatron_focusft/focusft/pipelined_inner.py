"""The inner loop when the adapted layers span several pipeline stages.

A micro-batch's inner loop must end before its outer forward reaches the first adapted layer, and
every inner step is a forward and a backward through all adapted layers. With the adapted layers
on stages k..P-1 it therefore cannot run inside one stage's forward, as it does when they all sit
on the last stage (step.py). Here each inner step is one call of Megatron's schedule over all
micro-batches of the iteration (1F1B across them), before the outer call:

- stages below the adapted layers, and the layers of stage k below them, compute their output
  once (in the first call, without grad, under the inner objective's mask) and send that cached
  tensor in every call; its gradient to their input is zero (`_Relay`), so they do no backward
  work and the inner backward effectively crosses only the adapted stages;
- the adapted layers run with the slow weights frozen and the micro-batch's fast weights as
  leaves; the last stage scores the objective's targets and returns the sum of per-sample
  token-mean losses, and the schedule's backward leaves each stage's fast-weight gradients;
- after each call, every rank agrees on the samples whose loss or gradients are not finite (MAX
  all-reduce over TP, CP and PP) and takes the guarded per-sample SGD step of its fast weights
  (inner_loop.guarded_sgd_step: a sample's update norm is summed over the stages holding its
  fast weights; a caught sample returns to its initial fast weights on every stage).
With the `context` objective a forward-only call gives the inner loss after adaptation. The outer
call then runs every stage's layers with grad and the adapted fast weights bound as constants.
The guard's outer check (step.outer_broken_samples) sees the last stage's losses only after that
call, and Megatron's 1F1B has no place to train one micro-batch again: when it finds samples
(`reset_broken_samples`), every rank resets them and train_step runs the outer call once more,
from zeroed gradients (step.FocusftForwardStep.after_schedule). Exact, and rare: it costs one
more outer call in an iteration where the check fires.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.engine.split_model import forward_layers, lm_head_loss, stage_input
from megatron_focusft.fastweights.linear import FastWeightBinding, FastWeights, bind_fast_weights
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.focusft.inner_loop import (
    InnerLoopResult,
    InnerTargets,
    agree_on_samples,
    cp_sum_gradients,
    frozen_slow_weights,
    guarded_sgd_step,
    non_finite_samples,
    per_sample_loss,
    per_sample_sums,
    reset_samples,
    update_sq_norm,
)
from megatron_focusft.parallel.context import ParallelContext


class _Relay(torch.autograd.Function):
    """`value` (computed without grad) passed on as if computed from `anchor`; anchor's gradient is 0."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.anchor_meta = (anchor.shape, anchor.dtype, anchor.device)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.anchor_meta
        return None, torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class MicroBatchInner:
    """One micro-batch's inner-loop state on this rank (tensors hold this stage's fast weights only).

    losses [steps, n] and loss_after [n] are filled on the last stage (zeros elsewhere).
    """

    batch: SegmentBatch
    objective: InnerTargets
    sample_index: torch.Tensor
    counts: torch.Tensor
    tensors: dict[tuple[int, str], list[torch.Tensor]]
    initial: FastWeights
    losses: torch.Tensor
    skipped: torch.Tensor
    active: torch.Tensor | None = None  # [n] samples still adapting (the guard's, inner_loop.py)
    cache: torch.Tensor | None = None
    leaves: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    grads: list[torch.Tensor] = field(default_factory=list)
    step_loss: torch.Tensor | None = None
    loss_after: torch.Tensor | None = None
    update_norm: torch.Tensor | None = None
    broken: torch.Tensor | None = None  # [n] the guard's outer check, on the last stage (step.py)

    @property
    def num_samples(self) -> int:
        return self.counts.shape[0]

    @property
    def has_targets(self) -> torch.Tensor:
        return self.counts > 0

    def result(self) -> InnerLoopResult:
        adapted = {k: (a, b) for k, (a, b) in self.tensors.items()}
        return InnerLoopResult(adapted, self.losses, self.skipped, self.has_targets)


def _stage_forward(gpt: GPTModel, state: MicroBatchInner, bottom: range, top: range,
                   weights: dict[tuple[int, str], list[torch.Tensor]], parallel: ParallelContext) -> torch.Tensor:
    """This stage's part of one inner forward: [s, b, h] for the next stage, or the loss on the last."""
    batch = state.batch
    hidden_in, rotary = stage_input(gpt, batch.tokens, batch.position_ids)
    if bottom or not top:
        if state.cache is None:
            with torch.no_grad():
                state.cache = forward_layers(gpt, hidden_in, state.objective.mask, rotary, bottom)
        anchor = hidden_in if hidden_in.requires_grad else torch.zeros((), requires_grad=True)
        hidden = _Relay.apply(state.cache, anchor)
    else:
        hidden = hidden_in
    if not top:
        return hidden
    return inner_stage_output(gpt, state, hidden, rotary, top, weights, parallel)


def inner_stage_output(gpt: GPTModel, state: MicroBatchInner, hidden: torch.Tensor, rotary: torch.Tensor, top: range,
                       weights: dict[tuple[int, str], list[torch.Tensor]], parallel: ParallelContext) -> torch.Tensor:
    """The adapted layers of one inner forward, `weights` bound, from their input hidden [s, b, h]:
    [s, b, h] for the next stage, or on the last stage the sum over samples still adapting of their
    token-mean inner losses (a scalar; this CP rank's share), with state.step_loss [n] set."""
    batch = state.batch
    binding = FastWeightBinding(state.sample_index, {k: tuple(v) for k, v in weights.items()})
    with bind_fast_weights(gpt, binding):
        out = forward_layers(gpt, hidden, state.objective.mask, rotary, top)
    if not gpt.post_process:
        return out
    token_loss = lm_head_loss(gpt, out, batch.labels, state.objective.targets)
    sums, _ = per_sample_sums(token_loss, state.objective.targets, state.sample_index, state.num_samples)
    local_loss = sums / state.counts.clamp(min=1)  # this CP rank's share of each sample's token mean
    state.step_loss = parallel.cp_all_reduce(sums.detach().clone()) / state.counts.clamp(min=1)
    keep = torch.isfinite(state.step_loss) & state.active
    return torch.where(keep, local_loss, torch.zeros_like(local_loss)).sum()


def _schedule(model: torch.nn.Module, states: list[MicroBatchInner], forward_only: bool, forward) -> None:
    """One call of Megatron's schedule over the micro-batches, without gradient finalisation."""
    config = model.module.config if hasattr(model, "module") else model.config
    finalize, config.finalize_model_grads_func = config.finalize_model_grads_func, None

    def forward_step(data_iterator: Iterator[MicroBatchInner], _model):
        state = next(data_iterator)
        output = forward(state)
        # The schedule's (loss, token count, logs): the loss is differentiated as is.
        return output, lambda out: (out, torch.ones((), dtype=torch.int, device=out.device), {})

    batch = states[0].batch
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(states), model=[model], num_microbatches=len(states),
            seq_length=batch.attention.shape[1], micro_batch_size=batch.tokens.shape[0], forward_only=forward_only)
    finally:
        config.finalize_model_grads_func = finalize


def run_pipelined_inner_loop(model: torch.nn.Module, states: list[MicroBatchInner], bottom: range, top: range,
                             config: FocusftConfig, parallel: ParallelContext) -> None:
    """`config.inner_steps` SGD steps of every micro-batch's fast weights (module doc); fills `states`."""
    gpt = model.module if hasattr(model, "module") else model
    last = gpt.post_process
    for state in states:
        state.active = state.has_targets.clone()
    with frozen_slow_weights(gpt):
        for step in range(config.inner_steps):
            if not any(bool(state.active.any()) for state in states):  # agreed by every rank
                break
            for state in states:
                state.leaves = {key: [t.detach().requires_grad_(True) for t in pair]
                                for key, pair in state.tensors.items()}
            _schedule(model, states, False, lambda s: _stage_forward(gpt, s, bottom, top, s.leaves, parallel))
            bad = []
            for state in states:
                flat = [t for pair in state.leaves.values() for t in pair]
                grads = cp_sum_gradients([torch.zeros_like(t) if t.grad is None else t.grad for t in flat], parallel)
                flags = non_finite_samples(grads, state.num_samples).to(state.counts.device)
                if last:
                    flags |= ~torch.isfinite(state.step_loss)
                bad.append(flags)
                state.grads = grads
            # One agreement for all micro-batches: a sample fails on every stage and rank alike.
            failed = agree_on_samples(torch.cat(bad), parallel, over_stages=True)
            for state, fail in zip(states, failed.split([s.num_samples for s in states])):
                if last:
                    state.losses[step] = torch.where(state.active, state.step_loss, torch.zeros_like(state.step_loss))
                state.tensors, caught = guarded_sgd_step(state.leaves, state.grads, fail, state.initial, state.active,
                                                         config, parallel, over_stages=True)
                state.skipped += caught.long() * (config.inner_steps - step)
                state.active &= ~caught
                state.grads = []
        if config.inner_objective == "context":
            with torch.no_grad():
                _schedule(model, states, True, lambda s: _after_forward(gpt, s, bottom, top, parallel))
    _set_update_norms(states, parallel)


def _set_update_norms(states: list[MicroBatchInner], parallel: ParallelContext) -> None:
    # Each stage holds its own layers' fast weights: the squared norms add up over the stages.
    squares = torch.stack([update_sq_norm(s.initial, s.tensors, parallel) for s in states])
    norms = parallel.pp_all_reduce(squares.to(states[0].counts.device)).sqrt().cpu()
    for state, norm in zip(states, norms):
        state.update_norm = norm


def reset_broken_samples(model: torch.nn.Module, states: list[MicroBatchInner], bottom: range, top: range,
                         config: FocusftConfig, parallel: ParallelContext) -> bool:
    """The guard's outer check after the outer call, on every stage: the samples the last stage
    found broken (`state.broken`) get their initial fast weights back, all their steps counted as
    skipped, as focusft_forward does in one process; their update norms and, with the `context`
    objective, their inner loss after (a forward-only call over the micro-batches they are in) are
    computed again. -> whether this pipeline reset any sample (the same answer on every stage)."""
    gpt = model.module if hasattr(model, "module") else model
    device = states[0].counts.device
    flags = torch.cat([torch.zeros(s.num_samples, dtype=torch.bool, device=device) if s.broken is None
                       else s.broken.to(device) for s in states])
    # The last stage's flags (agreed over TP and CP there), on every stage.
    flags = parallel.pp_all_reduce(flags.to(torch.int32), dist.ReduceOp.MAX).bool()
    if not bool(flags.any()):
        return False
    reset = []
    for state, broken in zip(states, flags.split([s.num_samples for s in states])):
        if bool(broken.any()):
            state.tensors = reset_samples(state.tensors, state.initial, broken)
            state.skipped = torch.where(broken, config.inner_steps, state.skipped)
            state.loss_after = None  # response objective: the re-run's outer pass sets it
            reset.append(state)
    if config.inner_objective == "context":
        with torch.no_grad():
            _schedule(model, reset, True, lambda s: _after_forward(gpt, s, bottom, top, parallel))
    _set_update_norms(states, parallel)
    return True


def _after_forward(gpt: GPTModel, state: MicroBatchInner, bottom: range, top: range,
                   parallel: ParallelContext) -> torch.Tensor:
    """Forward-only: the inner objective's loss with the adapted fast weights (last stage: recorded)."""
    out = _stage_forward(gpt, state, bottom, top, state.tensors, parallel)
    if gpt.post_process:
        state.loss_after = state.step_loss
    return out


def outer_stage_forward(gpt: GPTModel, state: MicroBatchInner, bottom: range, top: range,
                        parallel: ParallelContext) -> torch.Tensor:
    """The outer forward of one stage with the adapted fast weights as constants: [s, b, h] for the
    next stage, or the per-token loss [b, s] on the last."""
    batch = state.batch
    hidden, rotary = stage_input(gpt, batch.tokens, batch.position_ids)
    hidden = forward_layers(gpt, hidden, batch.attention, rotary, bottom)
    if top:
        binding = FastWeightBinding(state.sample_index, {k: tuple(v) for k, v in state.tensors.items()})
        with bind_fast_weights(gpt, binding):
            hidden = forward_layers(gpt, hidden, batch.attention, rotary, top)
    if not gpt.post_process:
        return hidden
    per_token_loss = lm_head_loss(gpt, hidden, batch.labels, batch.loss_mask.bool())
    if state.loss_after is None:  # response objective: the outer loss is the inner objective
        state.loss_after, _ = per_sample_loss(per_token_loss.detach(), state.objective.targets, state.sample_index,
                                              state.num_samples, parallel)
    return per_token_loss

