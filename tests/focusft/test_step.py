"""The FocuSFT step's own properties: exact split, steps = 0 is SFT, NaN skipping, no leakage."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_focusft.data.batch import sample_index_from_doc_ids
from megatron_focusft.engine.loss import masked_token_loss
from megatron_focusft.engine.split_model import embed, forward_layers, lm_head_loss
from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.fastweights.linear import fast_weight_layout, init_fast_weights
from megatron_focusft.focusft import FocusftConfig, focusft_forward
from megatron_focusft.models.spec import get_decoder_block_spec
from megatron_focusft.parallel.context import ParallelContext
from tests.helpers.batches import random_batch
from tests.helpers.model import build_tiny_model

FAST = FastWeightConfig(rank=8, alpha=16.0)


def _model(seed: int = 5):
    from megatron.core import parallel_state

    from megatron_focusft.models.gpt import build_gpt_model
    from megatron_focusft.models.presets import get_preset, transformer_config
    from megatron_focusft.models.spec import get_segment_attention_layer_spec

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    preset = get_preset("tiny")
    config = transformer_config(preset)
    spec = get_decoder_block_spec(get_segment_attention_layer_spec("sdpa"), config, FAST)
    return build_gpt_model(config, preset, spec)


def _initial(model, batch, seed: int = 0):
    n = int(sample_index_from_doc_ids(batch.doc_ids).max()) + 1
    return init_fast_weights(fast_weight_layout(model.config, FAST), list(range(seed, seed + n)), FAST.rank)


def test_split_forward_is_gptmodel_forward(single_rank):
    model = build_tiny_model(seed=2)
    batch = random_batch(2, 32, 512, seed=3)
    expected = model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
    hidden, rotary = embed(model, batch.tokens, batch.position_ids)
    hidden = forward_layers(model, hidden, batch.attention, rotary, range(0, 2))
    hidden = forward_layers(model, hidden, batch.attention, rotary, range(2, 4))
    assert torch.equal(lm_head_loss(model, hidden, batch.labels), expected)
    scored = batch.loss_mask.bool()
    partial = lm_head_loss(model, hidden, batch.labels, scored)
    torch.testing.assert_close(partial[scored], expected[scored], rtol=1e-6, atol=1e-6)
    assert not partial[~scored].any()


def test_zero_inner_steps_is_plain_sft_under_the_same_mask(single_rank):
    model = _model()
    batch = random_batch(2, 32, 512, seed=4)
    out = focusft_forward(model, batch, FocusftConfig(inner_steps=0, fast_weights=FAST), _initial(model, batch), ParallelContext.of(model))
    sft = model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
    scored = batch.loss_mask.bool()
    # The step runs the LM head on scored positions only: equal there up to matmul blocking.
    torch.testing.assert_close(out.per_token_loss[scored], sft[scored], rtol=1e-6, atol=1e-6)
    assert not out.per_token_loss[~scored].any()
    params = [p for p in model.parameters()]
    g_focusft = torch.autograd.grad(masked_token_loss(out.per_token_loss, batch.loss_mask)[0], params)
    g_sft = torch.autograd.grad(masked_token_loss(sft, batch.loss_mask)[0], params)
    for a, b in zip(g_focusft, g_sft):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inner_loop_changes_the_loss_and_only_through_fast_weights(single_rank):
    model = _model()
    batch = random_batch(2, 32, 512, seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = focusft_forward(model, batch, FocusftConfig(fast_weights=FAST), _initial(model, batch), ParallelContext.of(model))
    sft = model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
    assert not torch.equal(out.per_token_loss, sft)
    assert float(out.update_norm) > 0
    # The slow weights are untouched by the inner loop, and no fast weight became a parameter.
    after = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("steps, bound, skipped_per_sample", [
    (3, FocusftConfig().max_update_norm, 3),  # the first update is finite but past the bound
    (3, math.inf, 2),  # unbounded: the first update is taken, the second step's loss overflows
    (1, math.inf, 1),  # one finite but absurd update: the outer pass overflows
], ids=["update-norm-bound", "non-finite-inner-loss", "non-finite-outer-activations"])
def test_blow_ups_are_caught_counted_and_trained_with_the_initial_fast_weights(single_rank, steps, bound,
                                                                              skipped_per_sample):
    model = _model()
    batch = random_batch(1, 32, 512, seed=9, max_doc=32)
    initial = _initial(model, batch)
    parallel = ParallelContext.of(model)
    adapted_samples = int((sample_index_from_doc_ids(batch.doc_ids)[batch.loss_mask.bool()]).unique().numel())
    plain = focusft_forward(model, batch, FocusftConfig(inner_steps=0, fast_weights=FAST), initial, parallel)
    # An absurd inner lr: a clipped gradient of norm 1 moves B by 1e30.
    out = focusft_forward(model, batch, FocusftConfig(inner_steps=steps, inner_lr=1e30, max_update_norm=bound,
                                                      fast_weights=FAST), initial, parallel)
    assert int(out.inner.skipped.sum()) == skipped_per_sample * adapted_samples
    for key, (a, b) in out.inner.adapted.items():
        assert torch.equal(a, initial[key][0]) and torch.equal(b, initial[key][1]), key
    assert float(out.update_norm) == 0
    assert torch.equal(out.per_token_loss, plain.per_token_loss)
