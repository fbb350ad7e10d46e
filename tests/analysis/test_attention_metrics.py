"""Sink mass and context engagement against an independent computation, and no side effects."""

from __future__ import annotations

import torch

from megatron_focusft.analysis.attention_metrics import _Accumulator, _record, attention_metrics
from megatron_focusft.data.batch import make_batch
from tests.helpers.model import build_tiny_model


def _hand_batch():
    # sample 0: context 3, response 3; sample 1: context 2, response 2; then 2 padding
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]])
    return make_batch(torch.arange(12)[None] % 7, doc_ids, response)


def test_uniform_attention_metrics_by_hand():
    batch = _hand_batch()
    dense = batch.attention.to_dense()  # [1, s, s]
    probs = dense.float() / dense.float().sum(-1, keepdim=True).clamp(min=1)
    probs = probs[:, None].expand(1, 2, 12, 12)  # two identical heads
    acc = _Accumulator(probe=batch)
    _record(acc, probs, batch.attention)
    # Response queries (FocuSFT mask: causal over the whole prefix of their sample):
    # sample 0: q=3,4,5 see 4,5,6 keys; sample 1: q=8,9 see 3,4 keys (uniformly).
    visible = {3: 4, 4: 5, 5: 6, 8: 3, 9: 4}
    first = sum(1 / n for n in visible.values())
    # first 4 tokens of the sample; sample 1 has only 4 tokens, all sinks
    first4 = sum(min(n, 4) / n for n in visible.values())
    # context keys beyond the 4 sinks: none (contexts are 3 and 2 tokens long)
    assert acc.count == 2 * len(visible)
    assert abs(acc.sink_first / acc.count - first / len(visible)) < 1e-6
    assert abs(acc.sink_first4 / acc.count - first4 / len(visible)) < 1e-6
    assert acc.engagement == 0.0


def test_engagement_counts_context_beyond_the_sinks():
    doc_ids = torch.zeros(1, 8, dtype=torch.long)
    response = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]])  # 6 context tokens, 2 response
    batch = make_batch(torch.zeros(1, 8, dtype=torch.long), doc_ids, response)
    dense = batch.attention.to_dense()
    probs = (dense.float() / dense.float().sum(-1, keepdim=True))[:, None]
    acc = _Accumulator(probe=batch)
    _record(acc, probs, batch.attention)
    # q=6 sees 7 keys, q=7 sees 8; context beyond the sinks = positions 4, 5
    assert abs(acc.engagement / acc.count - (2 / 7 + 2 / 8) / 2) < 1e-6


def test_metrics_do_not_change_the_model(single_rank):
    model = build_tiny_model(seed=1)
    batch = _hand_batch()
    before = model(batch.tokens, batch.position_ids, batch.attention)
    metrics = attention_metrics(model, batch)
    after = model(batch.tokens, batch.position_ids, batch.attention)
    assert torch.equal(before, after)
    assert 0 < metrics["sink_mass"] <= metrics["sink_mass_first4"] <= 1
    assert 0 <= metrics["context_engagement"] <= 1
