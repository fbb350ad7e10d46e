"""Hugging Face `config.json` <-> ModelPreset, for the families this project converts.

Llama (2, 3, 3.1 with rope type llama3), Qwen2 / Qwen2.5 (QKV bias) and Mistral without a
sliding window: RMSNorm, SwiGLU, RoPE (HF's rotate_half layout, Megatron's non-interleaved
one), GQA or MHA, tied or untied embeddings. Anything else is refused by name before a file is
written. Both config layouts are read: transformers 4's `rope_theta` + `rope_scaling` and
transformers 5's `rope_parameters`.
"""

from __future__ import annotations

from typing import Any

from megatron_focusft.models.presets import Llama3RopeScaling, ModelPreset

# model_type -> the HF architecture class written on export.
FAMILIES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedModelError(ValueError):
    """A Hugging Face model this converter cannot represent; the message names the feature."""


def family_of(config: dict[str, Any], source: str) -> str:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} is not supported; supported: "
                                    f"{sorted(FAMILIES)} (architectures {config.get('architectures')})")
    return model_type


def _rope(config: dict[str, Any], source: str) -> tuple[float, Llama3RopeScaling | None]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                                    f"(supported: none, 'llama3')")
    try:
        return float(theta), Llama3RopeScaling(
            factor=float(merged["factor"]), low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]))
    except KeyError as e:
        raise UnsupportedModelError(f"{source}: llama3 rope scaling without {e.args[0]!r}") from None


def _refuse_features(config: dict[str, Any], family: str, source: str) -> None:
    moe = [key for key in _MOE_KEYS if config.get(key)]
    if moe:
        raise UnsupportedModelError(f"{source}: mixture-of-experts models are not supported ({moe[0]} = {config[moe[0]]})")
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if config.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias = true is not supported")
    if family == "llama" and config.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias = true (biases on q/k/v and o_proj) is not supported")
    layer_types = config.get("layer_types") or []
    sliding = (config.get("use_sliding_window", family == "mistral") and config.get("sliding_window") is not None) \
        or any(kind != "full_attention" for kind in layer_types)
    if sliding:
        raise UnsupportedModelError(f"{source}: sliding-window attention is not supported (sliding_window = "
                                    f"{config.get('sliding_window')}, use_sliding_window = "
                                    f"{config.get('use_sliding_window')})")
    if config.get("pretraining_tp", 1) != 1:
        raise UnsupportedModelError(f"{source}: pretraining_tp = {config['pretraining_tp']} is not supported")


# Keys of an exported config.json that transformers ignores: the block sink tokens of a model
# trained with them (their embeddings are in hf_files.SINKS_FILE) and a note saying so.
SINK_TOKENS_KEY = "focusft_block_sink_tokens"
SINK_NOTE_KEY = "focusft_note"
SINK_NOTE = ("block sink embeddings [focusft_block_sink_tokens, hidden_size] are in block_sinks.safetensors: "
             "transformers does not use them; `focusft generate --blocks --hf-path` does")


def shape_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelPreset:
    """The ModelPreset of an HF config dict; UnsupportedModelError names what we cannot convert."""
    family = family_of(config, source)
    _refuse_features(config, family, source)
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        theta, scaling = _rope(config, source)
        head_dim = config.get("head_dim")
        return ModelPreset(
            num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
            ffn_hidden_size=int(config["intermediate_size"]), num_attention_heads=heads,
            num_query_groups=int(config.get("num_key_value_heads") or heads), vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config["max_position_embeddings"]), rotary_base=theta,
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            kv_channels=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
            add_qkv_bias=family == "qwen2",
            share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=scaling, block_sink_tokens=int(config.get(SINK_TOKENS_KEY, 0)))
    except KeyError as e:
        raise UnsupportedModelError(f"{source}: missing {e.args[0]!r}") from None


def default_family(shape: ModelPreset) -> str:
    """The family a checkpoint trained here exports as when it has no source config."""
    return "qwen2" if shape.add_qkv_bias else "llama"


def hf_config_from_shape(shape: ModelPreset, family: str, source: dict[str, Any] | None = None) -> Any:
    """A transformers config object for `shape`: the shape's fields set, the source config's
    others (token ids, dtype, ...) kept when it is given."""
    import transformers

    if shape.add_qkv_bias != (family == "qwen2"):
        raise UnsupportedModelError(f"a model with add_qkv_bias = {shape.add_qkv_bias} cannot be exported as {family}")
    keep = {k: v for k, v in (source or {}).items()
            if k not in ("rope_scaling", "rope_theta", "rope_parameters", "architectures", "transformers_version",
                         SINK_TOKENS_KEY, SINK_NOTE_KEY)}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": shape.rotary_base}
    if shape.rope_scaling is not None:
        s = shape.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": shape.rotary_base, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    fields = dict(
        keep, model_type=family, architectures=[FAMILIES[family]], num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_query_groups,
        head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.norm_epsilon,
        tie_word_embeddings=shape.share_embeddings_and_output_weights, hidden_act="silu", rope_parameters=rope)
    if family == "mistral":
        fields["sliding_window"] = None
    if shape.block_sink_tokens:
        fields.update({SINK_TOKENS_KEY: shape.block_sink_tokens, SINK_NOTE_KEY: SINK_NOTE})
    return transformers.CONFIG_MAPPING[family](**fields)
