"""The `te` backend: Transformer Engine varlen attention against naive attention.

Three levels, from what runs everywhere to what needs the real thing:
- without TE, asking for the backend raises ImportError naming the `te` extra;
- on CPU, a stand-in for TE's DotProductAttention that asserts the API contract the backend
  relies on (THD shapes, int32 cu_seqlens, padding mask types, GQA heads, cross attention)
  and computes with the SDPA segment executor: proves the backend's own glue (module cache,
  gathers, output reshape, scatter, gradients), not TE;
- on CUDA with TE installed, the real backend, outputs and gradients, in bf16.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator

import pytest
import torch

from megatron_focusft.attention import get_attention_backend
from megatron_focusft.masks import MASK_KINDS, dense_mask, segment_mask
from megatron_focusft.masks.varlen import VarlenCall
from tests.helpers.layouts import random_layout
from tests.helpers.naive_attention import naive_attention
from tests.helpers.varlen_executor import sdpa_varlen_attention

TE_MODULE = "megatron_focusft.attention.te"
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def test_missing_transformer_engine_names_the_extra() -> None:
    if HAVE_TE:
        pytest.skip("transformer_engine is installed; the missing-dependency message cannot be seen")
    with pytest.raises(ImportError, match=r"pip install megatron-focusft\[te\]"):
        get_attention_backend("te")


class FakeDotProductAttention(torch.nn.Module):
    """Stand-in for transformer_engine.pytorch.DotProductAttention, THD path only.

    Asserts the arguments the backend must pass (as read in TE's docstrings and checks) and
    answers the way TE does for THD: output [t, heads * head_dim].
    """

    constructed: list[dict] = []
    forward_training_flags: list[bool] = []

    def __init__(self, num_attention_heads: int, kv_channels: int | tuple[int, int], num_gqa_groups: int,
                 attention_dropout: float, qkv_format: str, attn_mask_type: str, attention_type: str,
                 softmax_scale: float) -> None:
        super().__init__()
        assert qkv_format == "thd" and attention_type == "cross" and attention_dropout == 0.0
        assert attn_mask_type in ("padding", "padding_causal_bottom_right"), attn_mask_type
        assert num_attention_heads % num_gqa_groups == 0
        self.heads, self.kv_heads = num_attention_heads, num_gqa_groups
        self.d_qk, self.d_v = (kv_channels, kv_channels) if isinstance(kv_channels, int) else kv_channels
        self.causal = attn_mask_type == "padding_causal_bottom_right"
        self.scale = softmax_scale
        FakeDotProductAttention.constructed.append(dict(heads=num_attention_heads, mask=attn_mask_type))

    def forward(self, query_layer: torch.Tensor, key_layer: torch.Tensor, value_layer: torch.Tensor, *,
                qkv_format: str, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor,
                max_seqlen_q: int, max_seqlen_kv: int) -> torch.Tensor:
        assert qkv_format == "thd"
        assert query_layer.dim() == key_layer.dim() == value_layer.dim() == 3
        assert query_layer.shape[1:] == (self.heads, self.d_qk)
        assert key_layer.shape[1:] == (self.kv_heads, self.d_qk)
        assert value_layer.shape[1:] == (self.kv_heads, self.d_v)
        assert cu_seqlens_q.dtype == cu_seqlens_kv.dtype == torch.int32
        assert cu_seqlens_q.shape == cu_seqlens_kv.shape and cu_seqlens_q.dim() == 1
        assert int(cu_seqlens_q[-1]) == query_layer.shape[0] and int(cu_seqlens_kv[-1]) == key_layer.shape[0]
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_kv, int)
        assert max_seqlen_q >= int(cu_seqlens_q.diff().max())
        assert max_seqlen_kv >= int(cu_seqlens_kv.diff().max())
        FakeDotProductAttention.forward_training_flags.append(self.training)
        empty = torch.empty(0, dtype=torch.long)
        call = VarlenCall(empty, empty, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, self.causal)
        out = sdpa_varlen_attention(query_layer, key_layer, value_layer, call, self.scale)
        return out.reshape(out.shape[0], -1)


@pytest.fixture
def te_with_fake_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """megatron_focusft.attention.te imported over the fake engine; the real state is restored after."""
    package = types.ModuleType("transformer_engine")
    package.pytorch = types.ModuleType("transformer_engine.pytorch")
    package.pytorch.DotProductAttention = FakeDotProductAttention
    monkeypatch.setitem(sys.modules, "transformer_engine", package)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", package.pytorch)
    parent = importlib.import_module("megatron_focusft.attention")
    saved_module = sys.modules.pop(TE_MODULE, None)
    saved_attr = parent.__dict__.get("te")
    FakeDotProductAttention.constructed.clear()
    FakeDotProductAttention.forward_training_flags.clear()
    try:
        yield importlib.import_module(TE_MODULE)
    finally:
        sys.modules.pop(TE_MODULE, None)
        parent.__dict__.pop("te", None)
        if saved_module is not None:
            sys.modules[TE_MODULE] = saved_module
        if saved_attr is not None:
            parent.te = saved_attr


def _inputs(batch: int, seq: int, hq: int, hkv: int, dim: int, dtype: torch.dtype, device: str,
            seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, dim, generator=g)
    k, v = (torch.randn(batch, hkv, seq, dim, generator=g) for _ in range(2))
    grad_out = torch.randn(batch, hq, seq, dim, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, grad_out))


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2)])
def test_backend_glue_with_fake_engine(te_with_fake_engine: types.ModuleType, kind: str, hq: int,
                                       hkv: int) -> None:
    layout = random_layout(kind, 2, 32, seed=7, all_padding_row=True)
    mask, dense = segment_mask(**layout), dense_mask(**layout)
    q, k, v, grad_out = _inputs(2, 32, hq, hkv, 8, torch.float64, "cpu", seed=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = 0.25

    out = te_with_fake_engine.te_attention(q, k, v, mask, scale)
    ref = naive_attention(q, k, v, dense, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                         torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert all(FakeDotProductAttention.forward_training_flags), "grad mode on: TE must keep backward state"

    # One module per (shape, scale, mask type): a second pass constructs nothing new.
    built = len(FakeDotProductAttention.constructed)
    assert built == len({c["mask"] for c in FakeDotProductAttention.constructed}) <= 2
    with torch.no_grad():
        te_with_fake_engine.te_attention(q, k, v, mask, scale)
    assert len(FakeDotProductAttention.constructed) == built
    assert not FakeDotProductAttention.forward_training_flags[-1]


def test_backend_rejects_a_mask_on_another_device(te_with_fake_engine: types.ModuleType) -> None:
    layout = random_layout("causal", 1, 8, seed=0)
    mask = segment_mask(**layout).to("meta")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="mask is on meta"):
        te_with_fake_engine.te_attention(q, q, q, mask, 0.5)


def _require_real_te() -> None:
    if not HAVE_TE:
        pytest.skip("transformer_engine is not installed")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (Transformer Engine attention runs on CUDA only)")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (8, 2)])
@pytest.mark.parametrize("max_block", [1, 48])
def test_te_backend_matches_naive_attention(kind: str, hq: int, hkv: int, max_block: int) -> None:
    _require_real_te()
    batch, seq, dim = 2, 256, 64
    layout = random_layout(kind, batch, seq, seed=3, max_block=max_block, all_padding_row=True)
    mask = segment_mask(**layout).to("cuda")
    dense = dense_mask(**layout).to("cuda")
    q, k, v, grad_out = _inputs(batch, seq, hq, hkv, dim, torch.bfloat16, "cuda", seed=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = dim ** -0.5
    te_attention = get_attention_backend("te")

    out = te_attention(q, k, v, mask, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # The reference sees the same bf16 values, computed in float64: the error is TE's bf16 noise.
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = naive_attention(q64, k64, v64, dense, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())

    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2, msg=lambda m: f"d{name}: {m}")
    padding = (layout["doc_ids"] < 0).to("cuda")[:, None, :, None].expand_as(out)
    assert (out[padding] == 0).all()
