"""Activation recomputation: the same gradients and inner-loop logs with less kept for backward.

FocuSFT runs its layers through split_model.forward_layers, which checkpoints groups of layers
itself (re-binding the fast weights when the backward recomputes a group); plain SFT runs
GPTModel.forward, where Megatron's TransformerBlock checkpoints. Each configuration is compared
with the same model and batches without recomputation, through Megatron's schedule and DDP.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.engine.split_model import recompute_groups
from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.focusft import FocusftConfig, make_focusft_forward_step
from tests.helpers.batches import random_batch
from tests.helpers.model import fast_weights_with_random_b

FAST = FastWeightConfig(rank=8, alpha=16.0)  # tiny: 4 layers, 3 and 4 adapted


def _config(method: str, num_layers: int) -> TransformerConfig:
    return TransformerConfig(num_layers=6, hidden_size=8, num_attention_heads=2, recompute_granularity="full",
                             recompute_method=method, recompute_num_layers=num_layers)


@pytest.mark.parametrize("method, n, layers, expected", [
    ("uniform", 1, range(0, 6), [(range(i, i + 1), True) for i in range(6)]),
    ("uniform", 2, range(1, 6), [(range(1, 2), True), (range(2, 4), True), (range(4, 6), True)]),
    ("uniform", 4, range(0, 3), [(range(0, 3), True)]),
    ("block", 2, range(0, 6), [(range(0, 1), True), (range(1, 2), True), (range(2, 6), False)]),
    ("block", 2, range(3, 5), [(range(3, 5), False)]),
])
def test_recompute_groups_follow_megatrons_methods(method, n, layers, expected):
    assert recompute_groups(_config(method, n), layers) == expected


def _step(recompute: dict, focusft: dict | None) -> dict:
    """One forward/backward of two packed micro-batches; logs, main_grads and bytes saved for backward."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_focusft.engine.setup import ModelSetup, build_model
    from megatron_focusft.sft import sft_forward_step

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(5)
    model, config = build_model(ModelSetup(fast_weights=FAST if focusft else None, **recompute))
    batches = [random_batch(2, 48, 512, seed=seed, max_doc=24) for seed in (61, 62)]
    if focusft is None:
        forward_step = sft_forward_step
    else:
        forward_step = make_focusft_forward_step(FocusftConfig(fast_weights=FAST, **focusft),
                                                 lambda batch: fast_weights_with_random_b(config, FAST, batch))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad_buffer()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=2,
            seq_length=48, micro_batch_size=2, forward_only=False)
    grads = {name: p.main_grad.clone() for name, p in model.module.named_parameters()}
    return {"logs": logs, "grads": grads, "saved_bytes": sum(saved)}


@pytest.mark.parametrize("focusft", [None, {"inner_objective": "response"}, {"inner_objective": "context"}],
                         ids=["sft", "focusft-response", "focusft-context"])
@pytest.mark.parametrize("method, n", [("uniform", 1), ("block", 3)])
def test_full_recomputation_changes_nothing_but_memory(single_rank, focusft, method, n):
    plain = _step({}, focusft)
    recomputed = _step({"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": n},
                       focusft)
    for got, expected in zip(recomputed["logs"], plain["logs"], strict=True):  # same ops: bitwise
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
    for name, grad in plain["grads"].items():
        assert torch.equal(recomputed["grads"][name], grad), name
    assert grad.abs().sum() > 0
    # Checkpointed layers keep only their input: at least 3 of the 4 layers' activations go.
    assert recomputed["saved_bytes"] < 0.5 * plain["saved_bytes"]


@pytest.mark.parametrize("focusft", [None, {"inner_objective": "response"}], ids=["sft", "focusft"])
def test_selective_recomputation_is_refused(single_rank, focusft):
    with pytest.raises(ValueError, match="use 'full'"):
        _step({"recompute_granularity": "selective"}, focusft)
