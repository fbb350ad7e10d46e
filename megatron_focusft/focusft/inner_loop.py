"""The FocuSFT inner loop: per-sample SGD on fast weights, with every sample of a pack independent.

Sample s of a packed micro-batch only sees its own tokens and only its tokens use (A_s, B_s),
so the gradient of the summed per-sample losses with respect to (A_s, B_s) is exactly the
gradient the unpacked reference computes for sample s alone. Clipping, skipping and updates
are then applied per sample.

Context parallelism: a sample's tokens may lie on several CP ranks (or none of this rank's).
Fast weights are replicated over the CP group and numbered globally (see
SegmentBatch.sample_index). Per-sample sums and target counts are all-reduced over
CP before any division; each rank differentiates its tokens' share of every sample's token-mean
loss (the K/V gather's backward already brings the other ranks' queries' share into its keys),
and the fast-weight gradients are summed over CP before clipping; so every CP rank takes the
same step as one process holding the whole sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_focusft.engine.split_model import forward_layers, lm_head_loss
from megatron_focusft.fastweights.linear import SHARD_DIMS, FastWeightBinding, FastWeights, bind_fast_weights
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.masks import SegmentMask
from megatron_focusft.parallel.context import ParallelContext


@dataclass(frozen=True)
class InnerTargets:
    """What one inner forward is scored on: the attention mask and the [b, s] bool target mask."""

    mask: SegmentMask
    targets: torch.Tensor


@dataclass
class InnerLoopResult:
    """adapted: this rank's fast-weight shards after the loop (detached).
    losses: [steps, n] per-sample inner loss before each step's update (0 where no target).
    skipped: [n] steps skipped because the loss or a gradient was not finite.
    has_targets: [n] samples with at least one inner target (the others skip the loop).
    """

    adapted: FastWeights
    losses: torch.Tensor
    skipped: torch.Tensor
    has_targets: torch.Tensor


def per_sample_sums(
    token_loss: torch.Tensor, targets: torch.Tensor, sample_index: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part: token_loss, targets, sample_index [b, s] -> (loss sum [n] fp32, count [n] long).

    The sums are differentiable w.r.t. token_loss.
    """
    scored = targets & (sample_index >= 0)
    index = sample_index[scored]
    sums = torch.zeros(num_samples, dtype=torch.float32, device=token_loss.device).index_add(
        0, index, token_loss[scored].float())
    counts = torch.bincount(index, minlength=num_samples)
    return sums, counts


