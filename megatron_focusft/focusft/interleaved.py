"""FocuSFT's interleaved pipeline schedule: inner steps and outer passes of all micro-batches in one
schedule (`--focusft-pipeline-schedule interleaved`, the default under PP > 1).

With the adapted layers on stages k..P-1, a micro-batch m is `inner_steps` inner passes and one
outer pass (engine/pipeline_plan.focusft_passes), each a forward and a backward unit per stage:

  inner pass 0, stages s < k   forward: their layers, with grad, once (pipeline_stage_forward: the
                               outer input, and with the `context` objective the same layers under
                               the causal mask, no grad: [s, 2b, h]); kept for the outer backward
  inner pass j, stage k        forward: (j = 0: its own bottom layers, outer with grad and inner
                               without) the adapted layers from the kept inner input, slow
                               weights frozen, m's fast weights as leaves -> [s, b, h]
  inner pass j, stages > k     forward: the same from the received input; the last stage scores the
                               inner objective (sum of per-sample token-mean losses)
  inner pass j, backward       P-1 .. k: fast-weight gradients and the tentative guarded SGD step
                               (inner_loop.sgd_step); the gradient of the stage input goes down
                               with a status [failed, broken, squared update norm] per sample,
                               accumulated over the stages; stage k decides which samples the guard
                               catches (inner_loop.py), exactly as guarded_sgd_step over the stages
  the decision                 travels up with m's next forward (a [n] message beside the
                               activations): each stage applies it to its tentative step then
  outer pass, forward k..P-1   the adapted layers from the kept outer input with the adapted fast
                               weights as constants (+ the after-adaptation inner forward, no grad,
                               with the context objective); carries [decision, update sq norm sum];
                               the last stage's loss function is focusft_loss_func
  outer pass, backward P-1..0  Megatron's backward_step: every slow-weight gradient; a [n] message
                               of the guard's outer check (step.outer_broken_samples, on the last
                               stage) goes first, down through every stage
  the re-run                   only for a micro-batch whose check found samples: no backward in
                               the plan; after the planned units, its broken samples' fast weights
                               reset, its outer forward again on stages k..P-1 and its backward on
                               every stage, micro-batch by micro-batch (as focusft_forward in one
                               process: once, no second check)

Order: engine.pipeline_plan.simulate plans each stage's unit order (1F1B rules: backward first,
forwards and backwards in pass order) from the step's `plan_costs` (the layer costs
`--pipeline-balance auto` measured; NOMINAL_COSTS otherwise). Passes are ordered as a wavefront
(pipeline_plan.focusft_passes): pass j of micro-batch m at position m + j x stride, so while one
micro-batch's update goes down to stage k and back up the stages run the next micro-batches'
passes, and the stages below k run later outer forwards and earlier outer backwards. The stride
is the one of 1 .. 2 (P - k) whose simulated iteration is shortest (FocusftPipeline.planned).
Megatron's p2p helper (`p2p_communication._p2p_ops`, the ranks of its P2PCommunicator) carries every
message; shapes are known on both ends, so nothing is exchanged but the tensors; sends are waited for
at the end of the iteration.

Virtual stages (model chunks, `virtual_pipeline_model_parallel_size` V): the stages above are the
V x P stages in layer order, stage s = chunk x P + rank (Megatron's interleaved placement), and
a rank runs the units of its chunks in the order the plan gives its device
(Timeline.device_order). Messages of different chunks then share each link (with P = 2 both
directions share one), and untagged p2p matches them in order; so each rank receives each
peer's messages in the order the peer's plan sends them (`_Link.expect` / `take`, from the same
deterministic plan on every rank), keeping early ones until their unit runs.

In-flight bound: stage s holds the outer activations of at most W_s = stride x (inner_steps + 1) +
P - 1 - s micro-batches (engine.pipeline_plan.default_window: opened by their first forward there,
freed by their outer backward there), plus, on the adapted stages, the activations of at most one
inner pass of each of them (slow weights frozen: the adapted layers only). With no inner steps and
stride 1 that would be 1F1B's P - s; the inner steps lengthen each micro-batch's stay by
stride x inner_steps positions. A micro-batch to re-run keeps its activations until the end of
the iteration (the rare case the guard exists for).
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator, _p2p_ops
from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
from megatron.core.utils import get_attr_wrapped_model

from megatron_focusft.engine.pipeline import (
    INNER,
    first_adapted_stage,
    num_pipeline_stages,
    stage_layer_numbers,
    stage_of_chunk,
)
from megatron_focusft.engine.pipeline_plan import Timeline, Unit
from megatron_focusft.engine.split_model import forward_layers, lm_head_loss, stage_input
from megatron_focusft.fastweights.config import adapted_layer_numbers
from megatron_focusft.fastweights.linear import FastWeightBinding, bind_fast_weights
from megatron_focusft.focusft.inner_loop import (
    agree_on_samples,
    cp_sum_gradients,
    frozen_slow_weights,
    non_finite_samples,
    per_sample_loss,
    reset_samples,
    sample_update_sq_norms,
    sgd_step,
    update_sq_norm,
)
from megatron_focusft.focusft.pipeline_cost import NOMINAL_COSTS, FocusftPipeline, stage_layers
from megatron_focusft.focusft.pipelined_inner import MicroBatchInner, inner_stage_output
from megatron_focusft.focusft.step import (
    FocusftForwardStep,
    FocusftOutput,
    focusft_loss_func,
    layer_ranges,
    outer_broken_samples,
    pipeline_stage_forward,
    stage_inputs,
)
from megatron_focusft.parallel.context import ParallelContext

_CONTROL = torch.float64  # flags and squared norms travel exactly, whatever the pipeline dtype


def focusft_pipeline(config, focusft_config, num_micro_batches: int) -> FocusftPipeline:
    """The FocusftPipeline of a model config (every stage's layers in layer order, from Megatron's
    placement; with virtual stages, stage s on rank s mod P)."""
    first = adapted_layer_numbers(config.num_layers, focusft_config.fast_weights.layer_fraction)[0]
    counts = [len(stage_layer_numbers(config, s)) for s in range(num_pipeline_stages(config))]
    virtual = config.virtual_pipeline_model_parallel_size is not None
    return FocusftPipeline(stage_layers(config.num_layers, first, counts), focusft_config.inner_steps,
                           focusft_config.inner_objective == "context", num_micro_batches,
                           config.pipeline_model_parallel_size if virtual else None)


def message_target(unit: Unit, first_adapted: int, inner_steps: int, num_stages: int) -> Unit | None:
    """The unit that receives what `unit` sends: a forward feeds the next stage's forward of the
    same pass, a backward the previous stage's backward (inner passes: down to stage k only)."""
    if not unit.backward:
        return Unit(unit.stage + 1, unit.micro_batch, unit.step, False) if unit.stage + 1 < num_stages else None
    lowest = first_adapted if unit.step < inner_steps else 0
    return Unit(unit.stage - 1, unit.micro_batch, unit.step, True) if unit.stage > lowest else None


