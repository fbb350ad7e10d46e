"""The one place the decoder spec is assembled: Megatron's GPT layer spec with segment-mask core
attention, and the block spec of a pipeline stage, with fast-weight linears in the top layers."""

from __future__ import annotations

import copy
import functools

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import LayerNormBuilder
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_focusft.attention.backends import attention_backend
from megatron_focusft.attention.core_attention import SegmentCoreAttention
from megatron_focusft.fastweights import FastWeightConfig, adapted_layer_numbers, with_fast_weights
from megatron_focusft.models.norm import RMSNorm


def with_segment_attention(layer_spec: ModuleSpec, backend: str) -> ModuleSpec:
    """A copy of a stock GPT layer spec with only the `core_attention` slot swapped."""
    attention_backend(backend)  # ValueError naming the registered backends
    spec = copy.deepcopy(layer_spec)
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        SegmentCoreAttention, backend=backend
    )
    return spec


def get_segment_attention_layer_spec(backend: str = "sdpa", *, use_transformer_engine: bool = False) -> ModuleSpec:
    """Full Megatron GPT layer spec (RMSNorm, SwiGLU-ready MLP) with segment-mask attention.

    use_transformer_engine picks TE's fused linears/norms as the base spec (needs TE); the
    attention backend is chosen independently. The local spec's norms are models/norm.RMSNorm
    (torch.nn.RMSNorm, as Megatron's local spec builds, but usable with sequence parallelism).
    """
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        base = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    else:
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
        base.submodules.input_layernorm = RMSNorm
        base.submodules.pre_mlp_layernorm = RMSNorm
    return with_segment_attention(base, backend)


def final_norm(layer_spec: ModuleSpec) -> LayerNormBuilder:
    """The decoder's final norm for blocks of `layer_spec`: the layer's own norm where it has one
    (the local spec: RMSNorm), else Megatron's default (TENorm when TE fuses the layer norms)."""
    norm = layer_spec.submodules.input_layernorm
    return LayerNormImpl if norm is IdentityOp else norm


def stage_layer_span(config: TransformerConfig, vp_stage: int | None = None,
                     pp_rank: int | None = None) -> tuple[int, int]:
    """(decoder layers below pipeline stage `pp_rank`'s chunk `vp_stage`, its own decoder layers);
    pp_rank None: this rank's.

    Megatron's get_transformer_layer_offset and get_num_layers_to_build, except that a pipeline
    layout is read from the layout itself: megatron-core 0.19 answers there for the current rank
    whatever pp_rank says, and for chunk 0 whatever vp_stage says unless the global virtual world
    size is set."""
    layout = config.pipeline_model_parallel_layout
    pp = config.pipeline_model_parallel_size
    if layout is not None and pp > 1:
        rank = parallel_state.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
        counts = [layout.layout[s % pp][s // pp].count(LayerType.decoder)
                  for s in range(pp * layout.virtual_pipeline_model_parallel_size)]
        stage = (vp_stage or 0) * pp + rank
        return sum(counts[:stage]), counts[stage]
    return (get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank),
            get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))


def get_decoder_block_spec(
    layer_spec: ModuleSpec,
    config: TransformerConfig,
    fast_weights: FastWeightConfig | None = None,
    *,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec (GPTModel's `transformer_layer_spec`): this pipeline stage's layers and
    `final_norm`. With `fast_weights`, layers adapted_layer_numbers(L, layer_fraction) get
    fast-weight linears (`with_fast_weights`), the others `layer_spec` unchanged.

    What GPTModel builds from a bare layer spec, except that the final norm is chosen by
    `final_norm` instead of Megatron's module default (WrappedTorchNorm without TE or Apex, which
    refuses sequence parallelism).
    """
    offset, count = stage_layer_span(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if fast_weights is None:
        return TransformerBlockSubmodules(layer_specs=[layer_spec] * count, layer_norm=final_norm(layer_spec))
    adapted = set(adapted_layer_numbers(config.num_layers, fast_weights.layer_fraction))
    specs = [with_fast_weights(layer_spec, fast_weights, number) if number in adapted else layer_spec
             for number in range(1, config.num_layers + 1)]
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=final_norm(layer_spec))
