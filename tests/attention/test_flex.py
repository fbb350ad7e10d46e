"""The `flex` backend against naive softmax attention with the dense pairwise mask.

Tensors: query [b, hq, s, d], key/value [b, hkv, s, d]. On CPU FlexAttention runs eagerly
(forward only); on CUDA it is compiled, and gradients are checked there.
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.attention import get_attention_backend
from megatron_focusft.attention.flex import flex_attention_backend
from megatron_focusft.masks import dense_mask, segment_mask
from megatron_focusft.masks.flex import flex_block_mask
from tests.helpers.layouts import random_layout
from tests.helpers.naive_attention import naive_attention

HEAD_DIM = 16
SCALE = HEAD_DIM**-0.5
# fp32 against a float64 reference: differences are at float32 rounding of O(1) outputs.
ATOL, RTOL = 1e-5, 1e-5
CPU_BACKWARD_REASON = (
    "FlexAttention does not support backward on CPU (torch 2.13): flex gradients are checked on CUDA"
)


def _qkv(b: int, hq: int, hkv: int, s: int, seed: int, device: str = "cpu",
         requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, HEAD_DIM, generator=g) for h in (hq, hkv, hkv))
    return tuple(t.to(device).requires_grad_(requires_grad) for t in (q, k, v))


def _check_forward(layout: dict, hq: int, hkv: int, block_size: int, seed: int) -> None:
    mask = segment_mask(**layout)
    dense = dense_mask(**layout)
    b, s = mask.shape
    q, k, v = _qkv(b, hq, hkv, s, seed)
    out = flex_attention_backend(q, k, v, mask, SCALE, block_size=block_size)
    expected = naive_attention(q, k, v, dense, SCALE)
    assert out.shape == (b, hq, s, HEAD_DIM)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    sees_nothing = ~dense.any(dim=-1)
    assert (out.masked_select(sees_nothing[:, None, :, None]) == 0).all()


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("s,block_size", [(64, 16), (75, 16), (96, 32)])
@pytest.mark.parametrize("kind", ["causal", "focusft", "block"])
def test_matches_naive_attention(kind: str, s: int, block_size: int, heads: tuple[int, int]) -> None:
    """Packed documents, trailing padding, an all-padding row (sees nothing: zeros, no NaN)."""
    layout = random_layout(kind, 3, s, seed=s + block_size, max_doc=s // 2, all_padding_row=True)
    _check_forward(layout, *heads, block_size, seed=1)


@pytest.mark.parametrize("kind", ["focusft", "block"])
def test_single_token_blocks(kind: str) -> None:
    """Every block one token long: focusft alternates context/response per token, block kind
    makes every token its own local block (and sink)."""
    layout = random_layout(kind, 2, 48, seed=7, max_doc=20, max_block=1)
    _check_forward(layout, 4, 2, block_size=16, seed=2)


def test_long_blocks_with_sinks_and_small_tiles() -> None:
    """Tiles smaller than blocks: full tiles and tiles kept only for sink keys both occur."""
    layout = random_layout("block", 2, 64, seed=1, max_doc=48, max_block=12)
    _check_forward(layout, 4, 2, block_size=4, seed=3)


def test_registered_as_flex() -> None:
    assert get_attention_backend("flex") is flex_attention_backend


def test_reuses_the_cached_block_mask() -> None:
    layout = random_layout("focusft", 2, 32, seed=4)
    mask = segment_mask(**layout)
    q, k, v = _qkv(2, 2, 2, 32, seed=4)
    flex_attention_backend(q, k, v, mask, SCALE, block_size=16)
    block_mask = flex_block_mask(mask, 16)
    flex_attention_backend(q, k, v, mask, SCALE, block_size=16)
    assert flex_block_mask(mask, 16) is block_mask


def test_new_masks_do_not_retrace() -> None:
    """Each step brings a new mask (a new mask_mod closure); it must not cost a new trace.

    Even eager flex_attention traces its call through dynamo; the compiled CUDA kernel is keyed
    the same way, so a retrace per step would mean a kernel compile per step.
    """
    counters = torch._dynamo.utils.counters
    q, k, v = _qkv(2, 4, 2, 48, seed=5)
    for kind in ("focusft", "focusft", "causal"):
        flex_attention_backend(q, k, v, segment_mask(**random_layout(kind, 2, 48, seed=0)), SCALE, block_size=16)
    graphs_before = counters["stats"]["unique_graphs"]
    for seed in range(1, 4):
        for kind in ("causal", "focusft"):
            mask = segment_mask(**random_layout(kind, 2, 48, seed=seed))
            flex_attention_backend(q, k, v, mask, SCALE, block_size=16)
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_cpu_backward_is_unsupported_by_torch() -> None:
    """Pins the reason the gradient test below is CUDA-only: if torch adds CPU backward, this
    fails, and gradients should then be tested on CPU as well."""
    layout = random_layout("causal", 1, 16, seed=0)
    q, k, v = _qkv(1, 2, 2, 16, seed=0, requires_grad=True)
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        flex_attention_backend(q, k, v, segment_mask(**layout), SCALE, block_size=16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["causal", "focusft", "block"])
def test_gradients_match_naive_attention(kind: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip(CPU_BACKWARD_REASON)
    # Compiled kernels tile at 128 or 64: sequences of several tiles, a ragged end, GQA.
    s = 300
    layout = random_layout(kind, 2, s, seed=11, max_doc=160, max_block=60, all_padding_row=True)
    layout = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in layout.items()}
    mask = segment_mask(**layout)
    dense = dense_mask(**layout)
    q, k, v = _qkv(2, 4, 2, s, seed=6, device="cuda", requires_grad=True)
    grad_out = torch.randn(2, 4, s, HEAD_DIM, device="cuda")

    out = flex_attention_backend(q, k, v, mask, SCALE)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = naive_attention(q, k, v, dense, SCALE)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)

    # The fused kernel reorders fp32 sums (and may use TF32 matmuls): a looser bound than CPU.
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    for name, grad, ref in zip("qkv", grads, expected_grads):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, ref, atol=2e-3, rtol=2e-3, msg=f"d{name}")