class _Link:
    """This rank's messages to and from its ring neighbours, through Megatron's p2p helper.

    Receives are matched in the sender's order: messages on one link are not tagged, so each
    peer's planned sends (`expect`) are received in the order the peer makes them and kept until
    the unit they are for asks (`take`). A receive that waits for an earlier message waits for a
    send the peer makes before the one asked for, so this adds no wait a unit would not have.
    """

    def __init__(self, pp_group: torch.distributed.ProcessGroup, config, expected: dict[int, list[Unit]],
                 specs, device: torch.device) -> None:
        """expected: per peer (its rank in pp_group), the units here that it sends to, in its planned
        order (forwards come from the previous rank, backwards from the next; with two ranks they
        are one);
        specs(unit) -> [(shape, dtype)] of the message `unit` receives."""
        ranks = P2PCommunicator(pp_group=pp_group, config=config)
        self._where = {"group": pp_group, "prev_pipeline_rank": ranks.prev_rank, "next_pipeline_rank": ranks.next_rank}
        rank, size = pp_group.rank(), pp_group.size()
        self._peers = ((rank - 1) % size, (rank + 1) % size)  # a forward's sender, a backward's
        self._sends: list[tuple[torch.Tensor, object]] = []
        self._expected = {peer: collections.deque(units) for peer, units in expected.items()}
        self._arrived: dict[Unit, list[torch.Tensor]] = {}
        self._specs, self._device = specs, device

    def take(self, unit: Unit) -> list[torch.Tensor]:
        """The planned message `unit` receives."""
        queue = self._expected[self._peers[unit.backward]]
        while unit not in self._arrived:
            if not queue:
                raise RuntimeError(f"no planned message for {unit} is left from that peer")
            target = queue.popleft()
            self._arrived[target] = self.recv(self._specs(target), not target.backward, self._device)
        return self._arrived.pop(unit)

    def drained(self) -> bool:
        return not self._arrived and not any(self._expected.values())

    def send(self, tensors: list[torch.Tensor], to_next: bool) -> None:
        for tensor in tensors:
            tensor = tensor.detach().contiguous()
            reqs = _p2p_ops(tensor_send_prev=None if to_next else tensor, tensor_recv_prev=None,
                            tensor_send_next=tensor if to_next else None, tensor_recv_next=None, **self._where)
            self._sends.append((tensor, reqs))  # the tensor stays alive until its send is done

    def recv(self, specs: list[tuple[tuple[int, ...], torch.dtype]], from_prev: bool,
             device: torch.device) -> list[torch.Tensor]:
        out = []
        for shape, dtype in specs:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            reqs = _p2p_ops(tensor_send_prev=None, tensor_recv_prev=buffer if from_prev else None,
                            tensor_send_next=None, tensor_recv_next=None if from_prev else buffer, **self._where)
            for req in reqs.values():
                req.wait()
            out.append(buffer)
        return out

    def close(self) -> None:
        for _, reqs in self._sends:
            for req in reqs.values():
                req.wait()
        self._sends.clear()


