"""In-process tiny Megatron models for single-rank tests (needs the `single_rank` fixture)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_focusft.models.gpt import build_gpt_model
from megatron_focusft.models.presets import get_preset, transformer_config
from megatron_focusft.models.spec import get_segment_attention_layer_spec


def build_tiny_model(seed: int, backend: str = "sdpa", preset: str = "tiny", **overrides) -> GPTModel:
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    p = get_preset(preset)
    return build_gpt_model(transformer_config(p, **overrides), p, get_segment_attention_layer_spec(backend))


def reference_config(name: str = "tiny"):
    """The independent reference's config for a preset (tests/reference/focusft_reference.py)."""
    from tests.reference import focusft_reference as ref

    p = get_preset(name)
    return ref.LlamaConfig(vocab=p.vocab_size, hidden=p.hidden_size, ffn=p.ffn_hidden_size, layers=p.num_layers,
                           heads=p.num_attention_heads, kv_heads=p.num_query_groups,
                           head_dim=p.hidden_size // p.num_attention_heads, rope_base=p.rotary_base,
                           norm_eps=p.norm_epsilon)


def fast_weights_with_random_b(model_config, fast, batch) -> dict:
    """Initial fast weights of a micro-batch's samples (per-sample seeds 100, 101, ...), unsharded,
    with a random B: B = 0 is the method's init; a random B also gives A a first-step gradient."""
    from megatron_focusft.data.batch import sample_index_from_doc_ids
    from megatron_focusft.fastweights.linear import fast_weight_layout, init_fast_weights

    n = int(sample_index_from_doc_ids(batch.doc_ids).max()) + 1
    weights = init_fast_weights(fast_weight_layout(model_config, fast), list(range(100, 100 + n)), fast.rank)
    g = torch.Generator().manual_seed(7)
    return {k: (a, 0.05 * torch.randn(b.shape, generator=g)) for k, (a, b) in weights.items()}


def reference_weights(state: dict, shape) -> dict:
    """A full Megatron state dict in the reference's names (HF Llama's without `model.`)."""
    from megatron_focusft.convert.state_dict import hf_state_dict

    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    return {name.removeprefix("model."): tensor for name, tensor in hf_state_dict(state, shape)}


def megatron_weights(weights: dict, shape, names) -> dict:
    """Inverse of reference_weights for the Megatron tensors `names`."""
    from megatron_focusft.convert.state_dict import megatron_tensor

    return {name: megatron_tensor(name, lambda hf: weights[hf.removeprefix("model.")], shape) for name in names}
