"""A predictor over a model: greedy generation through `focusft generate`'s machinery, in any
of its modes (`causal` / `focusft` prefill, test-time adaptation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_focusft.data.tokenizer import ChatTokenizer, flatten_segments
from megatron_focusft.evaluation.harness import Prediction
from megatron_focusft.evaluation.samples import EvalSample
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.generation.decode import GenerationConfig, Prompt, generate
from megatron_focusft.generation.loading import InferenceModel
from megatron_focusft.generation.test_time import adapt_prompts


@dataclasses.dataclass
class ModelPredictor:
    """chat: render each sample as one user turn with the tokenizer's chat template (else the
    raw prompt text). The answer prefix, when a sample has one, starts the reply."""

    loaded: InferenceModel
    tokenizer: ChatTokenizer
    generation: GenerationConfig
    chat: bool = True
    test_time_adaptation: FocusftConfig | None = None
    seed: int = 1234
    _seen: int = 0

    def prompt(self, sample: EvalSample) -> Prompt:
        if self.chat:
            ids, response = flatten_segments(self.tokenizer.render_prompt([{"role": "user", "content": sample.prompt}]))
        else:
            ids = self.tokenizer.encode_prompt(sample.prompt)
            response = [0] * len(ids)
        prefix = self.tokenizer.encode(sample.answer_prefix) if sample.answer_prefix else []
        return Prompt(tuple(ids + prefix), tuple(response + [1] * len(prefix)))

    def __call__(self, samples: Sequence[EvalSample]) -> list[Prediction]:
        prompts = [self.prompt(s) for s in samples]
        config = dataclasses.replace(self.generation, max_new_tokens=max(s.max_new_tokens for s in samples))
        fast = None
        if self.test_time_adaptation is not None:
            seeds = range(self._seen, self._seen + len(prompts))
            fast = adapt_prompts(self.loaded.model, prompts, self.test_time_adaptation, seeds=seeds, seed=self.seed,
                                 pad_id=self.tokenizer.pad_id)
        self._seen += len(prompts)
        results = generate(self.loaded.model, prompts, config, pad_id=self.tokenizer.pad_id, fast_weights=fast,
                           generator=torch.Generator().manual_seed(self.seed))
        stops = set(config.stop_token_ids)
        return [Prediction(self.tokenizer.decode([t for t in r.token_ids if t not in stops]), len(p.token_ids),
                           tuple(r.token_ids)) for p, r in zip(prompts, results)]
