"""Test-time adaptation: the fast weights adapted on a prompt equal those the training inner loop
(`focusft_forward`, context objective) adapts on a sample whose context is that prompt; batching
with left padding does not change them; generation with them bound equals a full forward.

Tolerance: the same fp32 computations over sequences of different lengths (prompt alone vs
prompt + response; padded vs not): attention sums over masked-out keys add exact zeros, so only
the order of the reductions differs, ~1e-7 relative per op; two SGD steps keep that well inside
rtol 1e-4 / atol 1e-6 (a wrong target or mask changes the update norm by > 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.data.batch import make_batch
from megatron_focusft.fastweights import FastWeightConfig
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.generation.decode import GenerationConfig, Prompt, generate
from tests.generation.test_decode import STEPS, _check_against_full_forward

CONFIG = FocusftConfig(inner_steps=2, inner_lr=0.5, inner_objective="context",
                       fast_weights=FastWeightConfig(rank=4, alpha=8.0))


def _model():
    from megatron_focusft.engine.setup import ModelSetup, build_gpt
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel(seed=5)
    model, _ = build_gpt(ModelSetup(preset="tiny", fast_weights=CONFIG.fast_weights))
    return model.eval()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_adapted_fast_weights_equal_the_training_inner_loop(single_rank):
    from megatron_focusft.focusft.step import focusft_forward
    from megatron_focusft.generation.test_time import adapt_prompts, prompt_fast_weights
    from megatron_focusft.parallel.context import ParallelContext

    model = _model()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(8, 512, (30,), generator=g)
    reply = torch.randint(8, 512, (10,), generator=g)
    tokens = torch.cat([prompt, reply])[None]
    response = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(10, dtype=torch.long)])[None]
    train = make_batch(tokens, torch.zeros_like(tokens), response, mask_kind="focusft")
    initial = prompt_fast_weights(model, CONFIG, [0], seed=3)
    trained = focusft_forward(model, train, CONFIG, initial, ParallelContext.of(model)).inner.adapted
    adapted = adapt_prompts(model, [Prompt.of_tokens(prompt.tolist())], CONFIG, seeds=[0], seed=3)
    _close(adapted, trained)
    moved = sum(float((a - i).abs().max()) for (a, _), (i, _) in zip(adapted.values(), initial.values()))
    assert moved > 1e-3  # the inner loop did change the fast weights


def test_batched_adaptation_and_generation(single_rank):
    from megatron_focusft.generation.test_time import adapt_prompts

    model = _model()
    g = torch.Generator().manual_seed(2)
    prompts = [Prompt.of_tokens(torch.randint(8, 512, (n,), generator=g).tolist()) for n in (20, 13)]
    batched = adapt_prompts(model, prompts, CONFIG, seeds=[10, 11], seed=3)
    alone = adapt_prompts(model, prompts[1:], CONFIG, seeds=[11], seed=3)
    _close({k: (a[1:], b[1:]) for k, (a, b) in batched.items()}, alone)
    for mode in ("causal", "focusft"):
        results = generate(model, prompts, GenerationConfig(max_new_tokens=STEPS, prefill=mode, keep_logits=True),
                           fast_weights=batched)
        _check_against_full_forward(model, prompts, results, mode, fast_weights=batched)


def test_refuses_the_response_objective(single_rank):
    from megatron_focusft.focusft.step import adapt_to_context

    with pytest.raises(ValueError, match="context"):
        adapt_to_context(None, None, FocusftConfig(), {}, None)