def per_sample_loss(
    token_loss: torch.Tensor, targets: torch.Tensor, sample_index: torch.Tensor, num_samples: int,
    parallel: ParallelContext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean loss of each sample over the whole sequence: [b, s] inputs -> (mean [n], count [n]).

    Under CP the sums and counts are all-reduced over the CP group first (the mean is then a
    value, with no gradient); without CP the mean is differentiable.
    """
    sums, counts = per_sample_sums(token_loss, targets, sample_index, num_samples)
    if parallel.cp_size > 1:
        sums, counts = parallel.cp_all_reduce(sums.detach().clone()), parallel.cp_all_reduce(counts)
    return sums / counts.clamp(min=1), counts


def cp_sum_gradients(grads: list[torch.Tensor], parallel: ParallelContext) -> list[torch.Tensor]:
    """Each CP rank's partial fast-weight gradients -> their sum, in one fp32 all-reduce."""
    if parallel.cp_size == 1:
        return grads
    flat = parallel.cp_all_reduce(torch.cat([g.reshape(-1).float() for g in grads]))
    return [part.view_as(g).to(g.dtype) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]


def per_sample_sq_norms(local: torch.Tensor, sharded: bool, parallel: ParallelContext) -> torch.Tensor:
    """Squared L2 norm of each sample's tensor [n, ...] -> [n]; a TP-sharded tensor's is global."""
    sq = local.float().pow(2).flatten(1).sum(dim=1)
    return parallel.tp_all_reduce(sq) if sharded else sq


def is_sharded(key: tuple[int, str]) -> tuple[bool, bool]:
    """Whether (A, B) of this projection are split across TP ranks."""
    a_dim, b_dim = SHARD_DIMS[key[1]]
    return a_dim is not None, b_dim is not None


@contextlib.contextmanager
def frozen_slow_weights(model: GPTModel) -> Iterator[None]:
    """Slow weights stop requiring grad for the body of the `with`, then are restored.

    Megatron's parallel linears then take their frozen-weight path (input gradient only): the
    inner backward computes no weight gradient it would throw away, and with
    gradient_accumulation_fusion it cannot add inner-loop gradients into `main_grad`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def update_sq_norm(initial: FastWeights, adapted: FastWeights, parallel: ParallelContext) -> torch.Tensor:
    """Squared L2 norm (fp32 scalar on the CPU), over all samples and of this rank's tensors, of
    adapted - initial fast weights; a TP-sharded tensor counts whole."""
    total = torch.zeros((), dtype=torch.float32)
    for key, pair in adapted.items():
        for new, old, shard in zip(pair, initial[key], is_sharded(key)):
            total = total + per_sample_sq_norms(new - old.detach(), shard, parallel).sum().cpu()
    return total


def non_finite_gradients(grads: list[torch.Tensor], num_samples: int) -> torch.Tensor:
    """[n] bool: samples with a non-finite entry in any of their gradients (each [n, ...])."""
    bad = torch.zeros(num_samples, dtype=torch.bool)
    for g in grads:
        bad = bad.to(g.device) | ~torch.isfinite(g).flatten(1).all(dim=1)
    return bad


def sgd_step(
    tensors: dict[tuple[int, str], list[torch.Tensor]], grads: list[torch.Tensor], update: torch.Tensor,
    config: FocusftConfig, parallel: ParallelContext,
) -> dict[tuple[int, str], list[torch.Tensor]]:
    """One inner SGD step on this rank's fast-weight shards, per sample and per tensor.

    tensors: key -> [A, B] ([n, ...] each); grads: theirs in the same order, already summed over
    CP. Each sample's A and B are clipped on their own to `inner_grad_clip` (the TP-global norm of
    a sharded tensor); samples where `update` [n] is False keep their values.
    """
    grad_iter = iter(grads)
    new_tensors = {}
    for key, pair in tensors.items():
        new_pair = []
        for tensor, shard in zip(pair, is_sharded(key)):
            g = next(grad_iter)
            if config.inner_grad_clip > 0:
                norm = per_sample_sq_norms(g, shard, parallel).sqrt()
                scale = torch.where(norm > config.inner_grad_clip,
                                    config.inner_grad_clip / (norm + 1e-12), torch.ones_like(norm))
                g = g * scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
            g = torch.where(update.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
            new_pair.append((tensor.detach() - config.inner_lr * g).detach())
        new_tensors[key] = new_pair
    return new_tensors


def run_inner_loop(
    model: GPTModel,
    hidden: torch.Tensor,
    rotary: torch.Tensor,
    top_layers: range,
    labels: torch.Tensor,
    objective: InnerTargets,
    sample_index: torch.Tensor,
    initial: FastWeights,
    config: FocusftConfig,
    parallel: ParallelContext,
) -> InnerLoopResult:
    """`config.inner_steps` SGD steps on this rank's fast-weight shards.

    hidden [s, b, h] is the (detached) input of the first adapted layer, so the inner backward
    stops there. initial: key -> (A [n, r, in_local], B [n, out_local, r]).
    """
    n = next(iter(initial.values()))[0].shape[0]
    device = hidden.device
    # Targets of the whole sequence: a sample may have targets on other CP ranks only.
    counts = parallel.cp_all_reduce(torch.bincount(sample_index[objective.targets & (sample_index >= 0)], minlength=n))
    has_targets = counts > 0
    keys = list(initial)
    tensors = {key: [t.detach().clone() for t in initial[key]] for key in keys}
    losses = torch.zeros(config.inner_steps, n, device=device)
    skipped = torch.zeros(n, dtype=torch.long, device=device)
    if not bool(has_targets.any()):
        return InnerLoopResult({k: (a, b) for k, (a, b) in tensors.items()}, losses, skipped, has_targets)
    for step in range(config.inner_steps):
        leaves = {key: [t.requires_grad_(True) for t in pair] for key, pair in tensors.items()}
        binding = FastWeightBinding(sample_index, {k: tuple(v) for k, v in leaves.items()})
        # The backward stays inside the `with`: activation recomputation re-runs the forward
        # there, with the slow weights frozen as they were.
        with frozen_slow_weights(model), bind_fast_weights(model, binding):
            out = forward_layers(model, hidden, objective.mask, rotary, top_layers)
            token_loss = lm_head_loss(model, out, labels, objective.targets)
            sums, _ = per_sample_sums(token_loss, objective.targets, sample_index, n)
            # This rank's share of each sample's token mean (the whole mean without CP).
            local_loss = sums / counts.clamp(min=1)
            loss = parallel.cp_all_reduce(sums.detach().clone()) / counts.clamp(min=1)
            finite_loss = torch.isfinite(loss)
            total = torch.where(finite_loss & has_targets, local_loss, torch.zeros_like(local_loss)).sum()
            flat = [t for key in keys for t in leaves[key]]
            # Every CP rank must run this backward: it holds the K/V gather's reduce-scatter.
            grads = torch.autograd.grad(total, flat, allow_unused=True)
        grads = cp_sum_gradients([torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)], parallel)
        # A sample whose loss or gradient is not finite skips this step, on every TP and CP rank
        # alike (fast weights are replicated over CP and must stay identical).
        bad = ~finite_loss | non_finite_gradients(grads, n)
        bad = parallel.tp_all_reduce(bad.to(torch.int32), dist.ReduceOp.MAX)
        bad = parallel.cp_all_reduce(bad, dist.ReduceOp.MAX).bool()
        update = has_targets & ~bad
        skipped += (has_targets & bad).long()
        losses[step] = torch.where(has_targets, loss.detach(), torch.zeros_like(loss))
        tensors = sgd_step(leaves, grads, update, config, parallel)
    return InnerLoopResult({k: (a, b) for k, (a, b) in tensors.items()}, losses, skipped, has_targets)