@dataclass
class _Slot:
    """One micro-batch on one stage: its inner-loop state and the tensors its later units need."""

    inner: MicroBatchInner
    stage_in: torch.Tensor | None = None  # the received input of the outer forward's graph
    outer_out: torch.Tensor | None = None  # this stage's outer output (the loss on the last stage)
    rotary: torch.Tensor | None = None
    h_bottom: torch.Tensor | None = None  # stage k: the adapted layers' outer input (with grad)
    h_inner: torch.Tensor | None = None  # stage k: their inner input (no grad)
    inner_in: torch.Tensor | None = None  # stages > k: the received inner input (a leaf)
    inner_out: torch.Tensor | None = None
    tentative: dict = field(default_factory=dict)  # this step's fast weights before the decision
    decision: torch.Tensor | None = None  # [n] caught at the last step: sent up with the next forward
    sq_sum: torch.Tensor | None = None  # update sq norm summed over stages k..this one
    broken: torch.Tensor | None = None  # last stage: [n] the outer check's samples (outer_broken_samples)
    rerun: torch.Tensor | None = None  # [n] the same, on every stage: trained again after the planned units
    store_index: int | None = None  # last stage: this micro-batch's entry in the forward data store


@dataclass(frozen=True)
class UnitRecord:
    """A unit this rank ran: its compute seconds (receives and sends excluded)."""

    unit: Unit
    seconds: float


