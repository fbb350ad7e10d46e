"""Measured per-layer costs of FocuSFT's pipeline units (focusft/pipeline_cost.LayerCosts).

Each pipeline stage times what it holds on one micro-batch: a layer below the fast weights
(forward with grad, backward), an adapted layer (an inner step's forward with the slow weights
frozen and fast weights as leaves, its backward; the outer forward with the fast weights bound as
constants, its backward), and on the last stage the scored LM head (on the inner objective's
targets and on the response targets). The fastest of `reps` runs after one warm-up; the stages
measure one after the other (a barrier between them), so two ranks sharing cores do not slow each
other's figures; with virtual stages a rank measures each of its chunks. They are gathered over
the world (the slowest stage of each kind), so every rank gets the same LayerCosts. A kind no
stage holds (no layer below the fast weights) costs 0.

The slow-weight gradients these backwards leave in Megatron's grad buffers are not cleared here:
train_step zeroes the buffers before every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.engine.split_model import forward_layers, lm_head_loss
from megatron_focusft.fastweights.linear import FastWeightBinding, FastWeights, bind_fast_weights, shard_fast_weights
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.focusft.inner_loop import frozen_slow_weights
from megatron_focusft.focusft.pipeline_cost import LayerCosts
from megatron_focusft.focusft.step import inner_targets, layer_ranges
from megatron_focusft.parallel.context import ParallelContext


def _forward_backward(forward: Callable[[], torch.Tensor], reps: int) -> tuple[float, float]:
    """(forward seconds, backward seconds) of a scalar-valued forward: the fastest of `reps` runs
    after one warm-up (the least disturbed by other work on the machine)."""
    fwd, bwd = [], []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        out.backward()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    return min(fwd[1:]), min(bwd[1:])


def measure_stage_costs(gpt: GPTModel, batch: SegmentBatch, config: FocusftConfig, initial: FastWeights,
                        reps: int = 5) -> dict[str, float]:
    """This stage's LayerCosts fields it can measure (one layer of each kind it holds, the head on
    the last stage); initial: unsharded fast weights of the batch's samples (focusft_forward's)."""
    parallel = ParallelContext.of(gpt)
    bottom, top = layer_ranges(gpt, config)
    objective = inner_targets(batch, config.inner_objective)
    b, s = batch.tokens.shape
    seq = s // (parallel.tp_size if gpt.config.sequence_parallel else 1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq, b, gpt.config.hidden_size, generator=g).to(batch.tokens.device, gpt.config.params_dtype)
    rotary = gpt.rotary_pos_emb(s * parallel.cp_size)
    costs: dict[str, float] = {}

    def layer_out(layers: range, mask) -> Callable[[], torch.Tensor]:
        x = hidden.clone().requires_grad_()
        return lambda: forward_layers(gpt, x, mask, rotary, layers).float().square().mean()

    if bottom:
        costs["bottom_forward"], costs["bottom_backward"] = _forward_backward(
            layer_out(range(bottom[0], bottom[0] + 1), batch.attention), reps)
    if top:
        one = range(top[0], top[0] + 1)
        mine = {gpt.decoder.layers[index].layer_number for index in top}  # a binding covers the stage's layers
        local = shard_fast_weights({k: v for k, v in initial.items() if k[0] in mine}, parallel.tp_rank,
                                   parallel.tp_size)
        leaves = {k: tuple(t.detach().clone().requires_grad_() for t in pair) for k, pair in local.items()}
        with frozen_slow_weights(gpt), bind_fast_weights(gpt, FastWeightBinding(batch.sample_index, leaves)):
            costs["adapted_inner_forward"], costs["adapted_inner_backward"] = _forward_backward(
                layer_out(one, objective.mask), reps)
        constants = {k: tuple(t.detach() for t in pair) for k, pair in local.items()}
        with bind_fast_weights(gpt, FastWeightBinding(batch.sample_index, constants)):
            costs["adapted_outer_forward"], costs["adapted_outer_backward"] = _forward_backward(
                layer_out(one, batch.attention), reps)
    if gpt.post_process:
        x = hidden.clone().requires_grad_()
        for name, targets in (("inner", objective.targets), ("outer", batch.loss_mask.bool())):
            costs[f"head_{name}_forward"], costs[f"head_{name}_backward"] = _forward_backward(
                lambda targets=targets: lm_head_loss(gpt, x, batch.labels, targets).sum(), reps)
    return costs


def measure_layer_costs(chunks: Sequence[GPTModel], batch: SegmentBatch, config: FocusftConfig,
                        initial: FastWeights, reps: int = 5) -> LayerCosts:
    """measure_stage_costs on every pipeline rank in turn, for each of its model chunks (one, or
    one per virtual stage), gathered (a collective over the world)."""
    rank = chunks[0].pg_collection.pp.rank()
    costs: dict[str, float] = {}
    for turn in range(chunks[0].pg_collection.pp.size()):
        if turn == rank:
            for chunk in chunks:
                for name, seconds in measure_stage_costs(chunk, batch, config, initial, reps).items():
                    costs[name] = max(seconds, costs.get(name, 0.0))
        dist.barrier()
    return _gather(costs)


def _gather(stage_costs: dict[str, float]) -> LayerCosts:
    """Every rank's measured fields -> one LayerCosts (max over the ranks that measured a field)."""
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, stage_costs)
    fields = LayerCosts.__dataclass_fields__
    return LayerCosts(**{name: max((c[name] for c in gathered if name in c), default=0.0) for name in fields})
