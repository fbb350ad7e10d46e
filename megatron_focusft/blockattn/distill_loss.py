"""The block-distillation loss: vocabulary-parallel KL(teacher || student) per token, and token weights.

Shapes: ``s`` sequence (this rank's part under CP), ``b`` micro-batch rows, ``v = V / tp`` the
vocabulary shard this TP rank holds (Megatron's output layer leaves logits [s, b, v]).

`vocab_parallel_kl` never gathers the vocabulary: each rank reduces its shard and the TP group
all-reduces per-token scalars (two collectives). Its backward is analytic (a
torch.autograd.Function), because each rank's gradient is its own shard of
T * (p_student - p_teacher): autograd through a sum all-reduce whose backward is the identity
would give each rank only the part of the gradient that flows through its own shard's terms.

nvidia-modelopt's Megatron plugin (`modelopt.torch.distill.plugins.megatron.LogitsKLLoss`, the
`distill` extra) computes the same divergence without the T^2 factor, returns each TP rank's
partial vocabulary sum for its loss balancer to reduce, and reads its groups from Megatron's
global parallel state; a test checks that the two agree. This module takes its groups
explicitly and yields the finished per-token loss that the token weights need.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, tp_group: dist.ProcessGroup
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per token: logits [s, b, v] -> [b, s] fp32.

    The result is the whole vocabulary's divergence, identical on every rank of `tp_group`.
    Computed in fp32 whatever the logits' dtype, with the softmaxes shifted by the global
    maximum over all shards. Differentiable w.r.t. `student_logits` only: the teacher is a
    constant (no gradient reaches it even if it requires one). The gradient w.r.t. the student
    logits is T * (p_student - p_teacher) per vocabulary entry times the incoming per-token
    gradient, in the student logits' dtype. The inputs are not modified.
    """
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must be [s, b, vocab/tp] tensors of the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(temperature), tp_group).t()


class _VocabParallelKL(torch.autograd.Function):
    """Forward [s, b, v] x 2 -> [s, b]; saves only the fp32 gradient direction T * (p_s - p_t)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                group: dist.ProcessGroup) -> torch.Tensor:
        # Dividing by T makes fp32 copies, so the in-place steps below never touch the callers'
        # logits, which may feed another loss too. (Megatron's fp32 vocab-parallel CE does work in
        # place: it leaves its input holding the softmax, so logits must reach it after this loss
        # has run or as a copy.)
        x = student.float() / temperature
        y = teacher.float() / temperature
        maxima = torch.stack([x.amax(dim=-1), y.amax(dim=-1)])  # [2, s, b]
        _all_reduce(maxima, group, dist.ReduceOp.MAX)
        x -= maxima[0].unsqueeze(-1)
        y -= maxima[1].unsqueeze(-1)
        # With Z_s, Z_t the global softmax denominators, KL = (1 / Z_t) sum_i e^{y_i} (y_i - x_i)
        # - log Z_t + log Z_s: one sum all-reduce of three per-token partial sums. In place from
        # here on, so at most three [s, b, v] fp32 tensors are alive (the vocabulary dominates).
        gap = y - x
        exp_x, exp_y = x.exp_(), y.exp_()
        sums = torch.stack([exp_x.sum(dim=-1), exp_y.sum(dim=-1), gap.mul_(exp_y).sum(dim=-1)])  # [3, s, b]
        del gap
        _all_reduce(sums, group, dist.ReduceOp.SUM)
        z_student, z_teacher, weighted_gap = sums
        kl = weighted_gap / z_teacher - z_teacher.log() + z_student.log()
        # d(T^2 KL) / d student = T^2 * (1 / T) * (p_s - p_t)
        direction = exp_x.div_(z_student.unsqueeze(-1)).sub_(exp_y.div_(z_teacher.unsqueeze(-1))).mul_(temperature)
        ctx.save_for_backward(direction)
        ctx.student_dtype = student.dtype
        return temperature ** 2 * kl

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (direction,) = ctx.saved_tensors
        grad_student = (direction * grad_output.unsqueeze(-1)).to(ctx.student_dtype)
        return grad_student, None, None, None


def divergence_token_weights(
    per_token_kl: torch.Tensor,
    scored: torch.Tensor,
    sample_index: torch.Tensor,
    num_samples: int,
    *,
    clip: float,
    cp_group: dist.ProcessGroup,
) -> torch.Tensor:
    """Detached token weights from the teacher-student divergence: all [b, s] -> [b, s] fp32.

    w = min(d / mean_d, clip) on scored tokens, 0 elsewhere, where d is the token's divergence
    (`per_token_kl`, negatives from rounding read as 0) and mean_d the mean of d over the scored
    tokens of the same sample. Invariant: before clipping the weights of a sample's scored
    tokens average exactly 1, so weighting moves the loss between a sample's tokens without
    changing its total; clipping only lowers weights. A sample whose divergence is 0 on every
    scored token has ratio 1 on each (weight min(1, clip)).

    `sample_index` and `num_samples` are micro-batch-wide (SegmentBatch's): under context
    parallelism each CP rank holds a slice of every row, and the per-sample sums and counts are
    all-reduced over `cp_group`, so mean_d is the whole sample's on every rank. Scored tokens
    must belong to a sample (0 <= sample_index < num_samples). Fed the TP-identical output of
    `vocab_parallel_kl`, the weights are identical on every TP rank too.
    """
    if per_token_kl.shape != scored.shape or per_token_kl.shape != sample_index.shape or per_token_kl.dim() != 2:
        raise ValueError(f"per_token_kl {tuple(per_token_kl.shape)}, scored {tuple(scored.shape)} and "
                         f"sample_index {tuple(sample_index.shape)} must have the same [b, s] shape")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    scored = scored.bool()
    outside = scored & ((sample_index < 0) | (sample_index >= num_samples))
    if bool(outside.any()):
        raise ValueError(f"scored tokens must have a sample_index in [0, num_samples = {num_samples}); "
                         f"{int(outside.sum())} do not, e.g. {sample_index[outside].unique()[:4].tolist()}")
    divergence = torch.where(scored, per_token_kl.detach().float().clamp(min=0.0), 0.0)
    index = torch.where(scored, sample_index, 0).flatten()  # unscored tokens add 0 to sample 0
    totals = per_token_kl.new_zeros((2, max(num_samples, 1)), dtype=torch.float32)  # [sum of d, count]
    totals[0].index_add_(0, index, divergence.flatten())
    totals[1].index_add_(0, index, scored.flatten().float())
    _all_reduce(totals, cp_group, dist.ReduceOp.SUM)
    mean = (totals[0] / totals[1].clamp(min=1.0))[index].view_as(divergence)
    ratio = torch.where(mean > 0, divergence / mean, 1.0)
    return torch.where(scored, ratio.clamp(max=clip), 0.0)


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp) -> None:
    if group.size() > 1:
        dist.all_reduce(tensor, op=op, group=group)
