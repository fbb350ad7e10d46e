"""One FocuSFT micro-batch: bottom layers once, inner loop on the top layers, outer SFT loss.

Data flow (L decoder layers, the top `layer_fraction` adapted):
  embed -> bottom layers (with grad, once) -> h_bottom
  inner loop: h_bottom.detach() -> top layers with fast weights -> per-sample loss -> SGD on A, B
  outer: h_bottom -> top layers with the adapted fast weights as constants -> per-token CE
The bottom layers' output does not depend on the fast weights, so computing it once is exact.
With the `context` objective the inner loop runs under a causal mask, so its bottom output is
different: it is computed once more, without grad, and shared by all inner steps.

Context parallelism: the batch is this CP rank's part (data/cp_split.split_batch_for_cp):
local tokens, the GLOBAL mask. Samples are numbered on the unsplit batch, so every CP rank
holds the fast weights of every sample of the micro-batch; the inner loop reduces per-sample
statistics and fast-weight gradients over CP. The outer loss needs nothing: its
(loss_sum, num_tokens) are this rank's, and Megatron sums both over DP x CP
(calculate_per_token_loss: finalize_model_grads all-reduces the token count over the DP x CP
group, DDP sums the slow-weight gradients over it).

Sequence parallelism: hidden states are this TP rank's sequence shard (split_model keeps
GPTModel's SP layout), but the batch, the sample index and every loss stay whole-sequence on
each TP rank, as without SP; the fast-weight linears map between the two.

Pipeline parallelism (engine/pipeline.py): every adapted layer is on the last stage. A stage
before it runs `pipeline_stage_forward` (its layers once, as plain SFT would); the last stage
runs `focusft_forward` on the received activations: its own bottom layers, the inner loop, the
outer pass. With the `context` objective the inner loop needs the bottom activations under a
causal mask from every stage, so each earlier stage also runs its layers under that mask,
without grad, and sends both as one tensor [s, 2b, h] (rows b..2b the causal ones; Megatron's
schedule exchanges the shape, `variable_seq_lengths`); their gradient is zero.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.engine.loss import masked_token_loss
from megatron_focusft.engine.pipeline import INNER, fast_weights_span_stages
from megatron_focusft.engine.split_model import forward_layers, lm_head_loss, stage_input
from megatron_focusft.engine.train_step import ForwardStep
from megatron_focusft.fastweights.config import adapted_layer_numbers
from megatron_focusft.fastweights.linear import FastWeightBinding, FastWeights, bind_fast_weights, shard_fast_weights
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.focusft.inner_loop import (
    InnerLoopResult,
    InnerTargets,
    agree_on_samples,
    per_sample_loss,
    reset_samples,
    run_inner_loop,
    update_sq_norm,
)
from megatron_focusft.focusft.pipeline_cost import LayerCosts
from megatron_focusft.focusft.pipelined_inner import (
    MicroBatchInner,
    outer_stage_forward,
    reset_broken_samples,
    run_pipelined_inner_loop,
)
from megatron_focusft.masks import SegmentMask, segment_mask
from megatron_focusft.parallel.context import ParallelContext


@dataclass
class FocusftOutput:
    """per_token_loss [b, s] (outer, differentiable w.r.t. the slow weights), inner-loop record,
    and per-sample inner loss after adaptation [n]."""

    per_token_loss: torch.Tensor
    inner: InnerLoopResult
    inner_loss_after: torch.Tensor
    update_norm: torch.Tensor


def context_mask(batch: SegmentBatch) -> SegmentMask:
    """The `context` objective's mask: causal inside each document."""
    return segment_mask("causal", doc_ids=batch.attention.doc_ids)


def inner_targets(batch: SegmentBatch, objective: str) -> InnerTargets:
    """response: the outer targets under the FocuSFT mask. context: next-token targets that are
    context tokens, under a causal mask (next-token prediction is trivial bidirectionally).

    The context targets are the in-document next-token targets the outer loss does not score
    (make_batch's loss mask is exactly "next token is a response token of the same document"),
    from the batch's next_in_document (global: under CP a token's successor may live on another rank).
    """
    if objective == "response":
        return InnerTargets(batch.attention, batch.loss_mask.bool())
    return InnerTargets(context_mask(batch), batch.next_in_document & ~batch.loss_mask.bool())


