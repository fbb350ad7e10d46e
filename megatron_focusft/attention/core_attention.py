"""Megatron core-attention module that evaluates a SegmentMask with a chosen backend."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_focusft.attention.backends import attention_backend, context_parallel_backend_names
from megatron_focusft.attention.context_parallel import cp_attention
from megatron_focusft.attention.sdpa import sdpa_last_queries_attention
from megatron_focusft.masks import SegmentMask, segment_mask


class SegmentCoreAttention(MegatronModule):
    """Drop-in for Megatron's `core_attention` slot; the `attention_mask` argument is a SegmentMask.

    query [s, b, hq/tp, d], key/value [s, b, hkv/tp, d] -> output [s, b, hq/tp * d]. A mask of
    None means one causal document per row. Attention dropout is not supported (FocuSFT and
    Llama-style models train without it); the config must set attention_dropout = 0.

    Context parallelism (context_parallel_size = cp > 1): the activations hold this rank's
    s = S / cp tokens (load-balanced chunks r and 2cp-1-r, see data/cp_split.py) while the
    mask stays GLOBAL, [b, S]. K/V are all-gathered over the CP group (cp_attention), whatever
    `cp_comm_type` says: Megatron's ring/a2a paths take no custom mask. sdpa runs the dense
    path, flex the BlockMask path (each backend's record names its `cp_path`); te has none.

    Incremental decoding (Megatron's static inference context hands the KV cache in): query
    [q, b, hq/tp, d] holds the last q of the mask's S positions, key/value [S, b, hkv/tp, d]
    all of them; every backend then runs attention.sdpa.sdpa_last_queries_attention.
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
        self.cp_group = None
        self.backend = attention_backend(backend)
        if config.context_parallel_size > 1:
            if self.backend.cp_path is None:
                raise ValueError(f"attention backend {backend!r} has no context-parallel path; with "
                                 f"context_parallel_size = {config.context_parallel_size} use one of "
                                 f"{sorted(context_parallel_backend_names())}")
            cp_group = getattr(pg_collection, "cp", None)
            if cp_group is None:
                cp_group = parallel_state.get_context_parallel_group()
            if dist.get_world_size(cp_group) != config.context_parallel_size:
                raise ValueError(f"config.context_parallel_size = {config.context_parallel_size} but the CP "
                                 f"process group has {dist.get_world_size(cp_group)} ranks")
            self.cp_group = cp_group
        self.layer_number = layer_number
        self.attention_fn = self.backend.load()
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
        if key.shape[0] != seq:
            return self._decode(query, key, value, attention_mask)
        cp_size = 1 if self.cp_group is None else self.config.context_parallel_size
        full_seq = seq * cp_size  # the mask is global: S = s * cp
        mask = attention_mask
        if mask is None:
            mask = segment_mask("causal", doc_ids=torch.zeros(batch, full_seq, dtype=torch.long, device=query.device))
        elif not isinstance(mask, SegmentMask):
            raise TypeError(f"attention_mask must be a megatron_focusft SegmentMask, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, full_seq):
            local = f", this CP rank's s = {seq} tokens of S = s * cp = {full_seq}" if cp_size > 1 else ""
            raise ValueError(f"SegmentMask has shape {tuple(mask.shape)}, attention input is "
                             f"[b={batch}, s={seq}]{local}; the mask must be [b, S]")
        # [s, b, h, d] -> [b, h, s, d], the layout of the backends.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.cp_group is None:
            out = self.attention_fn(q, k, v, mask, self.softmax_scale)
        else:
            out = cp_attention(q, k, v, mask, self.softmax_scale, self.cp_group,
                               backend=self.backend.cp_path)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)

    def _decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: SegmentMask | None) -> torch.Tensor:
        """The last q = query.shape[0] positions of S = key.shape[0] (cached keys and values)."""
        seq, batch = query.shape[:2]
        if self.cp_group is not None:
            raise ValueError("incremental decoding with context parallelism is not supported")
        if not isinstance(mask, SegmentMask) or tuple(mask.shape) != (batch, key.shape[0]):
            raise ValueError(f"decoding {seq} queries over {key.shape[0]} cached keys needs a SegmentMask of "
                             f"shape [b={batch}, S={key.shape[0]}], got "
                             f"{tuple(mask.shape) if isinstance(mask, SegmentMask) else type(mask).__name__}")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = sdpa_last_queries_attention(q, k, v, mask, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
