"""The one mapping between Hugging Face and Megatron (GPTModel, local spec) tensor names and layouts.

Full (unsharded) tensors on both sides. Megatron fuses q/k/v into `linear_qkv` per query group:
for each of the G groups, [its nh/G query heads; its key head; its value head], each head
`head_dim` rows (the same for the Qwen2 biases, 1-D). It fuses the SwiGLU input projections into
`linear_fc1` as [gate; up]. Under tensor parallelism a rank holds a contiguous run of query
groups of `linear_qkv`, and [its gate rows; its up rows] of `linear_fc1` (`tp_slice`).
RoPE needs no permutation: HF's rotate_half is Megatron's non-interleaved layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from megatron_focusft.models.presets import ModelPreset

HF_PREFIX = "model."

# Tensors that map one to one: (HF name, Megatron name); per-layer names follow the layer prefix.
_GLOBAL = (("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
           ("model.norm.weight", "decoder.final_layernorm.weight"),
           ("lm_head.weight", "output_layer.weight"))
_LAYER = (("input_layernorm.weight", "input_layernorm.weight"),
          ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
          ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
          ("mlp.down_proj.weight", "mlp.linear_fc2.weight"))
_QKV = ("q_proj", "k_proj", "v_proj")


def _qkv_suffixes(shape: ModelPreset) -> tuple[str, ...]:
    return ("weight", "bias") if shape.add_qkv_bias else ("weight",)


def _globals(shape: ModelPreset) -> tuple[tuple[str, str], ...]:
    return _GLOBAL[:2] if shape.share_embeddings_and_output_weights else _GLOBAL


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelPreset) -> torch.Tensor:
    """q [nh*d, ...], k and v [G*d, ...] -> linear_qkv [(nh + 2G)*d, ...], grouped per query group."""
    groups, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // groups
    tail = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail),
                         v.reshape(groups, d, *tail)], dim=1)
    return grouped.reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, shape: ModelPreset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    groups, d = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_tensor_shapes(shape: ModelPreset) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a model of `shape` has, and its shape (what config.json implies)."""
    h, d, ffn, vocab = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size, shape.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not shape.share_embeddings_and_output_weights:
        out["lm_head.weight"] = (vocab, h)
    rows = {"q_proj": shape.num_attention_heads * d, "k_proj": shape.num_query_groups * d,
            "v_proj": shape.num_query_groups * d}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.o_proj.weight": (h, shape.num_attention_heads * d),
                    p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                    p + "mlp.down_proj.weight": (h, ffn)})
        for proj, n in rows.items():
            out[f"{p}self_attn.{proj}.weight"] = (n, h)
            if shape.add_qkv_bias:
                out[f"{p}self_attn.{proj}.bias"] = (n,)
    return out


# Block sink embeddings [k, hidden] (models/block_sinks.py) have no place in a transformers model:
# they travel in a file of their own beside the weights (convert/hf_files.SINKS_FILE).
SINKS_HF_NAME = "focusft.block_sinks"
SINKS_MEGATRON_NAME = "block_sinks.weight"


def megatron_tensor(name: str, read_hf: Callable[[str], torch.Tensor], shape: ModelPreset) -> torch.Tensor:
    """The full Megatron tensor `name` (global layer numbers), built from HF tensors read by `read_hf`."""
    if name == SINKS_MEGATRON_NAME:
        return read_hf(SINKS_HF_NAME)
    if name == "output_layer.weight" and shape.share_embeddings_and_output_weights:
        return read_hf("model.embed_tokens.weight")  # a tied output layer's copy on the last stage
    for hf, megatron in _GLOBAL:
        if name == megatron:
            return read_hf(hf)
    layer, _, rest = name.removeprefix("decoder.layers.").partition(".")
    if not name.startswith("decoder.layers.") or not layer.isdigit():
        raise KeyError(f"no Hugging Face source for Megatron tensor {name!r}")
    hf_layer = f"model.layers.{layer}."
    for hf, megatron in _LAYER:
        if rest == megatron:
            return read_hf(hf_layer + hf)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([read_hf(hf_layer + "mlp.gate_proj.weight"), read_hf(hf_layer + "mlp.up_proj.weight")])
    for suffix in _qkv_suffixes(shape):
        if rest == f"self_attention.linear_qkv.{suffix}":
            return fuse_qkv(*(read_hf(f"{hf_layer}self_attn.{proj}.{suffix}") for proj in _QKV), shape)
    raise KeyError(f"no Hugging Face source for Megatron tensor {name!r}")


def hf_state_dict(megatron: Mapping[str, torch.Tensor], shape: ModelPreset) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a full Megatron state dict (TP = PP = 1 names), in HF order;
    the block sinks are not among them (SINKS_HF_NAME, written to a file of their own)."""
    for hf, name in _globals(shape)[:1]:
        yield hf, megatron[name]
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for suffix in _qkv_suffixes(shape):
            for proj, tensor in zip(_QKV, split_qkv(megatron[f"{src}self_attention.linear_qkv.{suffix}"], shape)):
                yield f"{dst}self_attn.{proj}.{suffix}", tensor
        gate, up = megatron[src + "mlp.linear_fc1.weight"].chunk(2)
        yield dst + "mlp.gate_proj.weight", gate
        yield dst + "mlp.up_proj.weight", up
        for hf, name in _LAYER:
            yield dst + hf, megatron[src + name]
    for hf, name in _globals(shape)[1:]:
        yield hf, megatron[name]


def tp_slice(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of the full Megatron tensor `name`, as `param` holds it.

    Megatron marks sharded parameters with `tensor_model_parallel` and `partition_dim`; a
    column-parallel SwiGLU `linear_fc1` holds [gate shard; up shard], not a contiguous run.
    """
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        return torch.cat([half.chunk(tp_size, dim=dim)[tp_rank] for half in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]
