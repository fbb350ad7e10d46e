"""Megatron core-attention module that evaluates a SegmentMask with a chosen backend."""

from __future__ import annotations

import math

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_focusft.attention.backends import get_attention_backend
from megatron_focusft.masks import SegmentMask, segment_mask


class SegmentCoreAttention(MegatronModule):
    """Drop-in for Megatron's `core_attention` slot; the `attention_mask` argument is a SegmentMask.

    query [s, b, hq/tp, d], key/value [s, b, hkv/tp, d] -> output [s, b, hq/tp * d]. A mask of
    None means one causal document per row. Attention dropout is not supported (FocuSFT and
    Llama-style models train without it); the config must set attention_dropout = 0.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        backend: str = "sdpa",
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SegmentCoreAttention supports no attention dropout; got {dropout}")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SegmentCoreAttention does not support apply_query_key_layer_scaling")
        if config.context_parallel_size != 1:
            raise ValueError("SegmentCoreAttention runs with context_parallel_size = 1 "
                             f"(got {config.context_parallel_size})")
        self.layer_number = layer_number
        self.backend_name = backend
        self.attention_fn = get_attention_backend(backend)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        tp_size = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp_size)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: SegmentMask | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SegmentCoreAttention takes packing from the SegmentMask; "
                             "attention_bias and packed_seq_params must be None")
        seq, batch = query.shape[:2]
        mask = attention_mask
        if mask is None:
            mask = segment_mask("causal", doc_ids=torch.zeros(batch, seq, dtype=torch.long, device=query.device))
        elif not isinstance(mask, SegmentMask):
            raise TypeError(f"attention_mask must be a megatron_focusft SegmentMask, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, seq):
            raise ValueError(f"SegmentMask has shape {tuple(mask.shape)}, attention input is [b={batch}, s={seq}]")
        # [s, b, h, d] -> [b, h, s, d], the layout of the backends.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self.attention_fn(q, k, v, mask, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
