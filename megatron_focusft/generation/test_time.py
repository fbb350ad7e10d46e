"""Test-time adaptation for generation: the FocuSFT inner loop on each prompt (context objective)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from megatron.core.models.gpt import GPTModel

from megatron_focusft.data.batch import make_batch
from megatron_focusft.fastweights.linear import FastWeights, fast_weight_layout, init_fast_weights
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.focusft.step import adapt_to_context
from megatron_focusft.generation.decode import Prompt, PromptBatch
from megatron_focusft.parallel.context import ParallelContext


def prompt_fast_weights(model: GPTModel, config: FocusftConfig, seeds: Iterable[int], seed: int) -> FastWeights:
    """Initial (unsharded) fast weights of prompts: prompt i seeded by (seed, seeds[i]), so a
    prompt's adaptation does not depend on the batch it runs in."""
    layout = fast_weight_layout(model.config, config.fast_weights)
    device = next(model.parameters()).device
    return init_fast_weights(layout, [seed * 1_000_003 + i for i in seeds], config.fast_weights.rank,
                             dtype=model.config.params_dtype, device=device)


def adapt_prompts(model: GPTModel, prompts: Sequence[Prompt], config: FocusftConfig, *, seeds: Iterable[int],
                  seed: int, pad_id: int = 0) -> FastWeights:
    """This rank's adapted fast-weight shards of `prompts` (sample r = prompt r), for `generate`."""
    device = next(model.parameters()).device
    padded = PromptBatch.of(prompts, pad_id, device)
    batch = make_batch(padded.tokens, padded.doc_ids, torch.zeros_like(padded.tokens), mask_kind="focusft")
    initial = prompt_fast_weights(model, config, seeds, seed)
    return adapt_to_context(model, batch, config, initial, ParallelContext.of(model)).adapted
