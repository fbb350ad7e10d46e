"""Micro-batch streams for training, with a position that checkpoints can save and restore."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch
from megatron_focusft.data.blend import DataBlend
from megatron_focusft.data.chat import ChatSamples
from megatron_focusft.data.packing import PackingConfig, micro_batches, pack_chats
from megatron_focusft.data.synthetic import RetrievalPacker, RetrievalTaskConfig


def _to(batch: SegmentBatch, device: torch.device) -> SegmentBatch:
    return batch if device.type == "cpu" else batch.to(device)


class ChatDataSource:
    """Packed chat samples, epoch after epoch (a new seeded shuffle each epoch; with a weighted
    blend, a new seeded draw from its paths, data/blend.py).

    Position: (epoch, micro-batches consumed in it); restoring repacks that epoch and skips ahead.
    """

    def __init__(self, samples: ChatSamples, config: PackingConfig, dp_rank: int, dp_size: int,
                 device: torch.device, blend: DataBlend | None = None) -> None:
        self.samples, self.config, self.dp_rank, self.dp_size, self.device = samples, config, dp_rank, dp_size, device
        self.blend = blend if blend is not None and blend.weights is not None else None
        self._groups = self.blend.sample_groups(samples) if self.blend is not None else None
        self.epoch, self.consumed = 0, 0
        self._stream: Iterator[SegmentBatch] | None = None

    def _open(self) -> Iterator[SegmentBatch]:
        drawn = self.blend.epoch_indices(self._groups, self.config.seed, self.epoch) if self.blend else None
        packed = pack_chats(self.samples, self.config, self.epoch, drawn)
        stream = micro_batches(packed, self.config, dp_rank=self.dp_rank, dp_size=self.dp_size)
        for _ in range(self.consumed):
            next(stream)
        return stream

    def next_micro_batch(self) -> SegmentBatch:
        if self._stream is None:
            self._stream = self._open()
        try:
            batch = next(self._stream)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._stream = self._open()
            batch = next(self._stream)
        self.consumed += 1
        return _to(batch, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "chat", "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "chat":
            raise ValueError(f"checkpoint data position is for {state.get('kind')!r} data, this run reads chat data")
        self.epoch, self.consumed, self._stream = int(state["epoch"]), int(state["consumed"]), None


class MockDataSource:
    """Synthetic key-value retrieval chats (megatron_focusft.data.synthetic), endless.

    Position: micro-batches drawn; restoring replays the seeded generator that far.
    """

    def __init__(self, task: RetrievalTaskConfig, seq_length: int, micro_batch_size: int, seed: int,
                 mask_kind: str, device: torch.device) -> None:
        self._args = (task, seq_length, micro_batch_size, seed)
        self.mask_kind, self.device = mask_kind, device
        self.packer = RetrievalPacker(*self._args)
        self.consumed = 0

    def next_micro_batch(self) -> SegmentBatch:
        rows = self.packer.next_rows()
        self.consumed += 1
        return _to(make_batch(rows.tokens, rows.doc_ids, rows.response, mask_kind=self.mask_kind), self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mock", "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mock":
            raise ValueError(f"checkpoint data position is for {state.get('kind')!r} data, this run reads mock data")
        self.packer = RetrievalPacker(*self._args)
        for _ in range(int(state["consumed"])):
            self.packer.next_rows()
        self.consumed = int(state["consumed"])