def layer_ranges(model: GPTModel, config: FocusftConfig) -> tuple[range, range]:
    """Indices into this stage's layer list: the layers below the fast weights, the adapted ones."""
    first_adapted = adapted_layer_numbers(model.config.num_layers, config.fast_weights.layer_fraction)[0]
    below = sum(1 for layer in model.decoder.layers if layer.layer_number < first_adapted)
    return range(0, below), range(below, len(model.decoder.layers))


def stage_inputs(
    model: GPTModel, batch: SegmentBatch, with_causal: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(hidden [s, b, h], the same under the causal mask (detached) or None, rotary) at this stage's input."""
    hidden, rotary = stage_input(model, batch.tokens, batch.position_ids)
    if not with_causal:
        return hidden, None, rotary
    if model.pre_process:  # the embedding does not depend on the mask
        return hidden, hidden.detach(), rotary
    b = batch.tokens.shape[0]
    return hidden[:, :b], hidden[:, b:].detach(), rotary


def pipeline_stage_forward(model: GPTModel, batch: SegmentBatch, config: FocusftConfig) -> torch.Tensor:
    """A stage before the last (no fast weights): its layers on its input -> the next stage's input.

    [s, b, h], or [s, 2b, h] with the `context` objective (rows b..2b: the same layers under the
    causal mask, no grad).
    """
    layers = range(len(model.decoder.layers))
    with_causal = config.inner_objective == "context"
    hidden, causal_hidden, rotary = stage_inputs(model, batch, with_causal)
    out = forward_layers(model, hidden, batch.attention, rotary, layers)
    if not with_causal:
        return out
    with torch.no_grad():
        causal_out = forward_layers(model, causal_hidden, context_mask(batch), rotary, layers)
    return torch.cat([out, causal_out], dim=1)


def outer_broken_samples(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, sample_index: torch.Tensor,
                         has_targets: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """The guard's last check (inner_loop.py) -> [n] bool: samples with targets whose outer loss is
    not finite on some scored token (on any TP or CP rank); they are trained again with their
    initial fast weights. per_token_loss, loss_mask, sample_index: [b, s] (this rank's tokens)."""
    non_finite = loss_mask.bool() & (sample_index >= 0) & ~torch.isfinite(per_token_loss.detach())
    n = has_targets.shape[0]
    return agree_on_samples(torch.bincount(sample_index[non_finite], minlength=n) > 0, parallel) & has_targets


def focusft_forward(model: GPTModel, batch: SegmentBatch, config: FocusftConfig, initial: FastWeights,
                    parallel: ParallelContext) -> FocusftOutput:
    """The bilevel forward of one packed micro-batch (on the last pipeline stage).

    initial: UNSHARDED fast weights of the batch's samples (reference layout: key (layer, proj)
    -> A [n, r, in], B [n, out, r], n = batch.num_samples; samples numbered as
    batch.sample_index numbers them, the same on every CP rank).
    """
    bottom, top = layer_ranges(model, config)
    sample_index = batch.sample_index
    local = shard_fast_weights(initial, parallel.tp_rank, parallel.tp_size)
    objective = inner_targets(batch, config.inner_objective)
    with_causal = objective.mask is not batch.attention
    hidden, causal_hidden, rotary = stage_inputs(model, batch, with_causal)
    h_bottom = forward_layers(model, hidden, batch.attention, rotary, bottom)
    if not with_causal:
        h_inner = h_bottom.detach()
    else:
        with torch.no_grad():
            h_inner = forward_layers(model, causal_hidden, objective.mask, rotary, bottom)
    timers = model.config.timers
    if timers is not None:
        timers(INNER, log_level=2).start()
    inner = run_inner_loop(model, h_inner, rotary, top, batch.labels, objective, sample_index, local, config, parallel)
    if timers is not None:
        timers(INNER).stop()

    def outer(adapted: FastWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """The outer per-token loss and the inner objective's after adaptation; the adapted fast
        weights are constants (full stop-gradient)."""
        with bind_fast_weights(model, FastWeightBinding(sample_index, adapted)):
            per_token = lm_head_loss(model, forward_layers(model, h_bottom, batch.attention, rotary, top), batch.labels,
                                     batch.loss_mask.bool())
            if config.inner_objective == "response":
                return per_token, per_token.detach()
            with torch.no_grad():
                return per_token, lm_head_loss(model, forward_layers(model, h_inner, objective.mask, rotary, top),
                                               batch.labels, objective.targets)

    per_token_loss, after_tokens = outer(inner.adapted)
    n = inner.has_targets.shape[0]
    broken = outer_broken_samples(per_token_loss, batch.loss_mask, sample_index, inner.has_targets, parallel)
    if bool(broken.any()):
        adapted = {key: tuple(pair) for key, pair in reset_samples(inner.adapted, local, broken).items()}
        inner = dataclasses.replace(inner, adapted=adapted,
                                    skipped=torch.where(broken, config.inner_steps, inner.skipped))
        per_token_loss, after_tokens = outer(inner.adapted)
    after, _ = per_sample_loss(after_tokens, objective.targets, sample_index, n, parallel)
    return FocusftOutput(per_token_loss, inner, after, update_sq_norm(local, inner.adapted, parallel).sqrt())


def adapt_to_context(model: GPTModel, batch: SegmentBatch, config: FocusftConfig, initial: FastWeights,
                     parallel: ParallelContext) -> InnerLoopResult:
    """Test-time adaptation: the inner loop alone, with the `context` objective, on prompts.

    batch: the prompts as a SegmentBatch (all context, no response tokens); initial: unsharded
    fast weights of its samples, as for focusft_forward. The same computation as the training
    inner loop of a sample whose context is the prompt: its context targets and causal hidden
    states do not depend on the tokens after the context. Returns this rank's adapted shards.
    """
    if config.inner_objective != "context":
        raise ValueError("test-time adaptation runs the `context` inner objective (next-token prediction on the "
                         f"prompt); the config has {config.inner_objective!r}")
    if not (model.pre_process and model.post_process):
        raise ValueError("test-time adaptation needs the whole model on this rank (pipeline size 1)")
    bottom, top = layer_ranges(model, config)
    objective = inner_targets(batch, "context")
    hidden, rotary = stage_input(model, batch.tokens, batch.position_ids)
    with torch.no_grad():
        h_inner = forward_layers(model, hidden, objective.mask, rotary, bottom)
    local = shard_fast_weights(initial, parallel.tp_rank, parallel.tp_size)
    return run_inner_loop(model, h_inner, rotary, top, batch.labels, objective, batch.sample_index, local, config,
                          parallel)


def focusft_loss_func(
    per_token_loss: torch.Tensor, *, loss_mask: torch.Tensor, output: FocusftOutput
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss_func: outer (loss_sum, num_tokens, logs) plus the inner-loop logs as [sum, count].

    Under CP, "lm loss" is this rank's part (sum it over the CP group, as Megatron's training
    loop does over DP x CP); the inner logs describe the whole micro-batch and are identical on
    every CP rank (a sum over CP ranks keeps their ratio).
    """
    loss_sum, num_tokens, logs = masked_token_loss(per_token_loss, loss_mask)
    inner = output.inner
    adapted = inner.has_targets.float()
    count = adapted.sum()
    before = inner.losses[0] if inner.losses.shape[0] else output.inner_loss_after
    logs.update({
        "inner loss before": torch.stack([(before * adapted).sum(), count]).detach().cpu(),
        "inner loss after": torch.stack([(output.inner_loss_after * adapted).sum(), count]).detach().cpu(),
        "inner skipped steps": torch.stack([inner.skipped.sum().float(), torch.ones(())]).cpu(),
        "fast weight update norm": torch.stack([output.update_norm, torch.ones(())]),
    })
    return loss_sum, num_tokens, logs


class SeededFastWeights:
    """Fresh fast weights for every micro-batch: sample i of the k-th micro-batch seeded by
    (seed, k, i). Deterministic for a given seed and micro-batch order."""

    def __init__(self, layout, rank: int, seed: int, dtype: torch.dtype = torch.float32) -> None:
        from megatron_focusft.fastweights.linear import init_fast_weights

        self._init = functools.partial(init_fast_weights, layout, rank=rank, dtype=dtype)
        self.seed = seed
        self.micro_batches_seen = 0

    def __call__(self, batch: SegmentBatch) -> FastWeights:
        n = batch.num_samples  # the whole micro-batch's: the same samples on every CP rank
        base = (self.seed * 1_000_003 + self.micro_batches_seen) * 4096
        self.micro_batches_seen += 1
        return self._init([base + i for i in range(max(n, 0))], device=batch.tokens.device)


class FocusftForwardStep(ForwardStep):
    """A Megatron `forward_step_func` running the bilevel step on each micro-batch.

    fast_weights_for(batch) gives a micro-batch's initial fast weights; it is called once per
    micro-batch on the stages holding adapted layers. Under pipeline parallelism
    `forward_backward_func(model)` is the interleaved schedule (interleaved.py), unless the config
    asks for the sequential one: then, when adapted layers sit on several pipeline stages,
    `prepare(model, micro_batches)` (engine.train_step.train_step calls it before the schedule)
    runs the inner loop of all micro-batches first (pipelined_inner.py), and the forward step then
    runs each stage's outer forward with the adapted fast weights; `after_schedule` makes the
    guard's outer check, and asks for the outer call once more when it resets samples.
    plan_costs: the LayerCosts (focusft/pipeline_cost.py) the interleaved schedule plans its unit
    order from, identical on every rank (None: nominal costs).
    """

    def __init__(self, config: FocusftConfig, fast_weights_for: Callable[[SegmentBatch], FastWeights],
                 plan_costs: LayerCosts | None = None) -> None:
        self.config = config
        self.fast_weights_for = fast_weights_for
        self.plan_costs = plan_costs
        self._prepared: collections.deque[MicroBatchInner] | None = None  # the outer call's, in order
        self._checked: list[MicroBatchInner] | None = None  # the states the guard checks after the call
        self._schedule = None  # the InterleavedSchedule, made on first use

    def interleaved(self, model: torch.nn.Module) -> bool:
        """Whether train_step runs the interleaved pipeline schedule (focusft/interleaved.py)."""
        gpt = model.module if hasattr(model, "module") else model
        return (gpt.config.pipeline_model_parallel_size > 1 and self.config.pipeline_schedule == "interleaved"
                and self.config.inner_steps > 0)

    def forward_backward_func(self, model: torch.nn.Module):
        if not self.interleaved(model):
            return super().forward_backward_func(model)
        from megatron_focusft.focusft.interleaved import InterleavedSchedule  # it builds on this module

        if self._schedule is None:
            self._schedule = InterleavedSchedule(self)
        return self._schedule

    def prepare(self, model: torch.nn.Module, micro_batches: list[SegmentBatch]) -> None:
        gpt = model.module if hasattr(model, "module") else model
        if self.interleaved(model) or not fast_weights_span_stages(gpt.config, self.config.fast_weights):
            self._prepared = self._checked = None
            return
        bottom, top = layer_ranges(gpt, self.config)
        parallel = ParallelContext.of(gpt)
        states = [self.initial_state(gpt, batch, top, parallel) for batch in micro_batches]
        timers = gpt.config.timers
        if timers is not None:
            timers(INNER, log_level=2).start()
        run_pipelined_inner_loop(model, states, bottom, top, self.config, parallel)
        if timers is not None:
            timers(INNER).stop()
        self._prepared, self._checked = collections.deque(states), states

    def after_schedule(self, model: torch.nn.Module) -> bool:
        """The guard's outer check when the adapted layers span stages under the sequential schedule
        (elsewhere focusft_forward or the interleaved schedule makes it in the forward): the samples
        the last stage found broken are reset on every stage (pipelined_inner.reset_broken_samples)
        and, when any data-parallel replica reset one, every rank runs the outer call again. The
        re-run is not checked again, as in one process."""
        states, self._checked = self._checked, None
        if states is None:
            return False
        gpt = model.module if hasattr(model, "module") else model
        bottom, top = layer_ranges(gpt, self.config)
        reset = torch.tensor([reset_broken_samples(model, states, bottom, top, self.config, ParallelContext.of(gpt))],
                             dtype=torch.int32, device=states[0].counts.device)
        group = getattr(model, "dp_cp_group", None)  # Megatron DDP's: the replicas that share gradients
        if group is not None and group.size() > 1:
            torch.distributed.all_reduce(reset, op=torch.distributed.ReduceOp.MAX, group=group)
        if not bool(reset.item()):
            return False
        self._prepared = collections.deque(states)
        return True

    def initial_state(self, gpt: GPTModel, batch: SegmentBatch, top: range, parallel: ParallelContext,
                      fast_weights: FastWeights | None = None) -> MicroBatchInner:
        """The micro-batch's inner-loop state on this stage; fast_weights: its unsharded initial fast
        weights when already drawn (once per micro-batch and rank), else fast_weights_for(batch)."""
        sample_index, n = batch.sample_index, batch.num_samples
        objective = inner_targets(batch, self.config.inner_objective)
        scored = objective.targets & (sample_index >= 0)
        counts = parallel.cp_all_reduce(torch.bincount(sample_index[scored], minlength=n))
        initial: FastWeights = {}
        if top:
            mine = {gpt.decoder.layers[index].layer_number for index in top}
            drawn = self.fast_weights_for(batch) if fast_weights is None else fast_weights
            initial = shard_fast_weights({k: v for k, v in drawn.items() if k[0] in mine},
                                         parallel.tp_rank, parallel.tp_size)
        device = batch.tokens.device
        return MicroBatchInner(
            batch, objective, sample_index, counts, {k: [t.detach().clone() for t in v] for k, v in initial.items()},
            initial, torch.zeros(self.config.inner_steps, n, device=device), torch.zeros(n, dtype=torch.long,
                                                                                         device=device))

    def __call__(self, data_iterator: Iterator[SegmentBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        gpt = model.module if hasattr(model, "module") else model
        sft_loss = functools.partial(masked_token_loss, loss_mask=batch.loss_mask)
        if fast_weights_span_stages(gpt.config, self.config.fast_weights):
            if not self._prepared:
                raise RuntimeError("the adapted layers span several pipeline stages: call prepare(model, "
                                   "micro_batches) before the schedule, once per optimizer step "
                                   "(engine.train_step.train_step does)")
            state = self._prepared.popleft()
            bottom, top = layer_ranges(gpt, self.config)
            parallel = ParallelContext.of(gpt)
            out = outer_stage_forward(gpt, state, bottom, top, parallel)
            if not gpt.post_process:
                return out, sft_loss  # Megatron calls no loss function before the last stage
            if self._checked is not None:  # the first outer call: after_schedule acts on the check
                state.broken = outer_broken_samples(out, batch.loss_mask, state.sample_index, state.has_targets,
                                                    parallel)
            output = FocusftOutput(out, state.result(), state.loss_after, state.update_norm)
            return out, functools.partial(focusft_loss_func, loss_mask=batch.loss_mask, output=output)
        if not gpt.post_process:
            return pipeline_stage_forward(gpt, batch, self.config), sft_loss
        output = focusft_forward(gpt, batch, self.config, self.fast_weights_for(batch), ParallelContext.of(gpt))
        return output.per_token_loss, functools.partial(focusft_loss_func, loss_mask=batch.loss_mask, output=output)


def make_focusft_forward_step(
    config: FocusftConfig, fast_weights_for: Callable[[SegmentBatch], FastWeights],
    plan_costs: LayerCosts | None = None,
) -> FocusftForwardStep:
    """The bilevel step as a Megatron `forward_step_func` (FocusftForwardStep)."""
    return FocusftForwardStep(config, fast_weights_for, plan_costs)
