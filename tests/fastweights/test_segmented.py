"""segmented_lora against a naive per-token loop in float64: values, -1 tokens, gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.fastweights.segmented import TokenGroups
from tests.helpers.fast_weights import segmented_lora


def naive_lora(x: torch.Tensor, sample_of_token: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
    """Token by token: scale * B_s (A_s x_t), zero for tokens of no sample."""
    rows = []
    for t in range(x.shape[0]):
        s = int(sample_of_token[t])
        rows.append(torch.zeros(B.shape[1], dtype=x.dtype) if s < 0 else scale * (B[s] @ (A[s] @ x[t])))
    return torch.stack(rows)


def _case(num_tokens: int, n: int, seed: int, d_in: int = 7, d_out: int = 5, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_in, generator=g, dtype=torch.float64)
    # Shuffled samples and padding, one sample (n - 1) left without tokens.
    sample = torch.randint(-1, max(n - 1, 1), (num_tokens,), generator=g)
    sample[0] = 0
    A = torch.randn(n, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)
    return x, sample, A, B


@pytest.mark.parametrize("num_tokens,n,seed", [(23, 4, 0), (1, 1, 1), (2, 2, 3), (40, 6, 2)])
def test_matches_naive_loop_with_gradients(num_tokens, n, seed):
    x, sample, A, B = _case(num_tokens, n, seed)
    scale = 2.5
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    expected_leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    out = segmented_lora(*leaves[:1], sample, *leaves[1:], scale)
    expected = naive_lora(expected_leaves[0], sample, *expected_leaves[1:], scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(out[sample < 0] == 0)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, cotangent)
    expected_grads = torch.autograd.grad(expected, expected_leaves, cotangent)
    for name, got, want in zip(("x", "A", "B"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"d/d{name}: {m}")
    # Padding tokens get no gradient; a sample with no token gets zero gradient.
    assert torch.all(grads[0][sample < 0] == 0)
    missing = [s for s in range(n) if not (sample == s).any()]
    for s in missing:
        assert torch.all(grads[1][s] == 0) and torch.all(grads[2][s] == 0)


def test_passes_gradcheck():
    x, sample, A, B = _case(9, 3, seed=5, d_in=4, d_out=3, r=2)
    leaves = [t.requires_grad_() for t in (x, A, B)]
    assert torch.autograd.gradcheck(lambda x_, A_, B_: segmented_lora(x_, sample, A_, B_, 0.7), leaves)


def test_token_groups_keep_token_order_and_drop_padding():
    sample = torch.tensor([2, -1, 0, 2, 0, -1, 2])
    groups = TokenGroups.from_sample_index(sample, num_samples=4)
    assert groups.order.tolist() == [2, 4, 0, 3, 6]
    assert groups.counts == (2, 0, 3, 0)
    assert groups.num_tokens == 7


def test_all_padding_gives_zero():
    x = torch.randn(5, 4, dtype=torch.float64)
    A, B = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    out = segmented_lora(x, torch.full((5,), -1), A, B, 1.0)
    assert out.shape == (5, 6) and torch.all(out == 0)


def test_rejects_bad_sample_indices_and_shapes():
    x = torch.randn(4, 4)
    A, B = torch.randn(2, 3, 4), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="sample indices"):
        segmented_lora(x, torch.tensor([0, 2, 1, -1]), A, B, 1.0)
    with pytest.raises(ValueError, match="sample indices"):
        segmented_lora(x, torch.tensor([0, -2, 1, -1]), A, B, 1.0)
    with pytest.raises(ValueError, match="long"):
        segmented_lora(x, torch.tensor([0, 1, 1, -1], dtype=torch.int32), A, B, 1.0)
    with pytest.raises(ValueError, match=r"\[n, r, in\]"):
        segmented_lora(x, torch.tensor([0, 1, 1, -1]), A, torch.randn(3, 5, 3), 1.0)
