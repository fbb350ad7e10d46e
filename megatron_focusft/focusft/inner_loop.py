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

The guard: an inner step of a sample is caught when its loss or a gradient is not finite, when
the fast weights it produces are not finite, or when it would move the sample's fast weights
further than `max_update_norm` from their initial values (an inner lr so large that the adapted
layers saturate gives finite but meaningless losses: this is what catches it). A caught sample
goes back to its initial fast weights (B = 0: the adapter adds exactly nothing) and takes no
further step; the step it was caught at and every later one count as skipped. Every TP, CP (and
PP) rank takes the same decision (MAX all-reduce), since fast weights are replicated over CP and
their shards must stay consistent over TP.
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
    """adapted: this rank's fast-weight shards after the loop (detached); a sample the guard
    caught holds its initial ones.
    losses: [steps, n] per-sample inner loss before each step's update (0 where no target, and
    after a sample was caught).
    skipped: [n] steps whose update the outer pass does not use (the guard's, module doc).
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


def sample_update_sq_norms(initial: FastWeights, adapted: FastWeights, parallel: ParallelContext) -> torch.Tensor:
    """[n] fp32: each sample's squared L2 norm of adapted - initial over this rank's tensors (a
    TP-sharded tensor counts whole; under PP, this stage's layers only)."""
    total = None
    for key, pair in adapted.items():
        for new, old, shard in zip(pair, initial[key], is_sharded(key)):
            sq = per_sample_sq_norms(new - old.detach(), shard, parallel)
            total = sq if total is None else total + sq
    return total


def update_sq_norm(initial: FastWeights, adapted: FastWeights, parallel: ParallelContext) -> torch.Tensor:
    """Squared L2 norm (fp32 scalar on the CPU), over all samples and of this rank's tensors, of
    adapted - initial fast weights; a TP-sharded tensor counts whole."""
    if not adapted:
        return torch.zeros((), dtype=torch.float32)
    return sample_update_sq_norms(initial, adapted, parallel).sum().cpu()


def non_finite_samples(tensors: list[torch.Tensor], num_samples: int) -> torch.Tensor:
    """[n] bool: samples with a non-finite entry in any of their tensors (gradients or fast
    weights, each [n, ...])."""
    bad = torch.zeros(num_samples, dtype=torch.bool)
    for t in tensors:
        bad = bad.to(t.device) | ~torch.isfinite(t).flatten(1).all(dim=1)
    return bad


def agree_on_samples(flags: torch.Tensor, parallel: ParallelContext, *, over_stages: bool = False) -> torch.Tensor:
    """[n] bool flags -> True where any TP or CP rank (and, over_stages, any PP stage) set them."""
    agreed = flags.to(torch.int32)
    reducers = (parallel.tp_all_reduce, parallel.cp_all_reduce, *((parallel.pp_all_reduce,) if over_stages else ()))
    for all_reduce in reducers:
        agreed = all_reduce(agreed, dist.ReduceOp.MAX)
    return agreed.bool()


def reset_samples(tensors: FastWeights, initial: FastWeights,
                  samples: torch.Tensor) -> dict[tuple[int, str], list[torch.Tensor]]:
    """The fast weights with those of `samples` [n] bool put back to their initial values."""
    def pick(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(samples.view(-1, *([1] * (new.dim() - 1))), old.detach(), new).detach()

    return {key: [pick(new, old) for new, old in zip(pair, initial[key])] for key, pair in tensors.items()}


def guarded_sgd_step(
    leaves: dict[tuple[int, str], list[torch.Tensor]], grads: list[torch.Tensor], failed: torch.Tensor,
    initial: FastWeights, active: torch.Tensor, config: FocusftConfig, parallel: ParallelContext,
    *, over_stages: bool = False,
) -> tuple[dict[tuple[int, str], list[torch.Tensor]], torch.Tensor]:
    """One inner step under the guard (module doc) -> (new fast weights, samples caught now [n]).

    failed [n]: samples whose loss or gradients were not finite, already agreed on by every rank.
    active [n]: samples still adapting. A caught sample gets its initial fast weights back.
    over_stages: the fast weights of a sample are spread over the PP stages (pipelined_inner.py),
    so its update norm is summed and its flags agreed over them too.
    """
    new = sgd_step(leaves, grads, active & ~failed, config, parallel)
    n = active.shape[0]
    sq = (sample_update_sq_norms(initial, new, parallel).to(active.device) if new
          else torch.zeros(n, device=active.device))
    if over_stages:
        sq = parallel.pp_all_reduce(sq)
    broken = non_finite_samples([t for pair in new.values() for t in pair], n).to(active.device)
    # `~(sq <= bound^2)` is also true for a NaN norm.
    caught = agree_on_samples(broken | ~(sq <= config.max_update_norm ** 2), parallel, over_stages=over_stages)
    caught = active & (caught | failed)
    return (reset_samples(new, initial, caught) if bool(caught.any()) else new), caught


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
    active = has_targets.clone()
    for step in range(config.inner_steps):
        if not bool(active.any()):  # agreed by every rank: nothing left to adapt
            break
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
            total = torch.where(finite_loss & active, local_loss, torch.zeros_like(local_loss)).sum()
            flat = [t for key in keys for t in leaves[key]]
            # Every CP rank must run this backward: it holds the K/V gather's reduce-scatter.
            grads = torch.autograd.grad(total, flat, allow_unused=True)
        grads = cp_sum_gradients([torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)], parallel)
        failed = agree_on_samples(~finite_loss | non_finite_samples(grads, n), parallel)
        losses[step] = torch.where(active, loss.detach(), torch.zeros_like(loss))
        tensors, caught = guarded_sgd_step(leaves, grads, failed, initial, active, config, parallel)
        skipped += caught.long() * (config.inner_steps - step)
        active &= ~caught
    return InnerLoopResult({k: (a, b) for k, (a, b) in tensors.items()}, losses, skipped, has_targets)
