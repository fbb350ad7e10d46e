"""Layer and block specs whose adapted linears carry per-sample fast weights.

Only the linear slots named by FastWeightConfig.targets are swapped, and only in the top
`layer_fraction` of the layers; everything else stays the given base spec.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_focusft.attention.spec import final_norm
from megatron_focusft.fastweights.config import FastWeightConfig, adapted_layer_numbers
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


def get_fast_weight_block_spec(
    layer_spec: ModuleSpec,
    model_config: TransformerConfig,
    config: FastWeightConfig,
    *,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec (GPTModel's `transformer_layer_spec`): fast weights in the top layers only.

    Layers adapted_layer_numbers(L, config.layer_fraction) get `with_fast_weights`, the others
    `layer_spec` unchanged. Like get_gpt_decoder_block_spec, the list is sliced to this pipeline
    stage's layers; the final norm is attention.spec.final_norm(layer_spec).
    """
    if model_config.pipeline_model_parallel_layout is not None:
        raise NotImplementedError("a pipeline_model_parallel_layout is not supported with fast weights yet")
    adapted = set(adapted_layer_numbers(model_config.num_layers, config.layer_fraction))
    specs = [with_fast_weights(layer_spec, config, number) if number in adapted else layer_spec
             for number in range(1, model_config.num_layers + 1)]
    offset = get_transformer_layer_offset(model_config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(model_config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=final_norm(layer_spec))
