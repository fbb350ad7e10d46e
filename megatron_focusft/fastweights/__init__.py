"""Per-sample fast weights: transient LoRA-style adapters on tensor-parallel Megatron linears."""

from megatron_focusft.fastweights.config import FastWeightConfig, adapted_layer_numbers, target_projections
from megatron_focusft.fastweights.linear import (
    SHARD_DIMS,
    FastWeightBinding,
    FastWeightColumnParallelLinear,
    FastWeightRowParallelLinear,
    FastWeightShape,
    bind_fast_weights,
    fast_weight_layout,
    fast_weight_modules,
    init_fast_weights,
    shard_fast_weights,
)
from megatron_focusft.fastweights.segmented import TokenGroups, segmented_matmul
from megatron_focusft.fastweights.spec import with_fast_weights

__all__ = [
    "SHARD_DIMS",
    "FastWeightBinding",
    "FastWeightColumnParallelLinear",
    "FastWeightConfig",
    "FastWeightRowParallelLinear",
    "FastWeightShape",
    "TokenGroups",
    "adapted_layer_numbers",
    "bind_fast_weights",
    "fast_weight_layout",
    "fast_weight_modules",
    "init_fast_weights",
    "segmented_matmul",
    "shard_fast_weights",
    "target_projections",
    "with_fast_weights",
]