class InterleavedSchedule:
    """A Megatron forward-backward function (the signature of `get_forward_backward_func()`'s
    result) running FocuSFT's interleaved schedule (module doc) over this rank's model chunks
    (one, or one per virtual stage, in chunk order); `records` holds the last iteration's units
    on this rank."""

    def __init__(self, step: FocusftForwardStep) -> None:
        self.step = step
        self.records: list[UnitRecord] = []
        self._plans: dict[int, Timeline] = {}  # micro-batches per iteration -> the plan (the model is fixed)

    def plan(self, config, num_micro_batches: int) -> Timeline:
        """The units' order for `num_micro_batches` (the same on every rank): the best plan
        (FocusftPipeline.planned) under the step's `plan_costs`, NOMINAL_COSTS when none were measured."""
        if num_micro_batches not in self._plans:
            costs = self.step.plan_costs or NOMINAL_COSTS
            pipeline = focusft_pipeline(config, self.step.config, num_micro_batches).planned(costs)
            self._plans[num_micro_batches] = pipeline.simulate(costs)
        return self._plans[num_micro_batches]

    def __call__(self, *, forward_step_func, data_iterator: Iterator, model, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, decoder_seq_length: int | None = None, forward_only: bool = False,
                 collect_non_loss_data: bool = False, first_val_step: bool | None = None, **unused):
        if forward_only or collect_non_loss_data:
            raise ValueError("the interleaved FocuSFT schedule trains (forward and backward); use Megatron's "
                             "get_forward_backward_func() for forward-only passes")
        if forward_step_func is not self.step:
            raise ValueError("the interleaved schedule runs the FocusftForwardStep it was made by")
        chunks = list(model) if isinstance(model, list) else [model]
        # Every chunk reads the same micro-batches (Megatron passes one iterator per chunk).
        data_iterator = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
        config = (chunks[0].module if hasattr(chunks[0], "module") else chunks[0]).config
        run = _Run(self.step, chunks, [next(data_iterator) for _ in range(num_microbatches)],
                   self.plan(config, num_microbatches))
        self.records = run.records
        return run.execute()


class _Run:
    """One iteration of the schedule on this rank: its stages' units in the planned order."""

    def __init__(self, step: FocusftForwardStep, chunks: list, micro_batches: list, plan: Timeline) -> None:
        gpts = [chunk.module if hasattr(chunk, "module") else chunk for chunk in chunks]
        self.chunks, self.config, self.focusft = chunks, gpts[0].config, step.config
        self.parallel = ParallelContext.of(gpts[0])
        rank = parallel_state.get_pipeline_model_parallel_rank()
        virtual = self.config.virtual_pipeline_model_parallel_size
        if len(chunks) != (virtual or 1):
            raise ValueError(f"{len(chunks)} model chunks on this rank; the config has "
                             f"virtual_pipeline_model_parallel_size {virtual}")
        self.num_stages = num_pipeline_stages(self.config)
        self.k = first_adapted_stage(self.config, self.focusft.fast_weights)
        self.store: list = []
        self.num_tokens = torch.zeros((), dtype=torch.int)
        self.records: list[UnitRecord] = []
        self.num_micro_batches = len(micro_batches)
        self.device = micro_batches[0].tokens.device
        # A micro-batch's initial fast weights are drawn once on this rank, for all its chunks.
        tops = [layer_ranges(gpt, self.focusft)[1] for gpt in gpts]
        initial = [step.fast_weights_for(batch) if any(tops) else {} for batch in micro_batches]
        self.stages: dict[int, _Stage] = {}
        for v, (chunk, gpt) in enumerate(zip(chunks, gpts)):
            stage = stage_of_chunk(self.config, rank, v if virtual else None)
            self.stages[stage] = _Stage(self, stage, chunk, gpt, step, micro_batches, initial)
        self.units = plan.device_order(rank)
        pp = self.config.pipeline_model_parallel_size
        expected = {}
        for peer in {(rank - 1) % pp, (rank + 1) % pp}:  # one peer with two ranks
            sent = (message_target(u, self.k, self.focusft.inner_steps, self.num_stages) for u in plan.device_order(peer))
            expected[peer] = [t for t in sent if t is not None and t.stage % pp == rank]
        self.link = _Link(self.parallel.pp, self.config, expected,
                          lambda unit: self.stages[unit.stage].receives(unit), self.device)

    def execute(self) -> list:
        timers = self.config.timers
        if timers is not None:
            timers("forward-backward", log_level=1).start()
        steps = self.focusft.inner_steps
        for unit in self.units:
            stage = self.stages[unit.stage]
            slot = stage.slots[unit.micro_batch]
            if unit.backward:
                (stage.outer_backward if unit.step == steps else stage.inner_backward)(unit, slot)
            else:
                (stage.outer_forward if unit.step == steps else stage.inner_forward)(unit, slot)
        if not self.link.drained():
            raise RuntimeError("planned messages were left unreceived (the plan and the stages disagree)")
        # The guard's re-runs: every rank has the same micro-batches (the flags went down through
        # every stage); per micro-batch, the forwards in layer order then the backwards in reverse.
        for m in range(self.num_micro_batches):
            chain = [stage for _, stage in sorted(self.stages.items()) if stage.slots[m].rerun is not None]
            for stage in chain:
                stage.rerun_forward(stage.slots[m])
            for stage in reversed(chain):
                stage.rerun_backward(stage.slots[m])
        self.link.close()
        if self.config.finalize_model_grads_func is not None:
            self.config.finalize_model_grads_func(
                self.chunks, self.num_tokens if self.config.calculate_per_token_loss else None)
        if timers is not None:
            timers("forward-backward").stop()
        return self.store


