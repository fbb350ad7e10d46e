"""Model shapes used by tests, the demo, benchmarks and examples: the one place they live."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (HF `rope_type: llama3`): wavelengths above
    original_max_position_embeddings / low_freq_factor are divided by `factor`, those below
    .../high_freq_factor kept, the band between interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a Llama-like decoder: RoPE, SwiGLU, RMSNorm, GQA, no linear biases.

    Also what a checkpoint records about its model (engine/checkpoint.py), so a checkpoint
    is loaded without a preset. kv_channels None: hidden_size / num_attention_heads.
    add_qkv_bias: biases on q/k/v only (Qwen2). share_embeddings_and_output_weights: the
    output layer is the input embedding (tied; Qwen2's small sizes). block_sink_tokens: k
    learned block sink embeddings (block attention, models/block_sinks.py; 0: none).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    kv_channels: int | None = None
    add_qkv_bias: bool = False
    share_embeddings_and_output_weights: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    block_sink_tokens: int = 0

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def weight_shape(self) -> dict:
        """The fields that decide which weights the model has and their sizes (the others
        change only the arithmetic: RoPE, norm epsilon, the position limit)."""
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "ffn_hidden_size": self.ffn_hidden_size,
                "num_attention_heads": self.num_attention_heads, "num_query_groups": self.num_query_groups,
                "vocab_size": self.vocab_size, "kv_channels": self.head_dim, "add_qkv_bias": self.add_qkv_bias,
                "share_embeddings_and_output_weights": self.share_embeddings_and_output_weights,
                "block_sink_tokens": self.block_sink_tokens}

    def to_dict(self) -> dict:
        """Plain values (checkpoint common state, JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelPreset:
        """Inverse of to_dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model shape field(s) {unknown}; expected a subset of {sorted(known)}")
        fields = dict(values)
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = Llama3RopeScaling(**fields["rope_scaling"])
        return cls(**fields)


PRESETS: dict[str, ModelPreset] = {
    # Tests, demo and CPU benchmarks.
    "tiny": ModelPreset(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
                        num_query_groups=2, vocab_size=512, max_position_embeddings=8192),
    # CPU benchmarks of the FocuSFT step: deep enough that the top 35% is 6 of 16 layers.
    "small": ModelPreset(num_layers=16, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
                         num_query_groups=2, vocab_size=512, max_position_embeddings=8192),
    # GPU benchmarks: about 1.2B parameters.
    "1b": ModelPreset(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                      num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                      rotary_base=500000.0),
    # Llama-3-8B shape (examples, communication model).
    "llama3-8b": ModelPreset(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                             num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                             rotary_base=500000.0),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def transformer_config(preset: ModelPreset, **overrides: object) -> TransformerConfig:
    """Megatron TransformerConfig for a preset; overrides set parallelism, dtype, init, etc."""
    fields = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=preset.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=0.02,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def with_layers(preset: ModelPreset, num_layers: int) -> ModelPreset:
    return dataclasses.replace(preset, num_layers=num_layers)
