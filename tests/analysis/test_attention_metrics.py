"""Sink mass and context engagement against an independent computation, and no side effects."""

from __future__ import annotations

import torch

from megatron_focusft.analysis.attention_metrics import _Accumulator, _record, attention_metrics, attention_profile
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
    _record(acc, 1, probs[:, :, :7], torch.arange(7))  # two query chunks, as the backend records them
    _record(acc, 1, probs[:, :, 7:], torch.arange(7, 12))
    sink_first, sink_first4, engagement = acc.sums[1].sum(dim=1).tolist()
    count = 2 * acc.queries[1]  # two heads
    # Response queries (FocuSFT mask: causal over the whole prefix of their sample):
    # sample 0: q=3,4,5 see 4,5,6 keys; sample 1: q=8,9 see 3,4 keys (uniformly).
    visible = {3: 4, 4: 5, 5: 6, 8: 3, 9: 4}
    first = sum(1 / n for n in visible.values())
    # first 4 tokens of the sample; sample 1 has only 4 tokens, all sinks
    first4 = sum(min(n, 4) / n for n in visible.values())
    # context keys beyond the 4 sinks: none (contexts are 3 and 2 tokens long)
    assert count == 2 * len(visible)
    assert abs(sink_first / count - first / len(visible)) < 1e-6
    assert abs(sink_first4 / count - first4 / len(visible)) < 1e-6
    assert engagement == 0.0


def test_engagement_counts_context_beyond_the_sinks():
    doc_ids = torch.zeros(1, 8, dtype=torch.long)
    response = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]])  # 6 context tokens, 2 response
    batch = make_batch(torch.zeros(1, 8, dtype=torch.long), doc_ids, response)
    dense = batch.attention.to_dense()
    probs = (dense.float() / dense.float().sum(-1, keepdim=True))[:, None]
    acc = _Accumulator(probe=batch)
    _record(acc, 1, probs, torch.arange(8))
    # q=6 sees 7 keys, q=7 sees 8; context beyond the sinks = positions 4, 5
    assert abs(float(acc.sums[1][2, 0]) / acc.queries[1] - (2 / 7 + 2 / 8) / 2) < 1e-6


def test_metrics_do_not_change_the_model(single_rank):
    model = build_tiny_model(seed=1)
    batch = _hand_batch()
    before = model(batch.tokens, batch.position_ids, batch.attention)
    metrics = attention_metrics(model, batch)
    after = model(batch.tokens, batch.position_ids, batch.attention)
    assert torch.equal(before, after)
    assert 0 < metrics["sink_mass"] <= metrics["sink_mass_first4"] <= 1
    assert 0 <= metrics["context_engagement"] <= 1


def test_profile_is_the_pooled_metric_per_layer_and_head_whatever_the_chunk(single_rank):
    """`focusft analyze`'s profile averages to the training log's pooled numbers on the same
    batch; chunking the queries (here 1-row chunks) changes nothing but rounding."""
    model = build_tiny_model(seed=2)
    batch = _hand_batch()
    pooled = attention_metrics(model, batch)
    whole = attention_profile(model, batch)
    rows = attention_profile(model, batch, max_elements=1)
    assert whole.layer_numbers == (1, 2, 3, 4) and whole.values["sink_mass"].shape == (4, 4)
    for name, value in pooled.items():
        assert abs(float(whole.values[name].mean()) - value) < 1e-12
        torch.testing.assert_close(rows.values[name], whole.values[name], atol=1e-6, rtol=0)
    assert len({round(float(v), 6) for v in whole.values["sink_mass"].flatten()}) > 1  # heads differ
