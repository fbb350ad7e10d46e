"""The one seam where the model class is chosen: Megatron's GPTModel with our layer spec."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from megatron.core.utils import unwrap_model

from megatron_focusft.fastweights import FastWeightConfig
from megatron_focusft.models.block_sinks import add_block_sinks
from megatron_focusft.models.presets import Llama3RopeScaling, ModelPreset
from megatron_focusft.models.spec import get_decoder_block_spec

_SHAPE_ATTR = "focusft_shape"


def build_gpt_model(
    config: TransformerConfig,
    preset: ModelPreset,
    layer_spec: ModuleSpec | TransformerBlockSubmodules,
    fast_weights: FastWeightConfig | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> GPTModel:
    """A Llama-like GPTModel of shape `preset` (RoPE, optional Llama 3 RoPE scaling, tied or
    untied output layer); logits come out [b, s, vocab/tp].

    A layer spec is made a block spec here (models.spec.get_decoder_block_spec) so that the
    final norm matches the layers' norms instead of Megatron's module default. The preset is
    kept on the model (`model_shape`): checkpoints record it.
    """
    if isinstance(layer_spec, ModuleSpec) and issubclass(layer_spec.module, BaseTransformerLayer):
        layer_spec = get_decoder_block_spec(layer_spec, config, fast_weights, vp_stage=vp_stage)
    scaling = preset.rope_scaling
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=preset.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=preset.rotary_base,
        rope_scaling=scaling is not None,
        rope_scaling_factor=scaling.factor if scaling is not None else 8.0,
    )
    if scaling is not None and scaling != Llama3RopeScaling(factor=scaling.factor):
        _rescale_rope(model, preset.rotary_base, scaling)
    add_block_sinks(model, preset.block_sink_tokens)
    setattr(model, _SHAPE_ATTR, preset)
    return model


def _rescale_rope(model: GPTModel, rotary_base: float, scaling: Llama3RopeScaling) -> None:
    """GPTModel passes only the factor to Megatron's Llama 3 scaling (the other three fixed at
    Llama 3.1's values); apply Megatron's own scaling again from the unscaled frequencies with
    all four."""
    rope = model.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    unscaled = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    rope.inv_freq = rope._apply_scaling(unscaled, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                                        high_freq_factor=scaling.high_freq_factor,
                                        original_max_position_embeddings=scaling.original_max_position_embeddings)


def model_shape(model: torch.nn.Module) -> ModelPreset:
    """The shape a model (or its DDP wrapper) was built with by `build_gpt_model`."""
    shape = getattr(unwrap_model(model), _SHAPE_ATTR, None)
    if shape is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} was not built by build_gpt_model: its shape is unknown")
    return shape
