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
def _recording(chunks: list[torch.nn.Module], acc: _Accumulator, max_elements: int) -> Iterator[None]:
    modules = [m for chunk in chunks for m in chunk.modules() if isinstance(m, SegmentCoreAttention)]
    saved = [m.attention_fn for m in modules]
    for m in modules:
        m.attention_fn = _explicit_attention(acc, m.layer_number, max_elements)
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.attention_fn = fn


@torch.no_grad()
def _run(chunks: list[torch.nn.Module], probe: SegmentBatch, max_elements: int) -> _Accumulator:
    acc = _Accumulator(probe=probe)
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with _recording(chunks, acc, max_elements):
            if parallel_state.get_pipeline_model_parallel_world_size() == 1:
                chunks[0](probe.tokens, probe.position_ids, probe.attention)
            else:
                _pipelined_forward(chunks, probe)
    finally:
        for chunk, training in zip(chunks, was_training):
            chunk.train(training)
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


def attention_profile(model: torch.nn.Module | list[torch.nn.Module], probe: SegmentBatch,
                      max_elements: int = MAX_CHUNK_ELEMENTS) -> AttentionProfile:
    """The per-layer, per-head metrics of `model` (plain GPTModels, no fast weights: this rank's
    stage, or its model chunks in order under virtual pipeline stages) on `probe`; collective
    over TP and PP (every rank returns the whole model's profile)."""
    acc = _run(model if isinstance(model, list) else [model], probe, max_elements)
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


def attention_metrics(model: torch.nn.Module | list[torch.nn.Module], probe: SegmentBatch) -> dict[str, float]:
    """{"sink_mass", "sink_mass_first4", "context_engagement"} pooled over layers, heads and
    response queries (what the training log records; the profile's mean). Under pipeline
    parallelism `model` is this stage's part (or its model chunks): the probe goes from stage to
    stage (_pipelined_forward); collective over TP and PP."""
    return attention_profile(model, probe).pooled()


def _pipelined_forward(chunks: list[torch.nn.Module], probe: SegmentBatch) -> None:
    """One forward of the probe through the pipeline (no loss, no backward): this rank's chunk v is
    stage v x P + rank (one chunk: stage = rank); each receives its input from the previous rank
    on the ring and sends its output to the next, through Megatron's p2p helper, so the stages run
    in order. (Megatron's forward-only interleaved schedule needs a micro-batch per stage.)"""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    config = chunks[0].config
    group = parallel_state.get_pipeline_model_parallel_group()
    p2p = P2PCommunicator(pp_group=group, config=config)
    b, s = probe.tokens.shape
    shards = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
    shape = (s // shards, b, config.hidden_size)  # [s, b, h]: under SP this TP rank's sequence shard
    last = group.size() * len(chunks) - 1
    for v, chunk in enumerate(chunks):
        stage = v * group.size() + group.rank()
        chunk.set_input_tensor(p2p.recv_forward(shape, is_first_stage=stage == 0))
        output = chunk(probe.tokens, probe.position_ids, probe.attention)
        p2p.send_forward(output, is_last_stage=stage == last)
