"""The block-distillation loss against plain PyTorch on the full vocabulary, at TP = 1 and 2, and
its token weights at CP = 1 and 2; also against nvidia-modelopt's Megatron `LogitsKLLoss`.

Legend: ``S`` tokens, ``B`` rows, ``V`` the full vocabulary (each TP rank holds V / tp of it).

Reference: float64 `log_softmax` + `F.kl_div(log_target=True)` on the full, unsharded logits,
times T^2, with the gradient from float64 autograd. Tolerances (`_tolerances`): with u = 2^-24
(fp32 rounding) and M the largest |logit| / T, every scaled, max-shifted logit carries an
absolute error of at most ~2u * 2M (the division, the shift); exp turns an argument error e
into a relative error e of a probability, the log-sum-exp over V terms adds ~u log V, so the
per-token KL, a p-weighted sum of log-probability gaps (weights summing to 1), errs by at most
a few u (2M + log V); T^2 scales it. We allow 8 u (2M + log V) T^2. The gradient
T (p_s - p_t) g has entries |p| <= 1 with relative error ~u (2M + log V): we allow
8 u (2M + log V) T max|g|. With these logits (|logit| up to ~15) the loss tolerance is ~2e-5
at T = 1 and ~4e-5 at T = 2 (the errors seen are ~30x smaller); a missing T^2, softmaxes
shifted by rank-local maxima, a gradient without T or without the upstream gradient all err
by more than 1e-2 here. Against modelopt both sides carry such an error: twice the tolerance.

The modelopt test needs the `test` extra's nvidia-modelopt (~8 s to import, paid once by the
two workers).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_focusft.blockattn.distill_loss import (
    divergence_token_weights,
    vocab_parallel_kl,
)
from megatron_focusft.parallel.cp_layout import merge_cp_parts, split_for_cp
from tests.helpers.distributed import init_model_parallel

S, B, V = 6, 2, 96
FP32_UNIT = 2.0 ** -24


def _logits(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits [S, B, V] (the teacher a perturbed student) and an upstream gradient [B, S]."""
    g = torch.Generator().manual_seed(seed)
    student = 4.0 * torch.randn(S, B, V, generator=g)
    teacher = student + 1.5 * torch.randn(S, B, V, generator=g)
    upstream = torch.rand(B, S, generator=g) + 0.5
    return student.to(dtype), teacher.to(dtype), upstream


def _reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
               upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 T^2 KL(teacher || student) [B, S] and d(sum(loss * upstream)) / d student [S, B, V]."""
    student64 = student.detach().double().requires_grad_()
    log_student = F.log_softmax(student64 / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.detach().double() / temperature, dim=-1)
    loss = temperature ** 2 * F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1).t()
    (loss * upstream.double()).sum().backward()
    return loss.detach(), student64.grad


def _tolerances(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                upstream: torch.Tensor) -> tuple[float, float]:
    """(loss atol, gradient atol), derived in the module docstring."""
    scaled_max = max(student.abs().max().item(), teacher.abs().max().item()) / temperature
    per_token = 8 * FP32_UNIT * (2 * scaled_max + math.log(V))
    return per_token * temperature ** 2, per_token * temperature * upstream.abs().max().item()


def _ours(student: torch.Tensor, teacher: torch.Tensor, temperature: float, upstream: torch.Tensor,
          group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Our loss [B, S], the student gradient and the teacher's .grad after backward; checks
    that the logits handed to the loss come out unchanged."""
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()  # must still receive no gradient
    originals = student.detach().clone(), teacher.detach().clone()
    loss = vocab_parallel_kl(student, teacher, temperature=temperature, tp_group=group)
    (loss * upstream).sum().backward()
    assert torch.equal(student.detach(), originals[0]) and torch.equal(teacher.detach(), originals[1])
    return loss.detach(), student.grad, teacher.grad


# --- TP = 1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tp1_loss_and_gradient_equal_full_vocabulary_reference(single_rank, temperature):
    student, teacher, upstream = _logits(seed=1)
    loss, grad, teacher_grad = _ours(student, teacher, temperature, upstream, dist.group.WORLD)
    expected_loss, expected_grad = _reference(student, teacher, temperature, upstream)
    loss_atol, grad_atol = _tolerances(student, teacher, temperature, upstream)
    assert loss.dtype == torch.float32 and loss.shape == (B, S)
    assert expected_loss.min() > 0.05 * temperature ** 2  # a divergence of substance on every token
    torch.testing.assert_close(loss.double(), expected_loss, rtol=0, atol=loss_atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=grad_atol)
    assert teacher_grad is None


