"""Batched generation with Megatron's static KV cache (`StaticInferenceContext`).

Prompts are left-padded into one [b, P] batch (padding is document -1: it sees and is seen by
nothing). The prefill runs the whole prompt under the prefill mask, `causal` or `focusft`
(context blocks bidirectional, earlier assistant turns causal; `masks.segment_mask`), then each
new token is one decoding step over the cache, causal: it sees every earlier token. That is
exact for both modes: under the FocuSFT mask no prompt token attends to a later position
outside its block, and a prompt's blocks all end where the prompt ends, so the cached keys and
values are what a full forward over prompt + generated tokens computes for them.

RoPE positions count from the first (padded) column: attention depends only on the distance
between positions, so a padded row equals the unpadded prompt (up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_focusft.fastweights.linear import FastWeightBinding, FastWeights, bind_fast_weights
from megatron_focusft.generation.sampling import SamplingConfig, next_tokens
from megatron_focusft.masks import SegmentMask, segment_mask

PREFILL_MODES: tuple[str, ...] = ("causal", "focusft")


@dataclass(frozen=True)
class Prompt:
    """token_ids of a prompt and a response flag per token (1 on earlier assistant turns, which
    the `focusft` prefill keeps causal; 0 on context)."""

    token_ids: tuple[int, ...]
    response: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a prompt needs at least one token")
        if len(self.response) != len(self.token_ids):
            raise ValueError(f"{len(self.token_ids)} prompt tokens but {len(self.response)} response flags")

    @classmethod
    def of_tokens(cls, token_ids: Sequence[int]) -> Prompt:
        return cls(tuple(int(t) for t in token_ids), (0,) * len(token_ids))


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    prefill: str = "causal"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_token_ids: tuple[int, ...] = ()
    keep_logits: bool = False  # each step's logits [vocab] in the result

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"--prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")


@dataclass
class Generation:
    """One prompt's new tokens (the stop token included when it ended the reply), why it ended
    ("stop" or "length"), and with keep_logits its logits [steps, vocab] fp32."""

    token_ids: list[int]
    finish_reason: str
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts; every tensor [b, P]. doc_ids 0 on prompt tokens, -1 on padding."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    response: torch.Tensor

    @classmethod
    def of(cls, prompts: Sequence[Prompt], pad_id: int, device: torch.device | str) -> PromptBatch:
        width = max(len(p.token_ids) for p in prompts)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        doc_ids = torch.full_like(tokens, -1)
        response = torch.zeros_like(tokens)
        for row, prompt in enumerate(prompts):
            start = width - len(prompt.token_ids)
            tokens[row, start:] = torch.tensor(prompt.token_ids)
            response[row, start:] = torch.tensor(prompt.response)
            doc_ids[row, start:] = 0
        return cls(tokens.to(device), doc_ids.to(device), response.to(device))


def prefill_mask(doc_ids: torch.Tensor, response: torch.Tensor, mode: str) -> SegmentMask:
    """The mask over every position so far ([b, S]): the prefill mode's, generated tokens being
    response tokens (causal, seeing their whole prefix)."""
    if mode == "causal":
        return segment_mask("causal", doc_ids=doc_ids)
    return segment_mask("focusft", doc_ids=doc_ids, loss_mask=response)


def _sample_index(doc_ids: torch.Tensor) -> torch.Tensor:
    """Row r's tokens belong to sample r (the fast weights' numbering); padding to none."""
    rows = torch.arange(doc_ids.shape[0], device=doc_ids.device)[:, None].expand_as(doc_ids)
    return torch.where(doc_ids >= 0, rows, torch.full_like(rows, -1))


def _forward(model: GPTModel, tokens: torch.Tensor, start: int, mask: SegmentMask, context: StaticInferenceContext,
             fast_weights: FastWeights | None) -> torch.Tensor:
    """Logits of the last position, [b, vocab] fp32 over the whole vocabulary, for tokens at
    positions [start, start + s) of the cache."""
    s = tokens.shape[1]
    positions = torch.arange(start, start + s, device=tokens.device).expand_as(tokens)
    if fast_weights is None:
        logits = model(tokens, positions, attention_mask=mask, inference_context=context)
    else:
        binding = FastWeightBinding(_sample_index(mask.doc_ids[:, start:start + s]), fast_weights)
        with bind_fast_weights(model, binding):
            logits = model(tokens, positions, attention_mask=mask, inference_context=context)
    context.sequence_len_offset += s
    return gather_from_tensor_model_parallel_region(logits[:, -1:].contiguous())[:, -1].float()


@torch.no_grad()
def generate(model: GPTModel, prompts: Sequence[Prompt], config: GenerationConfig, *, pad_id: int = 0,
             fast_weights: FastWeights | None = None, generator: torch.Generator | None = None) -> list[Generation]:
    """Continue each prompt by up to `config.max_new_tokens` tokens (collective over TP).

    fast_weights: this rank's adapted fast-weight shards of the prompts (sample r = prompt r;
    `adapt_to_context`), bound for the prefill and every decoding step; None for a model
    without fast weights. generator: the sampling generator (CPU; seeded from the config when
    None). A row stops at a stop token; decoding ends when every row has stopped.
    """
    if model.config.sequence_parallel or model.config.context_parallel_size > 1:
        raise ValueError("generation runs without sequence or context parallelism")
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs the whole model on each rank (pipeline size 1)")
    device = next(model.parameters()).device
    batch = PromptBatch.of(prompts, pad_id, device)
    b, width = batch.tokens.shape
    if generator is None:
        generator = torch.Generator().manual_seed(config.sampling.seed)
    context = StaticInferenceContext(b, width + config.max_new_tokens)
    doc_ids, response = batch.doc_ids, batch.response
    model.eval()
    logits = _forward(model, batch.tokens, 0, prefill_mask(doc_ids, response, config.prefill), context, fast_weights)
    stop = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    generated: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(config.max_new_tokens):
        if config.keep_logits:
            kept.append(logits.cpu())
        token = next_tokens(logits, config.sampling, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        done = done | torch.isin(token, stop)
        if bool(done.all()) or step == config.max_new_tokens - 1:
            break
        doc_ids = torch.cat([doc_ids, torch.zeros_like(doc_ids[:, :1])], dim=1)
        response = torch.cat([response, torch.ones_like(response[:, :1])], dim=1)
        mask = prefill_mask(doc_ids, response, config.prefill)
        logits = _forward(model, token[:, None], doc_ids.shape[1] - 1, mask, context, fast_weights)
    return _results(torch.stack(generated, dim=1).cpu(), kept, config)


def _results(tokens: torch.Tensor, kept: list[torch.Tensor], config: GenerationConfig) -> list[Generation]:
    out = []
    stops = set(config.stop_token_ids)
    for row in range(tokens.shape[0]):
        ids = tokens[row].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
        ids = ids if end is None else ids[:end]
        logits = torch.stack([step[row] for step in kept[:len(ids)]]) if config.keep_logits else None
        out.append(Generation(ids, "length" if end is None else "stop", logits))
    return out
