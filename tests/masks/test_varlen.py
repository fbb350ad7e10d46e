"""The varlen plan: exact against the dense reference mask, and its structural invariants."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.masks import MASK_KINDS, dense_mask, segment_mask
from megatron_focusft.masks.varlen import VarlenCall, varlen_plan
from tests.helpers.layouts import random_layout
from tests.helpers.naive_attention import naive_attention
from tests.helpers.varlen_executor import plan_to_dense, varlen_sdpa_attention

BATCH, SEQ = 3, 40

# Layout variants: plain packing, many short documents, single-token blocks only, and a row
# that is all padding.
VARIANTS = {
    "packed": dict(),
    "short_docs": dict(max_doc=7),
    "single_token_blocks": dict(max_block=1),
    "all_padding_row": dict(all_padding_row=True),
}


def _layout(kind: str, variant: str, seed: int) -> dict:
    return random_layout(kind, BATCH, SEQ, seed=seed, **VARIANTS[variant])


def _segments(call: VarlenCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_q, n_kv), each [n] long, from the cu_seqlens."""
    return call.cu_seqlens_q.diff().long(), call.cu_seqlens_kv.diff().long()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_plan_computes_the_dense_mask_exactly(kind: str, variant: str, seed: int) -> None:
    layout = _layout(kind, variant, seed)
    plan = varlen_plan(segment_mask(**layout))
    assert torch.equal(plan_to_dense(plan, BATCH, SEQ), dense_mask(**layout))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_plan_invariants(kind: str, variant: str, seed: int) -> None:
    layout = _layout(kind, variant, seed)
    mask = segment_mask(**layout)
    plan = varlen_plan(mask)
    real = (layout["doc_ids"] >= 0).reshape(-1)

    assert 1 <= len(plan) <= 2
    assert [call.causal for call in plan] in ([True], [False], [True, False])
    for call in plan:
        n_q, n_kv = _segments(call)
        for cu, index in ((call.cu_seqlens_q, call.q_index), (call.cu_seqlens_kv, call.kv_index)):
            assert cu.dtype == torch.int32 and cu.dim() == 1
            assert int(cu[0]) == 0 and int(cu[-1]) == index.numel()
            assert index.dtype == torch.long
            assert real[index].all(), "a padding token is in a call"
        assert call.cu_seqlens_q.shape == call.cu_seqlens_kv.shape
        assert (n_q >= 1).all() and (n_kv >= n_q).all()
        assert call.max_seqlen_q == int(n_q.max()) and call.max_seqlen_kv == int(n_kv.max())
        # The block's own tokens close its key list, in order: what bottom-right causal needs.
        for i, (q_seg, kv_seg) in enumerate(zip(call.q_index.split(n_q.tolist()),
                                                call.kv_index.split(n_kv.tolist()))):
            assert torch.equal(kv_seg[-q_seg.numel():], q_seg), f"segment {i}: own block not last"
            assert torch.equal(q_seg, torch.arange(int(q_seg[0]), int(q_seg[0]) + q_seg.numel()))
            assert kv_seg.unique().numel() == kv_seg.numel(), f"segment {i}: a key twice"
            assert (kv_seg.diff() > 0).all(), f"segment {i}: keys out of order"
    # Every real token is the query of exactly one segment.
    queries = torch.cat([call.q_index for call in plan]).sort().values
    assert torch.equal(queries, real.nonzero().squeeze(1))


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("variant", ["packed", "single_token_blocks", "all_padding_row"])
def test_executor_matches_naive_attention(kind: str, hq: int, hkv: int, variant: str) -> None:
    layout = _layout(kind, variant, seed=11)
    mask = segment_mask(**layout)
    dense = dense_mask(**layout)
    g = torch.Generator().manual_seed(3)
    shape_q, shape_kv = (BATCH, hq, SEQ, 8), (BATCH, hkv, SEQ, 8)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, generator=g, dtype=torch.float64)
    scale = 0.3

    out = varlen_sdpa_attention(q, k, v, mask, scale)
    ref = naive_attention(q, k, v, dense, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")
    padding = (layout["doc_ids"] < 0)[:, None, :, None].expand_as(out)
    assert (out[padding] == 0).all()


def test_focusft_plan_by_hand() -> None:
    # One sample: context [0, 1], response [2, 3], context [4], response [5].
    doc_ids = torch.zeros(1, 6, dtype=torch.long)
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1]])
    causal, full = varlen_plan(segment_mask("focusft", doc_ids=doc_ids, loss_mask=loss_mask))
    assert causal.causal and not full.causal
    assert causal.q_index.tolist() == [2, 3, 5]
    assert causal.kv_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert causal.cu_seqlens_q.tolist() == [0, 2, 3] and causal.cu_seqlens_kv.tolist() == [0, 4, 10]
    assert full.q_index.tolist() == [0, 1, 4]
    assert full.kv_index.tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert (full.max_seqlen_q, full.max_seqlen_kv) == (2, 5)


def test_block_plan_with_sinks_by_hand() -> None:
    # Local blocks [0, 1, 2] and [3, 4] with sinks 0 and 3; global block [5, 6].
    doc_ids = torch.zeros(1, 7, dtype=torch.long)
    block_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    sink_mask = torch.tensor([[1, 0, 0, 1, 0, 0, 0]])
    (call,) = varlen_plan(segment_mask("block", doc_ids=doc_ids, block_ids=block_ids, sink_mask=sink_mask))
    assert call.causal
    assert call.q_index.tolist() == list(range(7))
    # The global block sees the local blocks without their sinks, then itself.
    assert call.kv_index.tolist() == [0, 1, 2, 3, 4, 1, 2, 4, 5, 6]
    assert call.cu_seqlens_kv.tolist() == [0, 3, 5, 10]


def test_causal_plan_duplicates_nothing() -> None:
    layout = _layout("causal", "short_docs", seed=5)
    (call,) = varlen_plan(segment_mask(**layout))
    assert call.causal
    # One segment per document, keys == queries: the plan costs no extra K/V memory.
    assert torch.equal(call.kv_index, call.q_index)
    assert torch.equal(call.cu_seqlens_kv, call.cu_seqlens_q)


def test_plan_is_cached_per_mask() -> None:
    mask = segment_mask(**_layout("focusft", "packed", seed=0))
    assert varlen_plan(mask) is varlen_plan(mask)


def test_all_padding_batch_has_an_empty_plan() -> None:
    doc_ids = torch.full((2, 5), -1, dtype=torch.long)
    mask = segment_mask("causal", doc_ids=doc_ids)
    assert varlen_plan(mask) == ()
    q = torch.randn(2, 2, 5, 4)
    out = varlen_sdpa_attention(q, q, q, mask, 0.5)
    assert out.shape == q.shape and (out == 0).all()
