"""Attention sink mass and context engagement of a model on a probe batch, pooled (the training
log) or per layer and head (`focusft analyze`).

Definitions (ours; the paper's were not available): over response-token queries, the attention
probability on the first token of the query's sample ("sink mass"), on its first 4 tokens
("sink mass @4"), and the probability mass on context tokens other than those 4 sink positions
("context engagement"). The pooled metrics average over layers, heads and queries; the profile
averages over queries per (layer, head), so the pooled value is the profile's mean.

Probabilities are computed explicitly in query chunks: the largest temporary is the chunk's
[b, h, C, s] scores with C = max(1, MAX_CHUNK_ELEMENTS // (b h s)), 2^26 fp32 values (256 MiB)
by default, so a 32K-token probe never holds [h, s, s] at once.
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
MAX_CHUNK_ELEMENTS = 2**26
METRICS = ("sink_mass", "sink_mass_first4", "context_engagement")


@dataclass
class _Accumulator:
    """layer number -> [3, heads on this rank] float64 sums (METRICS order), and the number of
    response queries they run over (the same for every layer)."""

    probe: SegmentBatch
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, int] = field(default_factory=dict)


def _record(acc: _Accumulator, layer: int, probs: torch.Tensor, rows: torch.Tensor) -> None:
    """Add the sums of query rows `rows` [c] (probs [b, h, c, s]) to layer `layer`."""
    batch = acc.probe
    s = probs.shape[-1]
    doc = batch.doc_ids
    doc_start, _ = run_bounds(doc)
    offset = torch.arange(s, device=probs.device)[None, None, :] - doc_start[:, rows, None]  # [b, c, s]
    same_doc = doc[:, rows, None] == doc[:, None, :]
    is_sink = same_doc & (offset >= 0) & (offset < SINK_TOKENS)
    is_first = same_doc & (offset == 0)
    is_context = (batch.response == 0)[:, None, :] & same_doc & ~is_sink
    queries = (batch.response[:, rows].bool() & (doc[:, rows] >= 0)).to(probs.dtype)  # [b, c]
    sums = torch.stack([((probs * sel[:, None].to(probs.dtype)).sum(-1) * queries[:, None]).sum(dim=(0, 2))
                        for sel in (is_first, is_sink, is_context)]).double()
    acc.sums[layer] = acc.sums.get(layer, 0) + sums
    acc.queries[layer] = acc.queries.get(layer, 0) + int(queries.sum())


def _explicit_attention(acc: _Accumulator, layer: int, max_elements: int):
    """A backend (same contract) computing softmax explicitly in query chunks and recording."""

    def attend(query, key, value, mask: SegmentMask, scale: float) -> torch.Tensor:
        b, h, s, _ = query.shape
        groups = h // key.shape[1]
        key = key.repeat_interleave(groups, dim=1).float()
        value = value.repeat_interleave(groups, dim=1)
        chunk = max(1, max_elements // (b * h * s))
        batch_index = torch.arange(b, device=query.device)[:, None, None]
        cols = torch.arange(s, device=query.device)[None, None, :]
        out = torch.empty_like(query)
        for start in range(0, s, chunk):
            rows = torch.arange(start, min(s, start + chunk), device=query.device)
            visible = mask.visible(batch_index, rows[None, :, None], cols)[:, None]  # [b, 1, c, s]
            scores = (query[:, :, rows].float() @ key.transpose(-1, -2)) * scale
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
            _record(acc, layer, probs, rows)
            out[:, :, rows] = (probs.to(value.dtype) @ value)
        return out

    return attend


@contextlib.contextmanager
def _recording(model: torch.nn.Module, acc: _Accumulator, max_elements: int) -> Iterator[None]:
    modules = [m for m in model.modules() if isinstance(m, SegmentCoreAttention)]
    saved = [m.attention_fn for m in modules]
    for m in modules:
        m.attention_fn = _explicit_attention(acc, m.layer_number, max_elements)
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.attention_fn = fn


@torch.no_grad()
def _run(model: torch.nn.Module, probe: SegmentBatch, max_elements: int) -> _Accumulator:
    acc = _Accumulator(probe=probe)
    was_training = model.training
    model.eval()
    try:
        with _recording(model, acc, max_elements):
            if parallel_state.get_pipeline_model_parallel_world_size() == 1:
                model(probe.tokens, probe.position_ids, probe.attention)
            else:
                _pipelined_forward(model, probe)
    finally:
        model.train(was_training)
    return acc


@dataclass(frozen=True)
class AttentionProfile:
    """Per (layer, head) means over the probe's response queries: each [layers, heads] fp64,
    rows in layer order (layer_numbers), heads in model order (all TP ranks')."""

    layer_numbers: tuple[int, ...]
    values: dict[str, torch.Tensor]
    queries: int

    def pooled(self) -> dict[str, float]:
        return {name: float(v.mean()) for name, v in self.values.items()}


def attention_profile(model: torch.nn.Module, probe: SegmentBatch,
                      max_elements: int = MAX_CHUNK_ELEMENTS) -> AttentionProfile:
    """The per-layer, per-head metrics of `model` (plain, no fast weights) on `probe`; collective
    over TP and PP (every rank returns the whole model's profile)."""
    acc = _run(model, probe, max_elements)
    local = {layer: sums.cpu() for layer, sums in acc.sums.items()}
    layers: dict[int, torch.Tensor] = {}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pieces: list = [None] * dist.get_world_size(tp_group)
    dist.all_gather_object(pieces, local, group=tp_group)  # heads are split over TP ranks, in rank order
    for layer in local:
        layers[layer] = torch.cat([piece[layer] for piece in pieces], dim=1)
    queries = dict(acc.queries)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, (layers, queries), group=parallel_state.get_pipeline_model_parallel_group())
        layers = {k: v for stage_layers, _ in stages for k, v in stage_layers.items()}
        queries = {k: v for _, stage_queries in stages for k, v in stage_queries.items()}
    counts = set(queries.values())
    if len(counts) != 1:
        raise RuntimeError(f"layers saw different numbers of response queries: {queries}")
    queries = counts.pop()
    order = tuple(sorted(layers))
    stacked = torch.stack([layers[k] for k in order])  # [L, 3, H]
    means = stacked / max(queries, 1)
    return AttentionProfile(order, {name: means[:, i] for i, name in enumerate(METRICS)}, queries)


def attention_metrics(model: torch.nn.Module, probe: SegmentBatch) -> dict[str, float]:
    """{"sink_mass", "sink_mass_first4", "context_engagement"} pooled over layers, heads and
    response queries (what the training log records; the profile's mean). Under pipeline
    parallelism `model` is this stage's part: the probe goes through Megatron's forward-only
    schedule; collective over TP and PP."""
    return attention_profile(model, probe).pooled()


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
