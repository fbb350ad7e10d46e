"""Random mask layouts for tests: packing, padding, multi-turn, single-token blocks, sinks."""

from __future__ import annotations

import torch

from megatron_focusft.masks import MaskKind


def _runs(total: int, generator: torch.Generator, max_run: int) -> list[int]:
    """Split `total` tokens into random run lengths in [1, max_run]."""
    lengths = []
    while total > 0:
        n = int(torch.randint(1, max_run + 1, (1,), generator=generator))
        n = min(n, total)
        lengths.append(n)
        total -= n
    return lengths


def random_layout(
    kind: MaskKind,
    batch: int,
    seq: int,
    *,
    seed: int,
    max_doc: int | None = None,
    max_block: int = 5,
    all_padding_row: bool = False,
) -> dict[str, torch.Tensor | str]:
    """Keyword arguments for dense_mask / segment_mask, random but reproducible.

    Each row packs documents of random length, then padding of random length (possibly none).
    focusft rows mix context and response runs, including single-token runs and documents with
    no response; block rows get random block ids, and a random subset of each local block's
    leading tokens are sinks. `all_padding_row` makes row 0 entirely padding.
    """
    g = torch.Generator().manual_seed(seed)
    max_doc = max_doc or seq
    doc_ids = torch.full((batch, seq), -1, dtype=torch.long)
    loss_mask = torch.zeros((batch, seq), dtype=torch.long)
    block_ids = torch.zeros((batch, seq), dtype=torch.long)
    sink_mask = torch.zeros((batch, seq), dtype=torch.long)
    for row in range(batch):
        if all_padding_row and row == 0:
            continue
        used = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        pos = 0
        for doc, length in enumerate(_runs(used, g, max_doc)):
            doc_ids[row, pos:pos + length] = doc
            no_response = bool(torch.rand((), generator=g) < 0.2)
            block_pos = pos
            for block, block_len in enumerate(_runs(length, g, max_block)):
                loss_mask[row, block_pos:block_pos + block_len] = 0 if no_response else block % 2
                block_ids[row, block_pos:block_pos + block_len] = block
                n_sinks = int(torch.randint(0, min(2, block_len) + 1, (1,), generator=g))
                sink_mask[row, block_pos:block_pos + n_sinks] = 1
                block_pos += block_len
            # Sinks belong to local blocks only: clear them in the document's last block.
            last = block_ids[row, pos:pos + length].max()
            doc_slice = sink_mask[row, pos:pos + length]
            doc_slice[block_ids[row, pos:pos + length] == last] = 0
            pos += length
    out: dict[str, torch.Tensor | str] = {"kind": kind, "doc_ids": doc_ids}
    if kind == "focusft":
        out["loss_mask"] = loss_mask
    if kind == "block":
        out["block_ids"] = block_ids
        out["sink_mask"] = sink_mask
    return out
