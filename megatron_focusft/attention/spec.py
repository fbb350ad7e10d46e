"""Megatron layer specs whose core attention evaluates segment masks."""

from __future__ import annotations

import copy
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_focusft.attention.backends import ATTENTION_BACKENDS
from megatron_focusft.attention.core_attention import SegmentCoreAttention


def with_segment_attention(layer_spec: ModuleSpec, backend: str) -> ModuleSpec:
    """A copy of a stock GPT layer spec with only the `core_attention` slot swapped."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    spec = copy.deepcopy(layer_spec)
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        SegmentCoreAttention, backend=backend
    )
    return spec


def get_segment_attention_layer_spec(backend: str = "sdpa", *, use_transformer_engine: bool = False) -> ModuleSpec:
    """Full Megatron GPT layer spec (RMSNorm, SwiGLU-ready MLP) with segment-mask attention.

    use_transformer_engine picks TE's fused linears/norms as the base spec (needs TE); the
    attention backend is chosen independently.
    """
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        base = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    else:
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
    return with_segment_attention(base, backend)
