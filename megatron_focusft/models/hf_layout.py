"""Weight layout mapping between Megatron's GPTModel (TP = 1) and Hugging Face Llama names.

Megatron fuses q/k/v into `linear_qkv` grouped per KV head: for each of the G query groups,
[its H/G query heads, its key head, its value head], each head `head_dim` rows. It fuses the
SwiGLU input projections into `linear_fc1` as [gate; up].
"""

from __future__ import annotations

import torch

from megatron_focusft.models.presets import ModelPreset


def _split_qkv(qkv: torch.Tensor, preset: ModelPreset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head_dim = preset.hidden_size // preset.num_attention_heads
    groups = preset.num_query_groups
    q_per_group = preset.num_attention_heads // groups
    grouped = qkv.view(groups, q_per_group + 2, head_dim, -1)
    q = grouped[:, :q_per_group].reshape(groups * q_per_group * head_dim, -1)
    k = grouped[:, q_per_group].reshape(groups * head_dim, -1)
    v = grouped[:, q_per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: ModelPreset) -> torch.Tensor:
    head_dim = preset.hidden_size // preset.num_attention_heads
    groups = preset.num_query_groups
    q_per_group = preset.num_attention_heads // groups
    hidden = q.shape[-1]
    grouped = torch.cat(
        [q.view(groups, q_per_group, head_dim, hidden), k.view(groups, 1, head_dim, hidden),
         v.view(groups, 1, head_dim, hidden)], dim=1)
    return grouped.reshape(-1, hidden)


# Tensors that map one to one: (HF name, Megatron name); per-layer names follow the layer prefix.
_GLOBAL_NAMES = (("embed_tokens.weight", "embedding.word_embeddings.weight"),
                 ("norm.weight", "decoder.final_layernorm.weight"),
                 ("lm_head.weight", "output_layer.weight"))
_LAYER_NAMES = (("input_layernorm.weight", "input_layernorm.weight"),
                ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
                ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
                ("mlp.down_proj.weight", "mlp.linear_fc2.weight"))


def _renamed(num_layers: int) -> list[tuple[str, str]]:
    pairs = list(_GLOBAL_NAMES)
    for i in range(num_layers):
        pairs += [(f"layers.{i}.{hf}", f"decoder.layers.{i}.{megatron}") for hf, megatron in _LAYER_NAMES]
    return pairs


def megatron_to_hf(state_dict: dict[str, torch.Tensor], preset: ModelPreset) -> dict[str, torch.Tensor]:
    """HF Llama state dict (model.-less names, e.g. `layers.0.mlp.gate_proj.weight`) from Megatron's."""
    out = {hf: state_dict[megatron] for hf, megatron in _renamed(preset.num_layers)}
    for i in range(preset.num_layers):
        src, dst = f"decoder.layers.{i}.", f"layers.{i}."
        q, k, v = _split_qkv(state_dict[src + "self_attention.linear_qkv.weight"], preset)
        gate, up = state_dict[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v, dst + "mlp.gate_proj.weight": gate,
                    dst + "mlp.up_proj.weight": up})
    return {name: tensor.clone() for name, tensor in out.items()}


def hf_to_megatron(weights: dict[str, torch.Tensor], preset: ModelPreset) -> dict[str, torch.Tensor]:
    """Inverse of `megatron_to_hf`: Megatron parameter names and fused layouts."""
    out = {megatron: weights[hf] for hf, megatron in _renamed(preset.num_layers)}
    for i in range(preset.num_layers):
        src, dst = f"layers.{i}.", f"decoder.layers.{i}."
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            weights[src + "self_attn.q_proj.weight"], weights[src + "self_attn.k_proj.weight"],
            weights[src + "self_attn.v_proj.weight"], preset)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [weights[src + "mlp.gate_proj.weight"], weights[src + "mlp.up_proj.weight"]], dim=0)
    return {name: tensor.clone() for name, tensor in out.items()}
