"""BlockMask from intervals vs. the dense pairwise reference, at tile and element level.

Legend: ``B`` tile size, ``nt = ceil(s / B)``; tile tensors are [b, nt, nt] (query tile, key tile).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_focusft.masks import dense_mask, segment_mask
from megatron_focusft.masks.flex import flex_block_mask, segment_mask_mod
from tests.helpers.layouts import random_layout

# (s, B): multiples of B, ragged ends, s < B, and B = 8 so one tile holds several blocks.
SHAPES = [(64, 16), (75, 16), (96, 32), (33, 8), (5, 16)]
SEEDS = [0, 1, 2]


def _layout(kind: str, s: int, seed: int, *, sinks: bool = True, **kwargs) -> dict:
    layout = random_layout(kind, 3, s, seed=seed, max_doc=max(s // 2, 1), **kwargs)
    if not sinks:
        layout.pop("sink_mask", None)
    return layout


def _split(layout: dict) -> tuple[str, dict]:
    layout = dict(layout)
    return layout.pop("kind"), layout


def _pad_to_tiles(dense: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, s, s] -> [b, nt, B, nt, B]; positions past s count as masked (create_block_mask's rule)."""
    b, s, _ = dense.shape
    nt = -(-s // block_size)
    extra = nt * block_size - s
    return F.pad(dense, (0, extra, 0, extra)).view(b, nt, block_size, nt, block_size)


def _dense_tiles(dense: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) visible per tile of the dense mask, each [b, nt, nt]."""
    tiles = _pad_to_tiles(dense, block_size)
    return tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)


def _selected_tiles(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Decode BlockMask's ordered layout: [b, 1, nt] counts, [b, 1, nt, nt] indices -> [b, nt, nt] bool."""
    b, _, nt, width = indices.shape
    tiles = torch.zeros(b, nt, nt, dtype=torch.bool)
    for row in range(b):
        for q_tile in range(nt):
            tiles[row, q_tile, indices[row, 0, q_tile, :num_blocks[row, 0, q_tile]].long()] = True
    return tiles


def _block_mask_tiles(block_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(non-empty, partial, full) tiles of a one-head BlockMask, each [b, nt, nt] bool."""
    nonempty = block_mask.to_dense()[:, 0].bool()
    partial = _selected_tiles(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = _selected_tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return nonempty, partial, full


def _key_tile_has_sink(sink_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, s] -> [b, 1, nt]: whether each key tile holds a sink token."""
    b, s = sink_mask.shape
    nt = -(-s // block_size)
    padded = F.pad(sink_mask.bool(), (0, nt * block_size - s))
    return padded.view(b, nt, block_size).any(dim=-1)[:, None, :]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("s,block_size", SHAPES)
@pytest.mark.parametrize("kind", ["causal", "focusft", "block"])
def test_tiles_exact_without_private_keys(kind: str, s: int, block_size: int, seed: int) -> None:
    layout = _layout(kind, s, seed, sinks=False, all_padding_row=seed == 0)
    _, inputs = _split(layout)
    block_mask = flex_block_mask(segment_mask(**layout), block_size)
    any_visible, all_visible = _dense_tiles(dense_mask(**layout), block_size)
    nonempty, partial, full = _block_mask_tiles(block_mask)
    assert torch.equal(nonempty, any_visible)
    assert torch.equal(full, all_visible)
    assert torch.equal(partial, any_visible & ~all_visible)


# Small tiles next to blocks of up to 12 tokens: tiles that are fully visible yet hold a sink
# key, and tiles kept only because privacy hides their pairs, both occur.
SINK_SHAPES = [(64, 4), (48, 4), (33, 8), (75, 16)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("s,block_size", SINK_SHAPES)
def test_tiles_with_sinks(s: int, block_size: int, seed: int) -> None:
    """Sinks: full tiles are exactly the fully visible ones without a sink key; no visible tile
    is skipped; the only extra non-empty tiles are ones whose key tile holds a sink."""
    layout = _layout("block", s, seed, max_block=12)
    block_mask = flex_block_mask(segment_mask(**layout), block_size)
    any_visible, all_visible = _dense_tiles(dense_mask(**layout), block_size)
    has_sink = _key_tile_has_sink(layout["sink_mask"], block_size)
    nonempty, partial, full = _block_mask_tiles(block_mask)
    assert not (partial & full).any()
    assert torch.equal(full, all_visible & ~has_sink)
    assert not (any_visible & ~nonempty).any(), "a tile with visible pairs was skipped"
    extra = nonempty & ~any_visible
    assert not (extra & ~has_sink).any(), "a tile without sinks and without visible pairs was kept"


def test_sink_tiles_by_hand() -> None:
    """s = 10, B = 2: local block 0..5 with sinks 0, 1; global block 6..9 (causal over all)."""
    doc_ids = torch.zeros(1, 10, dtype=torch.long)
    block_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    sink_mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = segment_mask("block", doc_ids=doc_ids, block_ids=block_ids, sink_mask=sink_mask)
    _, partial, full = _block_mask_tiles(flex_block_mask(mask, 2))
    # Query tile 2 (tokens 4, 5) sees sink tile 0 entirely, but a tile with a private key is
    # never trusted as full; query tiles 3, 4 (global) see none of it, yet keep it as partial.
    expected_partial = torch.tensor([[1, 0, 0, 0, 0],
                                     [1, 1, 0, 0, 0],
                                     [1, 0, 1, 0, 0],
                                     [1, 0, 0, 1, 0],
                                     [1, 0, 0, 0, 1]], dtype=torch.bool)
    expected_full = torch.tensor([[0, 0, 0, 0, 0],
                                  [0, 0, 0, 0, 0],
                                  [0, 1, 0, 0, 0],
                                  [0, 1, 1, 0, 0],
                                  [0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(partial[0], expected_partial)
    assert torch.equal(full[0], expected_full)


@pytest.mark.parametrize("s,block_size", [(75, 16), (64, 8)])
@pytest.mark.parametrize("kind", ["causal", "focusft", "block"])
def test_matches_torch_create_block_mask(kind: str, s: int, block_size: int) -> None:
    """Same tiles (partial and full) as torch's own builder applied to the dense reference."""
    layout = _layout(kind, s, seed=3, sinks=False)
    dense = dense_mask(**layout)
    b = dense.shape[0]
    torch_block_mask = create_block_mask(lambda bi, h, q, k: dense[bi, q, k], b, 1, s, s,
                                         device="cpu", BLOCK_SIZE=block_size)
    ours = flex_block_mask(segment_mask(**layout), block_size)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        theirs, mine = getattr(torch_block_mask, name), getattr(ours, name)
        if name.endswith("indices"):
            # Only the first num_blocks entries of each row are meaningful.
            count = getattr(ours, name.replace("indices", "num_blocks"))
            used = torch.arange(mine.shape[-1]) < count[..., None]
            theirs, mine = theirs[used], mine[used]
        assert torch.equal(theirs, mine), name


@pytest.mark.parametrize("s,block_size", [(75, 16), (40, 8)])
@pytest.mark.parametrize("kind", ["causal", "focusft", "block"])
def test_kernel_view_equals_dense(kind: str, s: int, block_size: int) -> None:
    """What a block-sparse kernel computes, full tiles | (partial tiles & mask_mod), is the mask.

    Eager FlexAttention on CPU applies mask_mod everywhere and ignores the tiles, so this is the
    CPU check that a fused kernel (which trusts full tiles and skips empty ones) gets it right.
    """
    layout = _layout(kind, s, seed=4, max_block=6)
    mask = segment_mask(**layout)
    dense = dense_mask(**layout)
    b = dense.shape[0]
    mask_mod_dense = create_mask(segment_mask_mod(mask), b, 1, s, s, device="cpu")[:, 0]
    assert torch.equal(mask_mod_dense, dense)

    _, partial, full = _block_mask_tiles(flex_block_mask(mask, block_size))
    nt = full.shape[-1]

    def expand(tiles: torch.Tensor) -> torch.Tensor:
        return tiles[:, :, None, :, None].expand(b, nt, block_size, nt, block_size)

    kernel_view = expand(full) | (expand(partial) & _pad_to_tiles(mask_mod_dense, block_size))
    assert torch.equal(kernel_view, _pad_to_tiles(dense, block_size))


def test_cached_per_mask_and_block_size() -> None:
    mask = segment_mask(**_layout("focusft", 48, seed=5))
    assert flex_block_mask(mask, 16) is flex_block_mask(mask, 16)
    assert flex_block_mask(mask, 8) is not flex_block_mask(mask, 16)
    with pytest.raises(ValueError, match="block_size"):
        flex_block_mask(mask, 0)


# --- Long sequences: built from intervals, never at s x s ------------------------------------

LONG_DOCS = [  # one row of 32768 tokens: documents as alternating (context, response) run lengths
    [3000, 500, 2200, 1300, 41],
    [7000],  # no response
    [129, 1, 1, 4000, 2500, 3],
    [5000, 3000, 1111],
]


def _long_focusft_row(docs: list[list[int]], s: int) -> tuple[torch.Tensor, torch.Tensor]:
    doc_ids = torch.full((1, s), -1, dtype=torch.long)
    loss_mask = torch.zeros((1, s), dtype=torch.long)
    pos = 0
    for doc, runs in enumerate(docs):
        for run, length in enumerate(runs):
            doc_ids[0, pos:pos + length] = doc
            loss_mask[0, pos:pos + length] = run % 2
            pos += length
    assert pos < s, "the row must end with padding"
    return doc_ids, loss_mask


def _expected_tile_counts(docs: list[list[int]], s: int, block_size: int) -> tuple[int, int]:
    """(non-empty, full) tile counts from the focusft rule, one query tile at a time.

    Query q of a document starting at d sees [d, run_end) in a context run and [d, q + 1) in a
    response run. Per query tile the visible keys are the union over its documents of
    [d, furthest end); the tile is full for key tiles inside every row's interval.
    """
    rows: list[tuple[int, int]] = []  # (lo, hi) visible keys per query, (0, 0) for padding
    pos = 0
    for runs in docs:
        doc_start = pos
        for run, length in enumerate(runs):
            for q in range(pos, pos + length):
                rows.append((doc_start, pos + length if run % 2 == 0 else q + 1))
            pos += length
    rows += [(0, 0)] * (s - pos)

    nonempty = full = 0
    for first in range(0, s, block_size):
        tile_rows = rows[first:first + block_size]
        furthest: dict[int, int] = {}
        for lo, hi in tile_rows:
            if hi > lo:
                furthest[lo] = max(furthest.get(lo, 0), hi)
        key_tiles = set()
        for lo, hi in furthest.items():
            key_tiles.update(range(lo // block_size, (hi - 1) // block_size + 1))
        nonempty += len(key_tiles)
        if len(tile_rows) == block_size and all(hi > lo for lo, hi in tile_rows):
            latest_start = max(lo for lo, _ in tile_rows)
            earliest_end = min(hi for _, hi in tile_rows)
            full += max(0, earliest_end // block_size - -(-latest_start // block_size))
    return nonempty, full


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_long_sequence_tile_counts_without_s_by_s() -> None:
    s, block_size = 32768, 128
    doc_ids, loss_mask = _long_focusft_row(LONG_DOCS, s)
    mask = segment_mask("focusft", doc_ids=doc_ids, loss_mask=loss_mask)
    with _LargestTensor() as watch:
        block_mask = flex_block_mask(mask, block_size)
    nt = s // block_size
    # Largest tensor: per-tile histograms [1, nt, nt + 1], far from s * s = 1.07e9 elements.
    assert watch.largest <= nt * (nt + 1) * 4, watch.largest
    expected_nonempty, expected_full = _expected_tile_counts(LONG_DOCS, s, block_size)
    assert int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()) == expected_nonempty
    assert int(block_mask.full_kv_num_blocks.sum()) == expected_full
    assert expected_full > 0 and expected_nonempty > expected_full