def test_bf16_logits_are_reduced_in_fp32(single_rank):
    """bf16 inputs: the loss is fp32-accurate on the (exact) bf16 values; the gradient is bf16."""
    temperature = 2.0
    student, teacher, upstream = _logits(seed=2, dtype=torch.bfloat16)
    loss, grad, _ = _ours(student, teacher, temperature, upstream, dist.group.WORLD)
    expected_loss, expected_grad = _reference(student, teacher, temperature, upstream)
    loss_atol, grad_atol = _tolerances(student, teacher, temperature, upstream)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected_loss, rtol=0, atol=loss_atol)
    # the gradient is rounded to bf16 once at the end: half an ulp, 2^-9 relative
    torch.testing.assert_close(grad.double(), expected_grad, rtol=2.0 ** -8, atol=grad_atol)
    # bf16 arithmetic would miss the loss tolerance by far: the test tells the two apart
    bf16_loss = temperature ** 2 * F.kl_div(F.log_softmax(student / temperature, -1),
                                            F.log_softmax(teacher / temperature, -1),
                                            reduction="none", log_target=True).sum(-1).t()
    assert (bf16_loss.double() - expected_loss).abs().max() > 10 * loss_atol


# --- TP = 2 --------------------------------------------------------------------------------


def _tp2_shard(temperature: float, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """On each of 2 ranks: our loss and gradient on this rank's vocabulary half."""
    student, teacher, upstream = _logits(seed, dtype)
    shard = slice(dist.get_rank() * V // 2, (dist.get_rank() + 1) * V // 2)
    loss, grad, teacher_grad = _ours(student[..., shard], teacher[..., shard], temperature, upstream,
                                     dist.group.WORLD)
    assert teacher_grad is None
    return {"loss": loss, "grad": grad}


@pytest.mark.distributed
@pytest.mark.parametrize("temperature,dtype", [(1.0, torch.float32), (2.0, torch.float32), (2.0, torch.bfloat16)])
def test_tp2_each_rank_has_the_full_loss_and_its_gradient_shard(worker_pool, temperature, dtype):
    ranks = worker_pool(2).run(_tp2_shard, temperature, dtype, 3)
    student, teacher, upstream = _logits(3, dtype)
    expected_loss, expected_grad = _reference(student, teacher, temperature, upstream)
    loss_atol, grad_atol = _tolerances(student, teacher, temperature, upstream)
    grad_rtol = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
    assert torch.equal(ranks[0]["loss"], ranks[1]["loss"])
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"].double(), expected_loss, rtol=0, atol=loss_atol)
        shard = expected_grad[..., rank * V // 2:(rank + 1) * V // 2]
        torch.testing.assert_close(result["grad"].double(), shard, rtol=grad_rtol, atol=grad_atol)


# --- token weights -------------------------------------------------------------------------


def test_weights_normalise_per_sample_clip_and_handle_zero_divergence(single_rank):
    # row 0: sample 0 = tokens 0-3, sample 1 = 4-5 (zero divergence), sample 2 = 6-7 (6 unscored)
    # row 1: sample 3 = tokens 0-2 (a rounding-negative KL reads 0), padding after
    kl = torch.tensor([[1.0, 1.0, 1.0, 9.0, 0.0, 0.0, 5.0, 2.0],
                       [4.0, -1e-7, 2.0, 7.0, 7.0, 7.0, 7.0, 7.0]])
    sample_index = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2], [3, 3, 3, -1, -1, -1, -1, -1]])
    scored = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    weights = divergence_token_weights(kl.requires_grad_(), scored, sample_index, 4, clip=2.0,
                                       cp_group=dist.group.WORLD)
    assert not weights.requires_grad
    third = 1.0 / 3.0
    expected = torch.tensor([[third, third, third, 2.0, 1.0, 1.0, 0.0, 1.0],
                             [2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    unclipped = divergence_token_weights(kl, scored, sample_index, 4, clip=100.0, cp_group=dist.group.WORLD)
    assert unclipped[0, 3] == pytest.approx(3.0)


def test_weights_average_one_per_sample_before_clipping(single_rank):
    g = torch.Generator().manual_seed(4)
    sample_index = torch.repeat_interleave(torch.arange(6), torch.tensor([5, 9, 2, 8, 4, 4])).view(2, 16)
    scored = torch.rand(2, 16, generator=g) < 0.7
    kl = torch.rand(2, 16, generator=g) ** 3
    weights = divergence_token_weights(kl, scored, sample_index, 6, clip=1e9, cp_group=dist.group.WORLD)
    for sample in range(6):
        tokens = scored & (sample_index == sample)
        expected = kl[tokens] / kl[tokens].mean()  # the plain per-sample definition
        torch.testing.assert_close(weights[tokens], expected, rtol=1e-6, atol=0)
        assert weights[tokens].mean().item() == pytest.approx(1.0, rel=1e-6)
    assert not weights[~scored].any()


CP_LEN = 16  # 2 * cp = 4 chunks of 4 tokens


def _cp_layout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """kl, scored, sample_index [2, CP_LEN] whose samples straddle the CP chunks, and num_samples."""
    g = torch.Generator().manual_seed(5)
    sample_index = torch.tensor([[0] * 9 + [1] * 7, [2] * 12 + [-1] * 4])
    scored = (torch.rand(2, CP_LEN, generator=g) < 0.8) & (sample_index >= 0)
    kl = torch.rand(2, CP_LEN, generator=g) * torch.linspace(0.1, 3.0, CP_LEN)  # rising: the slices' means differ
    return kl, scored, sample_index, 3


def _cp2_weights() -> torch.Tensor:
    rank = dist.get_rank()
    kl, scored, sample_index, num_samples = (split_for_cp(t, 2, rank) if isinstance(t, torch.Tensor) else t
                                             for t in _cp_layout())
    return divergence_token_weights(kl, scored, sample_index, num_samples, clip=2.5, cp_group=dist.group.WORLD)


@pytest.mark.distributed
def test_cp2_weights_equal_the_unsplit_sequence(worker_pool, single_rank):
    merged = merge_cp_parts(worker_pool(2).run(_cp2_weights))
    kl, scored, sample_index, num_samples = _cp_layout()
    unsplit = divergence_token_weights(kl, scored, sample_index, num_samples, clip=2.5, cp_group=dist.group.WORLD)
    torch.testing.assert_close(merged, unsplit, rtol=1e-6, atol=0)
    # without the CP all-reduce each rank would normalise by its own slice's mean: far off
    rank_local = merge_cp_parts([
        divergence_token_weights(*(split_for_cp(t, 2, rank) for t in (kl, scored, sample_index)), num_samples,
                                 clip=2.5, cp_group=dist.group.WORLD) for rank in range(2)])
    assert (rank_local - unsplit).abs().max() > 0.1


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_is_a_value_error_naming_the_argument(single_rank):
    student, teacher, _ = _logits(seed=6)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=r"student_logits \(6, 2, 96\) and teacher_logits \(6, 2, 48\)"):
        vocab_parallel_kl(student, teacher[..., :48], temperature=1.0, tp_group=group)
    with pytest.raises(ValueError, match=r"\[s, b, vocab/tp\]"):
        vocab_parallel_kl(student[0], teacher[0], temperature=1.0, tp_group=group)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
            vocab_parallel_kl(student, teacher, temperature=temperature, tp_group=group)
    kl, scored, sample_index, num_samples = _cp_layout()
    with pytest.raises(ValueError, match="clip must be > 0, got 0"):
        divergence_token_weights(kl, scored, sample_index, num_samples, clip=0, cp_group=group)
    with pytest.raises(ValueError, match=r"scored \(2, 15\)"):
        divergence_token_weights(kl, scored[:, 1:], sample_index, num_samples, clip=2.0, cp_group=group)
    with pytest.raises(ValueError, match=r"sample_index in \[0, num_samples = 3\); 4 do not, e.g. \[-1\]"):
        divergence_token_weights(kl, sample_index != 5, sample_index, num_samples, clip=2.0, cp_group=group)


# --- nvidia-modelopt -----------------------------------------------------------------------


def _modelopt_agreement(temperature: float, seed: int) -> dict[str, torch.Tensor]:
    """On each of 2 ranks: modelopt's LogitsKLLoss at TP = 1 (full vocabulary) and at TP = 2
    (this rank's half), on copies of the logits, with the student gradients of both."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    student, teacher, upstream = _logits(seed)
    results = {}
    for tp in (1, 2):
        init_model_parallel(tp=tp)
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=tp)
        shard = slice(dist.get_rank() * V // 2, (dist.get_rank() + 1) * V // 2) if tp == 2 else slice(None)
        copy = student[..., shard].clone().requires_grad_()
        # each TP rank returns its vocabulary shard's part of the KL (tp_reduce asks the caller to sum)
        loss, tp_reduce, _ = LogitsKLLoss(config, temperature=temperature)(copy, teacher[..., shard].clone())
        assert tp_reduce
        (loss * upstream).sum().backward()
        results[f"tp{tp}_loss"] = loss.detach()
        results[f"tp{tp}_grad"] = copy.grad
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_equals_modelopt_logits_kl_times_t_squared(worker_pool, single_rank, temperature):
    """Ours = T^2 x modelopt's (summed over the TP ranks' parts); ours' gradient = T^2 x
    modelopt's autograd gradient, at TP = 1 and on each TP = 2 rank's shard."""
    ranks = worker_pool(2).run(_modelopt_agreement, temperature, 7)
    student, teacher, upstream = _logits(7)
    loss, grad, _ = _ours(student, teacher, temperature, upstream, dist.group.WORLD)
    loss_atol, grad_atol = _tolerances(student, teacher, temperature, upstream)
    scale = temperature ** 2
    torch.testing.assert_close(loss, scale * ranks[0]["tp1_loss"], rtol=0, atol=2 * loss_atol)
    torch.testing.assert_close(grad, scale * ranks[0]["tp1_grad"], rtol=0, atol=2 * grad_atol)
    tp2_loss = scale * (ranks[0]["tp2_loss"] + ranks[1]["tp2_loss"])
    torch.testing.assert_close(loss, tp2_loss, rtol=0, atol=2 * loss_atol)
    for rank in range(2):
        shard = slice(rank * V // 2, (rank + 1) * V // 2)
        torch.testing.assert_close(grad[..., shard], scale * ranks[rank]["tp2_grad"], rtol=0, atol=2 * grad_atol)
