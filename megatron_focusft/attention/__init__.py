"""Attention for segment masks: backends and the Megatron core-attention module."""

from megatron_focusft.attention.backends import (
    AttentionBackend,
    attention_backend,
    attention_backend_names,
    get_attention_backend,
    register_attention_backend,
)

__all__ = ["AttentionBackend", "attention_backend", "attention_backend_names", "get_attention_backend",
           "register_attention_backend"]
