"""HF config.json <-> ModelPreset: both config layouts (transformers 4's rope_theta/rope_scaling,
5's rope_parameters), the families' specifics, a round trip through the exported config, and
refusals that name the unsupported feature."""

from __future__ import annotations

import pytest

from megatron_focusft.convert.hf_config import UnsupportedModelError, hf_config_from_shape, shape_from_hf_config
from megatron_focusft.models.presets import Llama3RopeScaling, ModelPreset

LLAMA31_V4 = {  # Llama 3.1 8B's config.json as transformers 4 wrote it
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
EXPECTED_LLAMA31 = ModelPreset(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                               num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                               rotary_base=500000.0, norm_epsilon=1e-5, rope_scaling=Llama3RopeScaling())


def test_llama31_in_both_layouts():
    assert shape_from_hf_config(LLAMA31_V4) == EXPECTED_LLAMA31
    v5 = {k: v for k, v in LLAMA31_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA31_V4["rope_scaling"], "rope_theta": 500000.0}
    assert shape_from_hf_config(v5) == EXPECTED_LLAMA31
    old_key = dict(LLAMA31_V4, rope_scaling={**LLAMA31_V4["rope_scaling"], "type": "llama3"})
    del old_key["rope_scaling"]["rope_type"]
    assert shape_from_hf_config(old_key) == EXPECTED_LLAMA31


def test_qwen2_and_mistral_specifics():
    qwen = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768}
    shape = shape_from_hf_config(qwen)
    assert shape.add_qkv_bias and shape.share_embeddings_and_output_weights and shape.head_dim == 64
    mistral = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768, "head_dim": 128,
               "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None}
    shape = shape_from_hf_config(mistral)
    assert not shape.add_qkv_bias and shape.kv_channels is None and shape.head_dim == 128
    # A head size other than hidden / heads is kept.
    assert shape_from_hf_config(dict(mistral, head_dim=96)).kv_channels == 96


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_exported_config_reads_back(family):
    shape = EXPECTED_LLAMA31 if family != "qwen2" else shape_from_hf_config(
        dict(LLAMA31_V4, model_type="qwen2", rope_scaling=None, tie_word_embeddings=True))
    if family == "mistral":
        shape = ModelPreset(**{**shape.to_dict(), "rope_scaling": None})
    config = hf_config_from_shape(shape, family, {"bos_token_id": 7, "eos_token_id": [8, 9]}).to_dict()
    assert config["bos_token_id"] == 7 and config["eos_token_id"] == [8, 9]
    assert shape_from_hf_config(config) == shape


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mixtral"}, r"model_type 'mixtral' is not supported"),
    ({"num_local_experts": 8}, r"mixture-of-experts .*num_local_experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"attention_bias": True}, r"attention_bias"),
    ({"model_type": "mistral", "sliding_window": 4096}, r"sliding-window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096}, r"sliding-window"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"llama3 rope scaling without 'low_freq_factor'"),
])
def test_unsupported_models_are_named(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        shape_from_hf_config({**LLAMA31_V4, **change})
