"""The attention backends: one registration each, the only list of them.

Contract of a backend function: ``fn(query, key, value, mask, scale) -> out`` with
query [b, hq, s, d], key/value [b, hkv, s, d] (hq a multiple of hkv: GQA), mask a SegmentMask
of shape [b, s], out [b, hq, s, d]. Rows that see no key (padding) return zeros, never NaN.

A new backend is one module holding its function plus one `register_attention_backend` call
below; the model spec, context parallelism, the training flags and the CLI read the record.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_focusft.masks import SegmentMask
from megatron_focusft.masks.flex import FLEX_BLOCK_SIZE
from megatron_focusft.registry import Registry

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SegmentMask, float], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """What the rest of the package needs to know about one backend.

    name           the value of --attention-backend / --backend.
    function       "module:attribute" of the backend function, imported on first use (optional
                   dependencies such as Transformer Engine load only when chosen).
    cp_path        the context-parallel path of attention/context_parallel.cp_attention that
                   evaluates the same mask ("dense" | "flex"), None: no CP support.
    chunk_multiple tokens a CP chunk must be a multiple of (whole flex tiles), 1: any.
    cpu_backward   whether its gradient runs off CUDA (tests and benchmarks skip it otherwise).
    help           one line for --help.
    """

    name: str
    function: str
    cp_path: str | None
    chunk_multiple: int
    cpu_backward: bool
    help: str

    def load(self) -> AttentionFn:
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")


def register_attention_backend(backend: AttentionBackend) -> AttentionBackend:
    return _BACKENDS.register(backend.name, backend)


def attention_backend(name: str) -> AttentionBackend:
    """The record of backend `name`; ValueError lists the registered ones."""
    return _BACKENDS.get(name)


def attention_backend_names() -> tuple[str, ...]:
    return _BACKENDS.names()


def context_parallel_backend_names() -> tuple[str, ...]:
    """The backends with a context-parallel path."""
    return tuple(backend.name for backend in _BACKENDS if backend.cp_path is not None)


def get_attention_backend(name: str) -> AttentionFn:
    """The backend function called `name`; ImportError says what is missing for optional ones."""
    return attention_backend(name).load()


register_attention_backend(AttentionBackend(
    "sdpa", "megatron_focusft.attention.sdpa:sdpa_attention", cp_path="dense", chunk_multiple=1, cpu_backward=True,
    help="torch scaled_dot_product_attention on the dense mask (any device; the reference path)"))
register_attention_backend(AttentionBackend(
    "flex", "megatron_focusft.attention.flex:flex_attention_backend", cp_path="flex", chunk_multiple=FLEX_BLOCK_SIZE,
    cpu_backward=False, help="torch FlexAttention with an exact BlockMask (compiled on CUDA; forward only on CPU)"))
register_attention_backend(AttentionBackend(
    "te", "megatron_focusft.attention.te:te_attention", cp_path=None, chunk_multiple=1, cpu_backward=False,
    help="Transformer Engine fused attention over varlen runs (needs transformer_engine; no CP)"))