class _Stage:
    """One pipeline stage (a model chunk) of this rank and its micro-batches' units."""

    def __init__(self, run: _Run, stage: int, model, gpt, step: FocusftForwardStep, micro_batches: list,
                 initial: list) -> None:
        self.run, self.stage, self.model, self.gpt = run, stage, model, gpt
        self.config, self.focusft, self.parallel = run.config, run.focusft, run.parallel
        self.k, self.steps = run.k, self.focusft.inner_steps
        self.last = self.gpt.post_process
        self.bottom, self.top = layer_ranges(self.gpt, self.focusft)
        self.rows = 2 if self.focusft.inner_objective == "context" else 1
        self.slots = [_Slot(step.initial_state(self.gpt, batch, self.top, self.parallel, fast_weights))
                      for batch, fast_weights in zip(micro_batches, initial)]
        for slot in self.slots:
            slot.inner.active = slot.inner.has_targets.clone()

    # --- shapes, messages and timers --------------------------------------------------------

    @property
    def link(self) -> _Link:
        return self.run.link

    def _activation(self, slot: _Slot, rows: int) -> tuple[tuple[int, ...], torch.dtype]:
        batch = slot.inner.batch
        s = batch.tokens.shape[1] // (self.parallel.tp_size if self.config.sequence_parallel else 1)
        return (s, rows * batch.tokens.shape[0], self.config.hidden_size), self.config.pipeline_dtype

    def receives(self, unit: Unit) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """What `unit` of this stage receives (message_target's sender sends exactly that)."""
        slot = self.slots[unit.micro_batch]
        n = slot.inner.num_samples
        if unit.backward:
            if unit.step < self.steps:
                return [self._activation(slot, 1), ((3 * n,), _CONTROL)]
            return [((n,), _CONTROL), self._activation(slot, self.rows)]
        if self.stage <= self.k:  # only pass 0 receives here (stage k keeps its inputs after that)
            return [self._activation(slot, self.rows)]
        if unit.step == self.steps:
            return [self._activation(slot, self.rows), ((n + 1,), _CONTROL)]
        return [self._activation(slot, 1)] + ([((n,), _CONTROL)] if unit.step else [])

    def _timer(self, name: str, start: bool) -> None:
        timers = self.config.timers
        if timers is not None:
            (timers(name, log_level=2).start() if start else timers(name).stop())

    def _record(self, unit: Unit, started: float) -> None:
        self.run.records.append(UnitRecord(unit, time.perf_counter() - started))

    def _megatron_forward(self, slot: _Slot, func, input_tensor: torch.Tensor | None,
                          count_tokens: bool = True) -> torch.Tensor:
        """Megatron's forward_step (input set on the model, loss function on the last stage)."""
        output, num_tokens = forward_step(
            lambda _it, _model: func(), iter(()), self.model, len(self.slots), input_tensor, self.run.store,
            self.config, self.parallel.cp_size, is_last_stage=self.last)
        if count_tokens:
            self.run.num_tokens += num_tokens
        return output

    # --- inner passes -----------------------------------------------------------------------

    def inner_forward(self, unit: Unit, slot: _Slot) -> None:
        state, batch = slot.inner, slot.inner.batch
        if self.stage < self.k:  # pass 0 below the adapted stages: the outer forward, once
            received = self.link.take(unit)[0].requires_grad_() if self.stage > 0 else None
            started = time.perf_counter()
            slot.stage_in = received
            slot.outer_out = self._megatron_forward(
                slot, lambda: (pipeline_stage_forward(self.gpt, batch, self.focusft), None), received)
            self._record(unit, started)
            self.link.send([slot.outer_out], to_next=True)
            return
        control = None
        if self.stage == self.k:
            if unit.step == 0:
                received = self.link.take(unit)[0].requires_grad_() if self.stage > 0 else None
                started = time.perf_counter()
                self._entry(slot, received)
            else:
                started = time.perf_counter()
            hidden = slot.h_inner
        else:
            received = self.link.take(unit)
            started = time.perf_counter()
            if unit.step:
                control = received[1]
                self._apply(slot, control.bool(), unit.step - 1)
            slot.inner_in = received[0].requires_grad_()
            get_attr_wrapped_model(self.model, "set_input_tensor")([slot.inner_in])
            hidden = slot.inner_in
            if slot.rotary is None:
                slot.rotary = self._rotary(batch)
        self._timer("forward-compute", True)
        self._timer(INNER, True)
        state.leaves = {key: [t.detach().requires_grad_(True) for t in pair] for key, pair in state.tensors.items()}
        with frozen_slow_weights(self.gpt):
            slot.inner_out = inner_stage_output(self.gpt, state, hidden, slot.rotary, self.top, state.leaves,
                                                self.parallel)
        self._timer(INNER, False)
        self._timer("forward-compute", False)
        self._record(unit, started)
        if not self.last:
            decision = slot.decision if self.stage == self.k else control
            self.link.send([slot.inner_out] + ([decision.to(_CONTROL)] if unit.step else []), to_next=True)

    def _rotary(self, batch) -> torch.Tensor:
        """The rotary table at this stage's input (the input tensor set on the model)."""
        return stage_input(self.gpt, batch.tokens, batch.position_ids)[1]

    def _entry(self, slot: _Slot, received: torch.Tensor | None) -> None:
        """Stage k, pass 0: its own bottom layers, outer (with grad) and inner (no grad)."""
        state, batch = slot.inner, slot.inner.batch
        get_attr_wrapped_model(self.model, "set_input_tensor")([received])
        slot.stage_in = received
        self._timer("forward-compute", True)
        with_causal = state.objective.mask is not batch.attention
        hidden, causal_hidden, slot.rotary = stage_inputs(self.gpt, batch, with_causal)
        slot.h_bottom = forward_layers(self.gpt, hidden, batch.attention, slot.rotary, self.bottom)
        if not with_causal:
            slot.h_inner = slot.h_bottom.detach()
        else:
            with torch.no_grad():
                slot.h_inner = forward_layers(self.gpt, causal_hidden, state.objective.mask, slot.rotary, self.bottom)
        self._timer("forward-compute", False)

    def inner_backward(self, unit: Unit, slot: _Slot) -> None:
        state, n = slot.inner, slot.inner.num_samples
        above = None
        if not self.last:
            grad, above = self.link.take(unit)
        started = time.perf_counter()
        self._timer("backward-compute", True)
        self._timer(INNER, True)
        with frozen_slow_weights(self.gpt):  # a recomputed forward must see the slow weights frozen
            torch.autograd.backward(slot.inner_out, grad_tensors=None if self.last else grad)
        flat = [t for pair in state.leaves.values() for t in pair]
        grads = cp_sum_gradients([torch.zeros_like(t) if t.grad is None else t.grad for t in flat], self.parallel)
        device = state.counts.device
        flags = non_finite_samples(grads, n).to(device)
        if self.last:
            flags |= ~torch.isfinite(state.step_loss)
            state.losses[unit.step] = torch.where(state.active, state.step_loss, torch.zeros_like(state.step_loss))
        failed = agree_on_samples(flags, self.parallel)
        sq = torch.zeros(n, dtype=torch.float32, device=device)
        broken = torch.zeros(n, dtype=torch.bool, device=device)
        if above is not None:
            failed |= above[:n].bool()
            broken |= above[n:2 * n].bool()
        slot.tentative = sgd_step(state.leaves, grads, state.active & ~failed, self.focusft, self.parallel)
        if slot.tentative:
            sq = sample_update_sq_norms(state.initial, slot.tentative, self.parallel).to(device)
            new = [t for pair in slot.tentative.values() for t in pair]
            broken |= agree_on_samples(non_finite_samples(new, n).to(device), self.parallel)
        sq = sq.to(_CONTROL) + (above[2 * n:] if above is not None else 0.0)
        state.leaves, slot.inner_out = {}, None
        self._timer(INNER, False)
        self._timer("backward-compute", False)
        self._record(unit, started)
        if self.stage > self.k:
            input_grad = slot.inner_in.grad
            if input_grad is None:
                input_grad = torch.zeros_like(slot.inner_in)
            slot.inner_in = None
            status = torch.cat([failed.to(_CONTROL), broken.to(_CONTROL), sq])
            self.link.send([input_grad, status], to_next=False)
            return
        # Stage k has every stage's status: the guard's decision (inner_loop.guarded_sgd_step).
        bound = self.focusft.max_update_norm ** 2
        caught = state.active & (failed | broken | ~(sq <= bound).to(device))
        slot.decision = caught
        self._apply(slot, caught, unit.step)

    def _apply(self, slot: _Slot, caught: torch.Tensor, step: int) -> None:
        """The guard's decision on inner step `step`: caught samples back to their initial fast weights."""
        state = slot.inner
        caught = caught.to(state.active.device) & state.active
        tensors = slot.tentative
        state.tensors = reset_samples(tensors, state.initial, caught) if bool(caught.any()) else tensors
        state.skipped += caught.long() * (self.steps - step)
        state.active &= ~caught
        slot.tentative = {}

    # --- the outer pass ---------------------------------------------------------------------

    def outer_forward(self, unit: Unit, slot: _Slot) -> None:
        state, batch, n = slot.inner, slot.inner.batch, slot.inner.num_samples
        if self.stage == self.k:
            started = time.perf_counter()
            decision, sq_sum = slot.decision, torch.zeros((), dtype=_CONTROL, device=state.counts.device)
            hidden, inner_hidden, received = slot.h_bottom, slot.h_inner, None
        else:
            received, control = self.link.take(unit)
            started = time.perf_counter()
            received.requires_grad_()
            decision, sq_sum = control[:n].bool(), control[n]
            self._apply(slot, decision, self.steps - 1)
            b = batch.tokens.shape[0]
            hidden, inner_hidden = received[:, :b], received[:, b:].detach()
            slot.stage_in = received  # slot.rotary: set by the inner passes
        own = update_sq_norm(state.initial, state.tensors, self.parallel)
        slot.sq_sum = sq_sum + own.to(device=sq_sum.device, dtype=_CONTROL)
        slot.store_index = len(self.run.store)
        slot.outer_out = self._megatron_forward(slot, functools.partial(self._outer, slot, hidden, inner_hidden),
                                                received)
        self._record(unit, started)
        if not self.last:
            control = torch.cat([decision.to(device=slot.sq_sum.device, dtype=_CONTROL), slot.sq_sum.view(1)])
            self.link.send([slot.outer_out, control], to_next=True)

    def _outer(self, slot: _Slot, hidden: torch.Tensor, inner_hidden: torch.Tensor):
        """The outer forward of the adapted layers (Megatron's forward_step_func contract)."""
        state, batch = slot.inner, slot.inner.batch
        binding = FastWeightBinding(state.sample_index, {key: tuple(v) for key, v in state.tensors.items()})
        context = self.rows == 2
        with bind_fast_weights(self.gpt, binding):
            out = forward_layers(self.gpt, hidden, batch.attention, slot.rotary, self.top)
            after = None
            if context:
                with torch.no_grad():
                    after = forward_layers(self.gpt, inner_hidden, state.objective.mask, slot.rotary, self.top)
        if not self.last:
            return (out if after is None else torch.cat([out, after], dim=1)), None
        per_token_loss = lm_head_loss(self.gpt, out, batch.labels, batch.loss_mask.bool())
        slot.broken = outer_broken_samples(per_token_loss, batch.loss_mask, state.sample_index, state.has_targets,
                                           self.parallel)
        with torch.no_grad():
            after_tokens = (per_token_loss.detach() if after is None
                            else lm_head_loss(self.gpt, after, batch.labels, state.objective.targets))
        loss_after, _ = per_sample_loss(after_tokens, state.objective.targets, state.sample_index, state.num_samples,
                                        self.parallel)
        output = FocusftOutput(per_token_loss, state.result(), loss_after, slot.sq_sum.float().sqrt().cpu())
        return per_token_loss, functools.partial(focusft_loss_func, loss_mask=batch.loss_mask, output=output)

    def outer_backward(self, unit: Unit, slot: _Slot) -> None:
        if self.last:
            broken, grad = slot.broken, None
        else:
            flags, grad = self.link.take(unit)
            broken = flags.bool()
        if bool(broken.any()):  # the guard's outer check: the backward waits for the re-run
            slot.rerun = broken
            if self.stage > 0:  # the gradient is a placeholder: every planned message has one shape
                self.link.send([broken.to(_CONTROL), torch.zeros_like(slot.stage_in)], to_next=False)
            return
        started = time.perf_counter()
        input_grad = backward_step(slot.stage_in, slot.outer_out, grad, self.config)
        self._record(unit, started)
        self._release(slot)
        if self.stage > 0:
            self.link.send([broken.to(_CONTROL), input_grad], to_next=False)

    def _release(self, slot: _Slot) -> None:
        slot.outer_out = slot.stage_in = slot.h_bottom = slot.h_inner = None

    def rerun_forward(self, slot: _Slot) -> None:
        """The guard's outer re-run of one micro-batch, as focusft_forward makes it in one process:
        the broken samples' fast weights back to their initial values (all their steps counted as
        skipped) and the outer forward again on stages k.. (the stages below k keep theirs), its
        store entry replaced. Made once (no second check); rerun_backward follows."""
        if self.stage < self.k:
            return
        state, batch = slot.inner, slot.inner.batch
        broken = slot.rerun.to(state.active.device)
        state.tensors = reset_samples(state.tensors, state.initial, broken)
        state.skipped = torch.where(broken, self.steps, state.skipped)
        if self.stage == self.k:
            received, sq_sum = None, torch.zeros((), dtype=_CONTROL, device=state.counts.device)
            hidden, inner_hidden = slot.h_bottom, slot.h_inner
        else:
            received, control = self.link.recv([self._activation(slot, self.rows), ((1,), _CONTROL)], True,
                                               self.run.device)
            received.requires_grad_()
            b = batch.tokens.shape[0]
            hidden, inner_hidden, sq_sum = received[:, :b], received[:, b:].detach(), control[0]
            slot.stage_in = received
        own = update_sq_norm(state.initial, state.tensors, self.parallel)
        slot.sq_sum = sq_sum + own.to(device=sq_sum.device, dtype=_CONTROL)
        entry = len(self.run.store)
        slot.outer_out = self._megatron_forward(slot, functools.partial(self._outer, slot, hidden, inner_hidden),
                                                received, count_tokens=False)  # counted by the first pass
        if self.last:
            self.run.store[slot.store_index] = self.run.store.pop(entry)
        else:
            self.link.send([slot.outer_out, slot.sq_sum.view(1)], to_next=True)

    def rerun_backward(self, slot: _Slot) -> None:
        """The re-run micro-batch's outer backward on this stage."""
        grad = None if self.last else self.link.recv([self._activation(slot, self.rows)], False, self.run.device)[0]
        input_grad = backward_step(slot.stage_in, slot.outer_out, grad, self.config)
        self._release(slot)
        if self.stage > 0:
            self.link.send([input_grad], to_next=False)
