"""Segment masks: every attention mask of the project as one interval of keys per query.

Legend: ``b`` batch rows, ``s`` tokens; every per-token tensor here is ``[b, s]``.

A token belongs to a document (``doc_ids``, -1 = padding) and to a block inside it. A block
has two flags: ``causal`` (causal inside the block, else bidirectional) and ``sees_prefix``
(sees every earlier token of its document, else only its own block). A key may also be
``private``: seen only by queries of its own block (block sink tokens). Query ``q`` then sees
key ``k`` iff ``kv_start[q] <= k < kv_end[q]`` and ``k`` is not a private key of another
block, where::

    kv_start[q] = doc_start(q) if sees_prefix[q] else block_start(q)
    kv_end[q]   = q + 1        if causal[q]      else block_end(q)

Padding rows have ``kv_start == kv_end`` (nothing visible) and lie in no other row's interval.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

MaskKind = Literal["causal", "focusft", "block"]
MASK_KINDS: tuple[str, ...] = ("causal", "focusft", "block")


def _first_bad(flags: torch.Tensor) -> str:
    """Location of the first True entry of a [b, s] bool tensor, as 'row r, position t'."""
    row, pos = (int(i) for i in flags.nonzero()[0])
    return f"row {row}, position {pos}"


def _as_row_tensor(name: str, value: torch.Tensor | None, shape: torch.Size | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [b, s], got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape [b, s], got {tuple(value.shape)}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, but doc_ids has {tuple(shape)}")
    if value.is_floating_point() or value.is_complex():
        raise ValueError(f"{name} must be an integer or bool tensor, got {value.dtype}")
    return value.long()


def run_bounds(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of the maximal run of equal values holding each token.

    keys: [b, s] integer tensor -> (start, end), each [b, s] long.
    """
    b, s = keys.shape
    pos = torch.arange(s, device=keys.device).expand(b, s)
    new_run = torch.ones_like(keys, dtype=torch.bool)
    new_run[:, 1:] = keys[:, 1:] != keys[:, :-1]
    start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last_of_run = torch.ones_like(new_run)
    last_of_run[:, :-1] = new_run[:, 1:]
    end_flipped = torch.where(last_of_run, pos + 1, torch.full_like(pos, s)).flip(1).cummin(dim=1).values
    return start, end_flipped.flip(1)


def _check_docs(doc_ids: torch.Tensor) -> None:
    if (doc_ids < -1).any():
        raise ValueError(f"doc_ids must be >= -1 (-1 = padding); found {int(doc_ids.min())} at "
                         f"{_first_bad(doc_ids < -1)}")
    # A document's tokens form one contiguous run: no id may start a second run in a row.
    start, _ = run_bounds(doc_ids)
    s = doc_ids.shape[1]
    is_start = start == torch.arange(s, device=doc_ids.device)
    for row in range(doc_ids.shape[0]):
        run_ids = doc_ids[row][is_start[row]]
        run_ids = run_ids[run_ids >= 0]
        if run_ids.unique().numel() != run_ids.numel():
            counts = torch.bincount(run_ids)
            dup = int((counts > 1).nonzero()[0])
            raise ValueError(f"doc_ids row {row}: document {dup} is split into several runs; "
                             f"each packed document must be contiguous")


