"""Generation: `causal` greedy decoding equals transformers' own `generate` (tokens and per-step
logits) on the same HF weights; every decoding step over the KV cache equals a full forward
over prompt + generated tokens under the same mask, for both prefill modes and with fast
weights bound; left padding changes nothing; TP = 2 equals TP = 1.

Tolerance TOL = 1e-4 on logits of magnitude ~1-5: fp32 arithmetic in different orders (see
tests/convert/test_import_export.py); a cache or mask mistake moves logits by > 1e-2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_focusft.generation.decode import GenerationConfig, Prompt, generate, prefill_mask
from tests.helpers.hf_models import VOCAB, save_tiny_hf_model

TOL = 1e-4
STEPS = 6


def _prompts(lengths=(11, 7, 9), seed=0) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        # An earlier assistant turn in the middle of prompt i > 0 (a causal block under `focusft`).
        response = [0] * n if i == 0 else [0] * 3 + [1] * 2 + [0] * (n - 5)
        prompts.append(Prompt(tuple(ids), tuple(response)))
    return prompts


def _hf_model(tmp_path, family="llama"):
    from megatron_focusft.generation.loading import load_inference_model
    from tests.helpers.distributed import init_model_parallel

    hf = save_tiny_hf_model(family, tmp_path / family, tokenizer=False)
    init_model_parallel()
    return hf, load_inference_model(hf_path=tmp_path / family).model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_greedy_equals_transformers_generate(single_rank, tmp_path, family):
    hf, model = _hf_model(tmp_path, family)
    prompts = _prompts()
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=STEPS, keep_logits=True))
    for prompt, result in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt.token_ids]), max_new_tokens=STEPS, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        theirs = torch.stack(out.logits, dim=1)[0]
        top2 = theirs.topk(2, dim=-1).values
        assert bool(((top2[:, 0] - top2[:, 1]) > 10 * TOL).all()), "a greedy choice is a near tie: pick another seed"
        assert result.token_ids == out.sequences[0, len(prompt.token_ids):].tolist()
        torch.testing.assert_close(result.logits, theirs, atol=TOL, rtol=0)


def _full_forward_logits(model, tokens: list[int], response: list[int], mode: str, fast_weights=None) -> torch.Tensor:
    from megatron_focusft.fastweights.linear import FastWeightBinding, bind_fast_weights

    ids = torch.tensor([tokens])
    doc = torch.zeros_like(ids)
    mask = prefill_mask(doc, torch.tensor([response]), mode)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        if fast_weights is None:
            return model(ids, positions, mask)[0, -1].float()
        with bind_fast_weights(model, FastWeightBinding(torch.zeros_like(ids), fast_weights)):
            return model(ids, positions, mask)[0, -1].float()


def _check_against_full_forward(model, prompts, results, mode, fast_weights=None):
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        row_weights = None if fast_weights is None else {k: (a[row:row + 1], b[row:row + 1])
                                                         for k, (a, b) in fast_weights.items()}
        for step in range(len(result.token_ids)):
            tokens = list(prompt.token_ids) + result.token_ids[:step]
            response = list(prompt.response) + [1] * step
            expected = _full_forward_logits(model, tokens, response, mode, row_weights)
            torch.testing.assert_close(result.logits[step], expected, atol=TOL, rtol=0,
                                       msg=lambda m: f"row {row} step {step} ({mode}): {m}")


@pytest.mark.parametrize("mode", ["causal", "focusft"])
def test_incremental_decoding_equals_full_forward(single_rank, tmp_path, mode):
    _, model = _hf_model(tmp_path)
    prompts = _prompts()
    config = GenerationConfig(max_new_tokens=STEPS, prefill=mode, keep_logits=True)
    results = generate(model, prompts, config)
    _check_against_full_forward(model, prompts, results, mode)
    # Each prompt alone (no padding) gives the same logits as in the padded batch.
    alone = generate(model, prompts[1:2], config)[0]
    torch.testing.assert_close(alone.logits, results[1].logits, atol=TOL, rtol=0)


def test_focusft_prefill_differs_from_causal(single_rank, tmp_path):
    """The two modes are not the same computation (the prompt's context attends bidirectionally)."""
    _, model = _hf_model(tmp_path)
    prompts = _prompts()[:1]
    causal, focusft = (generate(model, prompts, GenerationConfig(max_new_tokens=1, prefill=m, keep_logits=True))[0]
                       for m in ("causal", "focusft"))
    assert (causal.logits - focusft.logits).abs().max() > 1e-2


def test_sampling_is_seeded_and_stops(single_rank, tmp_path):
    from megatron_focusft.generation.sampling import SamplingConfig

    _, model = _hf_model(tmp_path)
    prompts = _prompts()
    sampled = GenerationConfig(max_new_tokens=STEPS, sampling=SamplingConfig(temperature=1.0, top_k=20, top_p=0.9))
    first, again = generate(model, prompts, sampled), generate(model, prompts, sampled)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    other = generate(model, prompts, dataclasses.replace(sampled, sampling=SamplingConfig(1.0, 20, 0.9, seed=7)))
    assert [r.token_ids for r in other] != [r.token_ids for r in first]
    # Stopping at a token the greedy reply of prompt 0 produces at step 2.
    greedy = generate(model, prompts[:1], GenerationConfig(max_new_tokens=STEPS))[0]
    stop = greedy.token_ids[2]
    stopped = generate(model, prompts[:1], GenerationConfig(max_new_tokens=STEPS, stop_token_ids=(stop,)))[0]
    assert stopped.token_ids == greedy.token_ids[:greedy.token_ids.index(stop) + 1]
    assert stopped.finish_reason == "stop" and greedy.finish_reason == "length"


def _generate_tp(hf_dir: str, mode: str) -> list[torch.Tensor]:
    from megatron_focusft.generation.loading import load_inference_model
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel(tp=2)
    model = load_inference_model(hf_path=hf_dir).model
    results = generate(model, _prompts(), GenerationConfig(max_new_tokens=STEPS, prefill=mode, keep_logits=True))
    return [r.logits for r in results]


@pytest.mark.distributed
def test_tensor_parallel_generation_equals_single_rank(single_rank, worker_pool, tmp_path):
    _, model = _hf_model(tmp_path)
    single = generate(model, _prompts(), GenerationConfig(max_new_tokens=STEPS, prefill="focusft", keep_logits=True))
    for rank_logits in worker_pool(2).run(_generate_tp, str(tmp_path / "llama"), "focusft"):
        for ours, theirs in zip(rank_logits, single):
            torch.testing.assert_close(ours, theirs.logits, atol=TOL, rtol=0)
