"""Attention for segment masks: backends and the Megatron core-attention module."""

from megatron_focusft.attention.backends import ATTENTION_BACKENDS, get_attention_backend

__all__ = ["ATTENTION_BACKENDS", "get_attention_backend"]
