"""Packing tokenised chat samples into rows of seq_length tokens, and micro-batches of them.

Legend: ``b`` rows of a micro-batch, ``s`` = seq_length; packed tensors are ``[b, s]``.

Each epoch is deterministic in (seed, epoch): the samples are permuted, placed into rows by
first-fit (in the permuted order) or first-fit-decreasing (longest first, ties in the permuted
order), and the rows are permuted again so that long and short rows interleave. A sample is
never split: a row holds whole samples, ``doc_ids`` 0, 1, ... in placement order, -1 on the
padding tail. Packing efficiency = sample tokens / (rows * seq_length).

Micro-batches go to data-parallel ranks round-robin: global micro-batch step k holds rows
[k * b * dp, (k + 1) * b * dp), and rank r takes its b rows of them. The last step is filled
with empty rows (all padding, nothing scored), so every rank runs the same number of steps
and no sample is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch
from megatron_focusft.data.chat import ChatSamples

PackingAlgorithm = Literal["first_fit_decreasing", "first_fit"]
ALGORITHMS: tuple[str, ...] = ("first_fit_decreasing", "first_fit")


@dataclass(frozen=True)
class PackingConfig:
    """How samples become micro-batches.

    seq_length        tokens per row.
    micro_batch_size  rows per micro-batch (b).
    seed              shuffling seed; the same seed and epoch give the same rows on every run.
    algorithm         "first_fit_decreasing" (denser) or "first_fit" (keeps the shuffled order).
    mask_kind         attention mask of the batches: "focusft" (blocks follow the response
                      flags), "causal", or "block" (the samples' block ids and sinks, which
                      samples made by block-attention SampleForms carry).
    """

    seq_length: int
    micro_batch_size: int = 1
    seed: int = 0
    algorithm: PackingAlgorithm = "first_fit_decreasing"
    mask_kind: Literal["focusft", "causal", "block"] = "focusft"

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {self.seq_length}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.mask_kind not in ("focusft", "causal", "block"):
            raise ValueError(f"mask_kind must be focusft, causal or block for chat data, got {self.mask_kind!r}")


def first_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Put items, in `order`, each into the lowest-numbered bin with room; bins hold item indices.

    A max-tree over the bins' free space finds that bin in O(log n) per item, so packing is
    O(n log n) rather than O(n * bins). Bins open in index order, so an unopened bin is simply
    one with all `capacity` free.
    """
    n = len(order)
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    free = [capacity] * (2 * size)  # free[size + i] = room left in bin i; inner nodes hold the max
    bins: list[list[int]] = []
    for item in order:
        length = int(lengths[item])
        if not 0 < length <= capacity:
            raise ValueError(f"item {item} has length {length}, outside (0, {capacity}]")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        index = node - size
        if index == len(bins):
            bins.append([])
        bins[index].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


