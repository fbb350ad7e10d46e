"""A layer spec whose adapted linears carry per-sample fast weights.

Only the linear slots named by FastWeightConfig.targets are swapped; which layers are adapted
(the top `layer_fraction`) is chosen where the block spec is assembled (models/spec.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.fastweights.linear import FastWeightColumnParallelLinear, FastWeightRowParallelLinear

# target -> (the submodules holder, its field, the base class the slot must hold, our subclass)
_SLOTS = {
    "qkv": ("self_attention", "linear_qkv", ColumnParallelLinear, FastWeightColumnParallelLinear),
    "proj": ("self_attention", "linear_proj", RowParallelLinear, FastWeightRowParallelLinear),
    "fc1": ("mlp", "linear_fc1", ColumnParallelLinear, FastWeightColumnParallelLinear),
    "fc2": ("mlp", "linear_fc2", RowParallelLinear, FastWeightRowParallelLinear),
}


def _with_slot(holder, field: str, builder):
    """A copy of a submodule spec (ModuleSpec or functools.partial(..., submodules=...)) with one field replaced."""
    if isinstance(holder, ModuleSpec):
        holder = copy.copy(holder)
        holder.submodules = dataclasses.replace(holder.submodules, **{field: builder})
        return holder
    if isinstance(holder, functools.partial) and "submodules" in holder.keywords:
        submodules = dataclasses.replace(holder.keywords["submodules"], **{field: builder})
        return functools.partial(holder.func, *holder.args, **{**holder.keywords, "submodules": submodules})
    raise TypeError(f"cannot swap {field} in a submodule spec of type {type(holder).__name__}")


def _slot(holder, field: str):
    submodules = holder.submodules if isinstance(holder, ModuleSpec) else holder.keywords["submodules"]
    return getattr(submodules, field)


def with_fast_weights(layer_spec: ModuleSpec, config: FastWeightConfig, layer_number: int) -> ModuleSpec:
    """A copy of a GPT layer spec for Megatron layer `layer_number` (1-based) with fast-weight linears.

    The base spec's target slots must hold Megatron's local ColumnParallelLinear /
    RowParallelLinear (TE's fused layernorm-linears are not supported yet).
    """
    spec = copy.deepcopy(layer_spec)
    for target in config.targets:
        holder_name, field, base, ours = _SLOTS[target]
        holder = getattr(spec.submodules, holder_name)
        if _slot(holder, field) is not base:
            raise TypeError(f"fast weights on {target} need Megatron's local {base.__name__} in "
                            f"{holder_name}.{field}, the spec holds {_slot(holder, field)!r}")
        builder = functools.partial(ours, fast_weight_target=target, fast_weight_layer=layer_number,
                                    fast_weight_config=config)
        setattr(spec.submodules, holder_name, _with_slot(holder, field, builder))
    return spec
