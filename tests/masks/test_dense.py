"""dense_mask against literal expectations for each kind (the reference of the references)."""

from __future__ import annotations

import torch

from megatron_focusft.masks import dense_mask


def test_causal_packed_with_padding():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    got = dense_mask("causal", doc_ids=doc_ids)[0].int().tolist()
    assert got == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0]]


def test_focusft_starts_with_response_and_single_token_blocks():
    # response(1) context(1) response(1) context(2)
    loss_mask = torch.tensor([[1, 0, 1, 0, 0]])
    got = dense_mask("focusft", doc_ids=torch.zeros(1, 5, dtype=torch.long), loss_mask=loss_mask)[0].int().tolist()
    assert got == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1]]


def test_focusft_sample_without_response_is_bidirectional():
    got = dense_mask("focusft", doc_ids=torch.zeros(1, 3, dtype=torch.long),
                     loss_mask=torch.zeros(1, 3, dtype=torch.long))
    assert got.all()


def test_block_single_block_document_is_causal():
    doc_ids = torch.zeros(1, 4, dtype=torch.long)
    got = dense_mask("block", doc_ids=doc_ids, block_ids=torch.full((1, 4), 3))
    assert torch.equal(got, dense_mask("causal", doc_ids=doc_ids))
