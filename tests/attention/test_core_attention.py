"""SegmentCoreAttention: Megatron's [s, b, h, d] contract around the backends, and its errors."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_focusft.attention.core_attention import SegmentCoreAttention
from megatron_focusft.masks import dense_mask, segment_mask
from megatron_focusft.models.presets import get_preset, transformer_config
from tests.helpers.layouts import random_layout
from tests.helpers.naive_attention import naive_attention


def _module(**overrides) -> SegmentCoreAttention:
    config = transformer_config(get_preset("tiny"), **overrides)
    return SegmentCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _qkv(s: int, b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = get_preset("tiny")
    d = p.hidden_size // p.num_attention_heads
    q = torch.randn(s, b, p.num_attention_heads, d, generator=g)
    k = torch.randn(s, b, p.num_query_groups, d, generator=g)
    v = torch.randn(s, b, p.num_query_groups, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("kind", ["causal", "focusft", "block"])
def test_matches_naive_attention_in_megatron_layout(kind):
    module = _module()
    layout = random_layout(kind, 2, 30, seed=9, max_doc=16, all_padding_row=True)
    layout.pop("kind")
    q, k, v = _qkv(30, 2, seed=1)
    out = module(q, k, v, segment_mask(kind, **layout))
    to_bhsd = lambda t: t.permute(1, 2, 0, 3)  # noqa: E731
    expected = naive_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), dense_mask(kind, **layout), module.softmax_scale)
    assert out.shape == (30, 2, q.shape[2] * q.shape[3])
    torch.testing.assert_close(out, expected.permute(2, 0, 1, 3).reshape(30, 2, -1), rtol=1e-5, atol=1e-5)


def test_no_mask_means_one_causal_document():
    module = _module()
    q, k, v = _qkv(12, 1, seed=2)
    causal = segment_mask("causal", doc_ids=torch.zeros(1, 12, dtype=torch.long))
    torch.testing.assert_close(module(q, k, v, None), module(q, k, v, causal), rtol=0, atol=0)


def test_rejects_megatron_tensor_masks_and_wrong_shapes():
    module = _module()
    q, k, v = _qkv(8, 1, seed=3)
    with pytest.raises(TypeError, match="SegmentMask"):
        module(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    wrong = segment_mask("causal", doc_ids=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(1, 9\).*s=8"):
        module(q, k, v, wrong)


def test_rejects_attention_dropout():
    with pytest.raises(ValueError, match="dropout"):
        _module(attention_dropout=0.1)
