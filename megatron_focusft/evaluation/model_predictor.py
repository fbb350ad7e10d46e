"""A predictor over a model: greedy generation through `focusft generate`'s machinery, in any
of its modes (`causal` / `focusft` prefill, test-time adaptation, block attention with KV reuse)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.evaluation.harness import Prediction
from megatron_focusft.evaluation.samples import EvalSample
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.generation.blocks import BlockKVCache, BlockPrompt, generate_with_blocks
from megatron_focusft.generation.decode import Generation, GenerationConfig, Prompt, generate
from megatron_focusft.generation.loading import InferenceModel
from megatron_focusft.generation.prompts import block_prompt_of_row
from megatron_focusft.generation.test_time import adapt_prompts

ATTENTION_MODES: tuple[str, ...] = ("full", "block")


def check_attention(attention: str, prefill: str, test_time_adaptation: bool) -> None:
    """ValueError for an attention mode that cannot run with these generation settings."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"--attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if attention == "block" and (prefill != "causal" or test_time_adaptation):
        raise ValueError("--attention block runs the block mask: no --prefill focusft, no --test-time-adaptation")


@dataclasses.dataclass
class ModelPredictor:
    """chat: render each sample as one user turn with the tokenizer's chat template (else the
    raw prompt text). The answer prefix, when a sample has one, starts the reply.

    A sample's prompt is its local blocks (block tasks; each encoded alone) then its global block
    (the rendered user turn). attention "full": that whole prompt, prefilled as
    `generation.prefill` says (batched); "block": block attention with KV reuse
    (`generate_with_blocks`, one sample at a time), every block looked up in `cache`, one
    BlockKVCache for all the samples this predictor sees (its hits count the reuse)."""

    loaded: InferenceModel
    tokenizer: ChatTokenizer
    generation: GenerationConfig
    chat: bool = True
    test_time_adaptation: FocusftConfig | None = None
    seed: int = 1234
    attention: str = "full"
    cache: BlockKVCache = dataclasses.field(default_factory=BlockKVCache)
    _seen: int = 0

    def __post_init__(self) -> None:
        check_attention(self.attention, self.generation.prefill, self.test_time_adaptation is not None)

    def _parts(self, sample: EvalSample) -> tuple[BlockPrompt, int]:
        """The sample as a block prompt (the answer prefix ends its global block) and the prefix's length."""
        prefix = tuple(self.tokenizer.encode(sample.answer_prefix)) if sample.answer_prefix else ()
        if self.chat:
            row = {"blocks": list(sample.blocks), "messages": [{"role": "user", "content": sample.prompt}]}
            base = block_prompt_of_row(row, self.tokenizer, self.loaded.shape.vocab_size,
                                       f"{sample.task} sample {sample.index}")
        elif sample.blocks:
            raise ValueError(f"{sample.task}: a block task's global block is a chat turn; use the chat prompt format")
        else:
            base = BlockPrompt((), tuple(self.tokenizer.encode_prompt(sample.prompt)))
        return BlockPrompt(base.blocks, base.global_block + prefix), len(prefix)

    def block_prompt(self, sample: EvalSample) -> BlockPrompt:
        return self._parts(sample)[0]

    def prompt(self, sample: EvalSample) -> Prompt:
        """The full-attention prompt: every token of the block prompt, the answer prefix a response."""
        blocks, prefix = self._parts(sample)
        tokens = blocks.tokens()
        return Prompt(tuple(tokens), (0,) * (len(tokens) - prefix) + (1,) * prefix)

    def _generate(self, samples: Sequence[EvalSample], config: GenerationConfig) -> tuple[list[int], list[Generation]]:
        """(prompt tokens, generation) per sample, in the attention mode."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.attention == "block":
            prompts = [self.block_prompt(s) for s in samples]
            return ([len(p.tokens()) for p in prompts],
                    [generate_with_blocks(self.loaded.model, p, config, self.cache, generator) for p in prompts])
        prompts = [self.prompt(s) for s in samples]
        fast = None
        if self.test_time_adaptation is not None:
            seeds = range(self._seen, self._seen + len(prompts))
            fast = adapt_prompts(self.loaded.model, prompts, self.test_time_adaptation, seeds=seeds, seed=self.seed,
                                 pad_id=self.tokenizer.pad_id)
        return ([len(p.token_ids) for p in prompts],
                generate(self.loaded.model, prompts, config, pad_id=self.tokenizer.pad_id, fast_weights=fast,
                         generator=generator))

    def __call__(self, samples: Sequence[EvalSample]) -> list[Prediction]:
        config = dataclasses.replace(self.generation, max_new_tokens=max(s.max_new_tokens for s in samples))
        sizes, results = self._generate(samples, config)
        self._seen += len(samples)
        stops = set(config.stop_token_ids)
        return [Prediction(self.tokenizer.decode([t for t in r.token_ids if t not in stops]), size,
                           tuple(r.token_ids)) for size, r in zip(sizes, results)]
