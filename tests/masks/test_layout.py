"""SegmentMask (interval form) against the independent pairwise dense mask, and input checks."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.masks import MASK_KINDS, dense_mask, run_bounds, segment_mask
from tests.helpers.layouts import random_layout


def _pair(kind: str, **kwargs):
    return dense_mask(kind, **kwargs), segment_mask(kind, **kwargs)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_interval_form_equals_dense_mask(kind):
    for seed in range(40):
        kwargs = random_layout(kind, 3, 41, seed=seed, max_doc=24, all_padding_row=seed % 7 == 0)
        kwargs.pop("kind")
        dense, mask = _pair(kind, **kwargs)
        assert torch.equal(mask.to_dense(), dense), f"seed {seed}"


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_column_intervals_equal_dense_columns(kind):
    for seed in range(40):
        kwargs = random_layout(kind, 2, 37, seed=seed, max_doc=20)
        kwargs.pop("kind")
        dense, mask = _pair(kind, **kwargs)
        q_start, q_end, q2_start, q2_end = mask.column_intervals()
        q = torch.arange(dense.shape[1])[None, :, None]
        from_columns = ((q >= q_start[:, None]) & (q < q_end[:, None])) | ((q >= q2_start[:, None]) & (q < q2_end[:, None]))
        assert torch.equal(from_columns, dense), f"seed {seed}"


def test_focusft_hand_case():
    # doc 0: context(2) response(2) context(1); doc 1: context(1) response(2); padding(2)
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 0, 0]])
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    dense, mask = _pair("focusft", doc_ids=doc_ids, loss_mask=loss_mask)
    assert torch.equal(dense[0], expected)
    assert torch.equal(mask.to_dense()[0], expected)


def test_block_hand_case_with_sinks():
    # doc 0: local block 0 (sink, token), local block 1 (sink, token), global block 2 (1 token)
    doc_ids = torch.tensor([[0, 0, 0, 0, 0]])
    block_ids = torch.tensor([[0, 0, 1, 1, 2]])
    sink_mask = torch.tensor([[1, 0, 1, 0, 0]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 1, 0, 1, 1]], dtype=torch.bool)
    dense, mask = _pair("block", doc_ids=doc_ids, block_ids=block_ids, sink_mask=sink_mask)
    assert torch.equal(dense[0], expected)
    assert torch.equal(mask.to_dense()[0], expected)


def test_run_bounds():
    keys = torch.tensor([[3, 3, 1, 1, 1, -1]])
    start, end = run_bounds(keys)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6]]


def test_all_padding_row_sees_nothing():
    doc_ids = torch.full((1, 6), -1)
    mask = segment_mask("focusft", doc_ids=doc_ids, loss_mask=torch.zeros(1, 6, dtype=torch.long))
    kv_start, kv_end = mask.kv_interval
    assert torch.equal(kv_start, kv_end)
    assert not mask.to_dense().any()


@pytest.mark.parametrize("builder", [dense_mask, segment_mask])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="nope", doc_ids=torch.zeros(1, 4, dtype=torch.long)), "unknown mask kind"),
        (dict(kind="causal", doc_ids=torch.zeros(4, dtype=torch.long)), "doc_ids must have shape"),
        (dict(kind="causal", doc_ids=torch.zeros(1, 4)), "integer or bool"),
        (dict(kind="causal", doc_ids=torch.tensor([[0, 0, -2, 1]])), "doc_ids must be >= -1"),
        (dict(kind="causal", doc_ids=torch.tensor([[0, 1, 0, -1]])), "document 0 is split"),
        (dict(kind="focusft", doc_ids=torch.zeros(1, 4, dtype=torch.long)), "needs loss_mask"),
        (dict(kind="focusft", doc_ids=torch.zeros(1, 4, dtype=torch.long),
              loss_mask=torch.tensor([[0, 1, 2, 0]])), "loss_mask must be binary.*row 0, position 2"),
        (dict(kind="focusft", doc_ids=torch.zeros(1, 4, dtype=torch.long),
              loss_mask=torch.zeros(1, 5, dtype=torch.long)), r"loss_mask has shape \(1, 5\)"),
        (dict(kind="block", doc_ids=torch.zeros(1, 4, dtype=torch.long)), "needs block_ids"),
        (dict(kind="block", doc_ids=torch.zeros(1, 4, dtype=torch.long),
              block_ids=torch.tensor([[0, 1, 0, 2]])), "non-decreasing.*row 0, position 2"),
        (dict(kind="block", doc_ids=torch.zeros(1, 4, dtype=torch.long),
              block_ids=torch.tensor([[0, -1, 1, 2]])), "block_ids must be >= 0"),
        (dict(kind="causal", doc_ids=torch.zeros(1, 4, dtype=torch.long),
              block_ids=torch.zeros(1, 4, dtype=torch.long)), "only used by kind='block'"),
    ],
)
def test_bad_input_raises_clear_value_error(builder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        builder(**kwargs)


def test_block_ids_may_restart_in_a_new_document():
    doc_ids = torch.tensor([[0, 0, 1, 1]])
    block_ids = torch.tensor([[0, 1, 0, 1]])
    dense, mask = _pair("block", doc_ids=doc_ids, block_ids=block_ids)
    assert torch.equal(mask.to_dense(), dense)
