"""RMSNorm for the local (non-TE) layer spec, usable with sequence parallelism.

Megatron's local spec builds its norms with WrappedTorchNorm, which returns a plain
torch.nn.RMSNorm but asserts that sequence parallelism is off. The norm is per token, so under
sequence parallelism only one thing changes: each tensor-parallel rank normalises its own
sequence shard, so its weight gradient is a partial sum over tokens. Megatron's
finalize_model_grads all-reduces, over the TP group, the gradient of every parameter marked
`sequence_parallel = True` when config.sequence_parallel is set; this module marks its weight
that way. Forward and backward are torch.nn.RMSNorm's, so the numerics equal WrappedTorchNorm's
with or without sequence parallelism.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm built from Megatron's norm-builder arguments (config, hidden_size, eps).

    The remaining keyword arguments exist only for signature compatibility with Megatron's norm
    builders; the settings they name are read from the config and refused as WrappedTorchNorm
    refuses them.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for a config with normalization={config.normalization!r}")
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag):
                raise ValueError(f"RMSNorm (torch) does not support config.{flag}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # finalize_model_grads sums this weight's gradient over the TP group under SP.
        self.weight.sequence_parallel = config.sequence_parallel
