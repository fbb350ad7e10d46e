"""The one seam where the model class is chosen: Megatron's GPTModel with our layer spec."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from megatron_focusft.fastweights import FastWeightConfig
from megatron_focusft.models.presets import ModelPreset
from megatron_focusft.models.spec import get_decoder_block_spec


def build_gpt_model(
    config: TransformerConfig,
    preset: ModelPreset,
    layer_spec: ModuleSpec | TransformerBlockSubmodules,
    fast_weights: FastWeightConfig | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:
    """A Llama-like GPTModel (RoPE, untied embeddings); logits come out [b, s, vocab/tp].

    A layer spec is made a block spec here (attention.spec.get_segment_attention_block_spec) so
    that the final norm matches the layers' norms instead of Megatron's module default.
    """
    if isinstance(layer_spec, ModuleSpec) and issubclass(layer_spec.module, BaseTransformerLayer):
        layer_spec = get_decoder_block_spec(layer_spec, config, fast_weights)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(preset.rotary_base),
    )
