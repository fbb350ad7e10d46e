"""Deterministic packed micro-batches for model tests."""

from __future__ import annotations

import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch
from tests.helpers.layouts import random_layout


def random_batch(batch: int, seq: int, vocab: int, *, seed: int, kind: str = "focusft", max_doc: int = 24) -> SegmentBatch:
    """Random tokens over a random packed multi-turn layout (docs, padding, response runs)."""
    layout = random_layout("focusft", batch, seq, seed=seed, max_doc=max_doc)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    block_ids = random_layout("block", batch, seq, seed=seed, max_doc=max_doc)["block_ids"] if kind == "block" else None
    return make_batch(tokens, layout["doc_ids"], layout["loss_mask"], mask_kind=kind, block_ids=block_ids)