@dataclass(frozen=True, eq=False)
class PackedChats:
    """One epoch of packed rows: rows[i] lists the sample indices of row i, in order."""

    samples: ChatSamples
    rows: list[list[int]]
    seq_length: int
    seed: int
    epoch: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        lengths = self.samples.lengths
        return sum(int(lengths[index]) for row in self.rows for index in row)

    @property
    def efficiency(self) -> float:
        """Fraction of the rows' token slots holding sample tokens."""
        return self.num_tokens / (self.num_rows * self.seq_length) if self.rows else 0.0

    def describe(self) -> str:
        return (f"packed {sum(map(len, self.rows))} samples into {self.num_rows} rows of {self.seq_length} tokens "
                f"(epoch {self.epoch}, seed {self.seed}): efficiency {100 * self.efficiency:.1f}%")

    def row_tensors(self, rows: Sequence[int | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, doc_ids, response), each [len(rows), s] long; None gives an empty row."""
        placed = self._place(rows, {"tokens": (self.samples.tokens, self.samples.pad_id),
                                    "response": (self.samples.response, 0)})
        return placed["tokens"], placed["doc_ids"], placed["response"]

    def row_blocks(self, rows: Sequence[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_ids long, sink bool), each [len(rows), s], of samples that carry blocks; padding
        and empty rows hold block 0 and no sink."""
        if not self.samples.has_blocks:
            raise ValueError("these samples carry no block ids: load them with block-attention sample forms")
        placed = self._place(rows, {"block_ids": (self.samples.block_ids, 0), "sink": (self.samples.sink, 0)})
        return placed["block_ids"], placed["sink"].bool()

    def _place(self, rows: Sequence[int | None], fields: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        """Each field's per-token values [num_tokens] laid out as the rows hold their samples,
        [len(rows), s] long, `fill` elsewhere; and "doc_ids" (0, 1, ... per row, -1 = padding)."""
        b, s = len(rows), self.seq_length
        out = {name: torch.full((b, s), fill, dtype=torch.long) for name, (_, fill) in fields.items()}
        out["doc_ids"] = torch.full((b, s), -1, dtype=torch.long)
        offsets = self.samples.offsets
        for r, row in enumerate(rows):
            if row is None:
                continue
            pos = 0
            for doc, index in enumerate(self.rows[row]):
                lo, hi = int(offsets[index]), int(offsets[index + 1])
                for name, (values, _) in fields.items():
                    out[name][r, pos:pos + hi - lo] = values[lo:hi]
                out["doc_ids"][r, pos:pos + hi - lo] = doc
                pos += hi - lo
        return out


def pack_chats(samples: ChatSamples, config: PackingConfig, epoch: int = 0,
               indices: np.ndarray | None = None) -> PackedChats:
    """Shuffle and pack the samples for `epoch` (deterministic in config.seed and epoch): all of
    them once, or those `indices` lists (repeats allowed: a data blend's draw, data/blend.py)."""
    indices = np.arange(len(samples)) if indices is None else np.asarray(indices, dtype=np.int64)
    lengths = samples.lengths.numpy()[indices]
    too_long = np.nonzero(lengths > config.seq_length)[0]
    if too_long.size:
        file, row = samples.source(int(indices[too_long[0]]))
        raise ValueError(f"{too_long.size} sample(s) are longer than seq_length {config.seq_length}, e.g. "
                         f"{file}, row {row} ({int(lengths[too_long[0]])} tokens); tokenise with this seq_length")
    if config.mask_kind == "block" and not samples.has_blocks:
        raise ValueError("mask_kind 'block' needs samples with block ids (made by block-attention sample forms)")
    if epoch < 0 or config.seed < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {config.seed}, {epoch}")
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(lengths))
    if config.algorithm == "first_fit_decreasing":
        order = order[np.argsort(-lengths[order], kind="stable")]
    rows = first_fit(lengths, config.seq_length, order.tolist())
    rows = [[int(indices[j]) for j in rows[i]] for i in rng.permutation(len(rows))]
    return PackedChats(samples, rows, config.seq_length, config.seed, epoch)


def micro_batches(packed: PackedChats, config: PackingConfig, *, dp_rank: int = 0,
                  dp_size: int = 1) -> Iterator[SegmentBatch]:
    """This rank's micro-batches of one packed epoch (see the module doc for the split)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
    if packed.seq_length != config.seq_length:
        raise ValueError(f"rows are packed to {packed.seq_length} tokens, config says {config.seq_length}")
    b = config.micro_batch_size
    step_rows = b * dp_size
    for first in range(0, packed.num_rows, step_rows):
        mine = [first + dp_rank * b + i for i in range(b)]
        rows = [r if r < packed.num_rows else None for r in mine]
        tokens, doc_ids, response = packed.row_tensors(rows)
        if config.mask_kind != "block":
            yield make_batch(tokens, doc_ids, response, mask_kind=config.mask_kind)
            continue
        block_ids, sink = packed.row_blocks(rows)
        yield make_batch(tokens, doc_ids, response, mask_kind="block", block_ids=block_ids, sink_mask=sink)
