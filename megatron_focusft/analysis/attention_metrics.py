"""Attention sink mass and context engagement of a model on a probe batch.

Definitions (ours; the paper's were not available): over layers, heads and response-token
queries, the mean attention probability on the first token of the query's sample ("sink
mass"), also on its first 4 tokens ("sink mass @4"), and the mean probability mass that
response queries put on context tokens other than those 4 sink positions ("context
engagement").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_focusft.attention.core_attention import SegmentCoreAttention
from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.masks import SegmentMask, run_bounds

SINK_TOKENS = 4


@dataclass
class _Accumulator:
    sink_first: float = 0.0
    sink_first4: float = 0.0
    engagement: float = 0.0
    count: int = 0
    probe: SegmentBatch | None = field(default=None, repr=False)


def _explicit_attention(acc: _Accumulator):
    """A backend (same contract) that computes softmax explicitly and records the metrics."""

    def attend(query, key, value, mask: SegmentMask, scale: float) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        dense = mask.to_dense()[:, None]  # [b, 1, s, s]
        scores = (query.float() @ key.float().transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~dense, float("-inf")), dim=-1).nan_to_num(0.0)
        _record(acc, probs, mask)
        return (probs.to(value.dtype) @ value)

    return attend


def _record(acc: _Accumulator, probs: torch.Tensor, mask: SegmentMask) -> None:
    batch = acc.probe
    s = probs.shape[-1]
    doc_start, _ = run_bounds(batch.doc_ids)
    pos = torch.arange(s, device=probs.device)
    offset = pos[None, None, :] - doc_start[:, :, None]  # key position within the query's sample
    same_doc = batch.doc_ids[:, :, None] == batch.doc_ids[:, None, :]
    is_sink = same_doc & (offset >= 0) & (offset < SINK_TOKENS)
    is_first = same_doc & (offset == 0)
    key_is_context = (batch.response == 0)[:, None, :] & same_doc
    queries = batch.response.bool() & (batch.doc_ids >= 0)  # [b, s]
    if not bool(queries.any()):
        return
    per_head = lambda sel: (probs * sel[:, None].to(probs.dtype)).sum(-1)  # noqa: E731  [b, h, s]
    q = queries[:, None, :].expand(-1, probs.shape[1], -1)
    acc.sink_first += float(per_head(is_first)[q].sum())
    acc.sink_first4 += float(per_head(is_sink)[q].sum())
    acc.engagement += float(per_head(key_is_context & ~is_sink)[q].sum())
    acc.count += int(q.sum())


@contextlib.contextmanager
def _recording(model: torch.nn.Module, acc: _Accumulator) -> Iterator[None]:
    modules = [m for m in model.modules() if isinstance(m, SegmentCoreAttention)]
    saved = [m.attention_fn for m in modules]
    for m in modules:
        m.attention_fn = _explicit_attention(acc)
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.attention_fn = fn


@torch.no_grad()
def attention_metrics(model: torch.nn.Module, probe: SegmentBatch) -> dict[str, float]:
    """{"sink_mass", "sink_mass_first4", "context_engagement"} of `model` (plain, no fast weights).

    Materialises [b, h, s, s] probabilities per layer: for short probe batches only. Under
    pipeline parallelism `model` is this stage's part: the probe goes through Megatron's
    forward-only schedule and the stages' sums are added up (a collective over the stages).
    """
    acc = _Accumulator(probe=probe)
    was_training = model.training
    model.eval()
    try:
        with _recording(model, acc):
            if parallel_state.get_pipeline_model_parallel_world_size() == 1:
                model(probe.tokens, probe.position_ids, probe.attention)
            else:
                _pipelined_forward(model, probe)
    finally:
        model.train(was_training)
    sums = torch.tensor([acc.sink_first, acc.sink_first4, acc.engagement, acc.count], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        sums = sums.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    sink_first, sink_first4, engagement, count = sums.tolist()
    n = max(count, 1)
    return {"sink_mass": sink_first / n, "sink_mass_first4": sink_first4 / n, "context_engagement": engagement / n}


def _pipelined_forward(model: torch.nn.Module, probe: SegmentBatch) -> None:
    """One forward of the probe through the pipeline stages (no loss, no backward)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, stage):
        batch = next(data_iterator)
        output = stage(batch.tokens, batch.position_ids, batch.attention)
        # The schedule wants (loss, token count, logs) from the last stage; nothing is trained.
        return output, lambda _output: (torch.zeros((), device=output.device),
                                        torch.ones((), dtype=torch.int, device=output.device), {})

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([probe]), model=[model], num_microbatches=1,
        seq_length=probe.tokens.shape[1], micro_batch_size=probe.tokens.shape[0], forward_only=True)