def validate_inputs(
    kind: str,
    doc_ids: torch.Tensor,
    loss_mask: torch.Tensor | None,
    block_ids: torch.Tensor | None,
    sink_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Check the mask inputs; return them as long tensors. Raises ValueError naming the problem."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    doc_ids = _as_row_tensor("doc_ids", doc_ids, None)
    shape = doc_ids.shape
    _check_docs(doc_ids)
    if kind == "focusft":
        if loss_mask is None:
            raise ValueError("kind='focusft' needs loss_mask [b, s] in {0, 1}")
        loss_mask = _as_row_tensor("loss_mask", loss_mask, shape)
        bad = (loss_mask != 0) & (loss_mask != 1)
        if bad.any():
            raise ValueError(f"loss_mask must be binary (0 or 1); found {int(loss_mask[bad][0])} at "
                             f"{_first_bad(bad)}")
    elif loss_mask is not None:
        loss_mask = _as_row_tensor("loss_mask", loss_mask, shape)
    if kind == "block":
        if block_ids is None:
            raise ValueError("kind='block' needs block_ids [b, s] >= 0")
        block_ids = _as_row_tensor("block_ids", block_ids, shape)
        real = doc_ids >= 0
        negative = real & (block_ids < 0)
        if negative.any():
            raise ValueError(f"block_ids must be >= 0 on non-padding tokens; found "
                             f"{int(block_ids[negative][0])} at {_first_bad(negative)}")
        same_doc_as_prev = torch.zeros_like(real)
        same_doc_as_prev[:, 1:] = real[:, 1:] & (doc_ids[:, 1:] == doc_ids[:, :-1])
        decreasing = torch.zeros_like(real)
        decreasing[:, 1:] = block_ids[:, 1:] < block_ids[:, :-1]
        out_of_order = same_doc_as_prev & decreasing
        if out_of_order.any():
            raise ValueError(f"block_ids must be non-decreasing inside a document; they go back at "
                             f"{_first_bad(out_of_order)}")
    elif block_ids is not None:
        raise ValueError(f"block_ids are only used by kind='block', not {kind!r}")
    if sink_mask is not None:
        if kind != "block":
            raise ValueError(f"sink_mask is only used by kind='block', not {kind!r}")
        sink_mask = _as_row_tensor("sink_mask", sink_mask, shape)
        bad = (sink_mask != 0) & (sink_mask != 1)
        if bad.any():
            raise ValueError(f"sink_mask must be binary (0 or 1); bad value at {_first_bad(bad)}")
    return doc_ids, loss_mask, block_ids, sink_mask


@dataclass(frozen=True, eq=False)
class SegmentMask:
    """Per-token description of a segment mask; derived forms are computed once and cached.

    doc_ids      [b, s] long: document of each token in its pack, -1 = padding.
    block_index  [b, s] long: block of each token, unique within a row, -1 = padding.
    causal       [b, s] bool: the token's block is causal inside (else bidirectional).
    sees_prefix  [b, s] bool: the token's block sees all earlier tokens of its document.
    private      [b, s] bool: the key is visible only to queries of its own block.
    """

    doc_ids: torch.Tensor
    block_index: torch.Tensor
    causal: torch.Tensor
    sees_prefix: torch.Tensor
    private: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.doc_ids.shape

    @property
    def device(self) -> torch.device:
        return self.doc_ids.device

    @property
    def has_private_keys(self) -> bool:
        return bool(self._any_private)

    @functools.cached_property
    def _any_private(self) -> bool:
        return bool(self.private.any())

    @functools.cached_property
    def _doc_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return run_bounds(self.doc_ids)

    @functools.cached_property
    def _block_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return run_bounds(self.block_index)

    @functools.cached_property
    def kv_interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_start, kv_end), each [b, s] long: the keys query q may see, before privacy."""
        doc_start, _ = self._doc_bounds
        block_start, block_end = self._block_bounds
        pos = torch.arange(self.shape[1], device=self.device).expand(self.shape)
        start = torch.where(self.sees_prefix, doc_start, block_start)
        end = torch.where(self.causal, pos + 1, block_end)
        padding = self.doc_ids < 0
        return start.masked_fill(padding, 0), end.masked_fill(padding, 0)

    def visible(self, batch: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Whether query q_idx may see key kv_idx in row batch (broadcasting index tensors)."""
        kv_start, kv_end = self.kv_interval
        seen = (kv_start[batch, q_idx] <= kv_idx) & (kv_idx < kv_end[batch, q_idx])
        if self.has_private_keys:
            own_block = self.block_index[batch, kv_idx] == self.block_index[batch, q_idx]
            seen = seen & (own_block | ~self.private[batch, kv_idx])
        return seen

    def to_dense(self) -> torch.Tensor:
        """Materialised mask, BoolTensor [b, s, s], True = query row may attend to key column.

        O(s^2) memory: for the reference backend and tests at short lengths only.
        """
        b, s = self.shape
        rows = torch.arange(b, device=self.device).view(b, 1, 1)
        q_idx = torch.arange(s, device=self.device).view(1, s, 1)
        kv_idx = torch.arange(s, device=self.device).view(1, 1, s)
        return self.visible(rows, q_idx, kv_idx)

    def column_intervals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries that see each key, as two intervals: (q_start, q_end, q2_start, q2_end), [b, s].

        Key k is seen by queries in [q_start, q_end) (its own block) and [q2_start, q2_end) (later
        blocks of its document that see their prefix). Exact when, inside every document, all
        blocks after the first prefix-seeing block also see their prefix (true of every kind
        built by ``segment_mask``); raises ValueError otherwise.
        """
        return _column_intervals(self)

    def derived(self, key: Any, build: Callable[[SegmentMask], Any]) -> Any:
        """`build(self)`, computed once per mask and key (backend forms: BlockMask, varlen plan).

        Every layer of a step sees the same mask, so each backend compiles it only once.
        """
        cache = self.__dict__.setdefault("_derived_cache", {})
        if key not in cache:
            cache[key] = build(self)
        return cache[key]

    def to(self, device: torch.device | str) -> SegmentMask:
        return SegmentMask(*(t.to(device) for t in
                             (self.doc_ids, self.block_index, self.causal, self.sees_prefix, self.private)))


def _column_intervals(mask: SegmentMask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s = mask.shape
    pos = torch.arange(s, device=mask.device).expand(b, s)
    doc_start, doc_end = mask._doc_bounds
    block_start, block_end = mask._block_bounds
    padding = mask.doc_ids < 0
    # Own block: a causal block is seen from the key onward, a bidirectional one from its start.
    q_start = torch.where(mask.causal, pos, block_start).masked_fill(padding, 0)
    q_end = block_end.masked_fill(padding, 0)
    # Later blocks: the first block of a document has no prefix, so only blocks after it count.
    # Their sees_prefix flags must read F...F T...T; the T-suffix starts at `suffix_start`.
    later_block_start = (pos == block_start) & (pos != doc_start) & ~padding
    prefix_start = torch.where(later_block_start & mask.sees_prefix, pos, torch.full_like(pos, s))
    first_prefix_from = prefix_start.flip(1).cummin(dim=1).values.flip(1)
    suffix_start = torch.minimum(torch.gather(first_prefix_from, 1, doc_start), doc_end)
    violating = later_block_start & ~mask.sees_prefix & (suffix_start < pos)
    if violating.any():
        raise ValueError(f"column_intervals: a block that does not see its prefix follows one that "
                         f"does, at {_first_bad(violating)}; this layout's columns are not two intervals")
    q2_start = torch.maximum(block_end, suffix_start)
    hidden = mask.private | padding | (q2_start >= doc_end)
    zeros = torch.zeros_like(pos)
    return q_start, q_end, torch.where(hidden, zeros, q2_start), torch.where(hidden, zeros, doc_end)


def segment_mask(
    kind: MaskKind,
    *,
    doc_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
) -> SegmentMask:
    """Build the segment mask of ``kind`` (same arguments as ``dense_mask``).

    causal:  one causal block per document.
    focusft: maximal runs of equal loss_mask in a document are blocks; 0-runs (context) are
             bidirectional, 1-runs (response) causal; every block sees its document's prefix.
    block:   block_ids [b, s] >= 0, non-decreasing in a document; the highest id is the global
             block (causal, sees the whole document), lower ids are local blocks (causal inside
             themselves only). sink_mask marks block sink tokens, private to their block.
    """
    doc_ids, loss_mask, block_ids, sink_mask = validate_inputs(kind, doc_ids, loss_mask, block_ids, sink_mask)
    padding = doc_ids < 0
    if kind == "causal":
        within_doc = torch.zeros_like(doc_ids)
        causal = torch.ones_like(padding)
        sees_prefix = torch.ones_like(padding)
    elif kind == "focusft":
        within_doc = loss_mask
        causal = loss_mask.bool()
        sees_prefix = torch.ones_like(padding)
    else:
        within_doc = block_ids
        doc_start, doc_end = run_bounds(doc_ids)
        # Highest block id of each token's document: read it at the document's last token.
        last_block = torch.gather(block_ids, 1, (doc_end - 1).clamp(min=0))
        causal = torch.ones_like(padding)
        sees_prefix = block_ids == last_block
    # Row-unique block numbers: a new block starts where the document or the within-document
    # key changes.
    changes = torch.ones_like(padding)
    changes[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]) | (within_doc[:, 1:] != within_doc[:, :-1])
    block_index = changes.long().cumsum(dim=1) - 1
    block_index = block_index.masked_fill(padding, -1)
    private = sink_mask.bool() & ~padding if sink_mask is not None else torch.zeros_like(padding)
    return SegmentMask(
        doc_ids=doc_ids,
        block_index=block_index,
        causal=causal & ~padding,
        sees_prefix=sees_prefix & ~padding,
        private=private,
    )
