"""The dense reference mask, written pairwise from the definitions (independent of the interval form)."""

from __future__ import annotations

import torch

from megatron_focusft.masks.layout import MaskKind, validate_inputs


def _run_ids(*keys: torch.Tensor) -> torch.Tensor:
    """Number the maximal runs of equal key tuples along each row, [b, s] -> [b, s]."""
    changes = torch.zeros_like(keys[0], dtype=torch.bool)
    for key in keys:
        changes[:, 1:] |= key[:, 1:] != key[:, :-1]
    return changes.long().cumsum(dim=1)


def dense_mask(
    kind: MaskKind,
    *,
    doc_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """BoolTensor [b, s, s]: True where query row q may attend to key column k.

    doc_ids [b, s]: sample index in its pack, -1 = padding (its rows and columns are all False).
    causal:  causal inside each document.
    focusft: loss_mask [b, s] in {0, 1}; maximal runs of equal loss_mask in a document are blocks;
             0-runs bidirectional, 1-runs causal, every earlier block of the document visible.
    block:   block_ids [b, s] >= 0; the document's highest block id is the global block (causal
             over the whole document); lower ids are local blocks, causal inside themselves only.
             sink_mask [b, s] marks block sink tokens, visible only inside their own block.
    """
    doc_ids, loss_mask, block_ids, sink_mask = validate_inputs(kind, doc_ids, loss_mask, block_ids, sink_mask)
    s = doc_ids.shape[1]
    q_doc, k_doc = doc_ids[:, :, None], doc_ids[:, None, :]
    same_doc = (q_doc == k_doc) & (q_doc >= 0)
    pos = torch.arange(s, device=doc_ids.device)
    key_not_after_query = pos[None, None, :] <= pos[None, :, None]
    if kind == "causal":
        return same_doc & key_not_after_query
    if kind == "focusft":
        block = _run_ids(doc_ids, loss_mask)
        q_block, k_block = block[:, :, None], block[:, None, :]
        query_in_context = (loss_mask == 0)[:, :, None]
        inside_block = (q_block == k_block) & (query_in_context | key_not_after_query)
        return same_doc & (inside_block | (k_block < q_block))
    block = _run_ids(doc_ids, block_ids)
    q_block, k_block = block[:, :, None], block[:, None, :]
    doc_max_id = torch.full_like(block_ids, -1)
    for row in range(doc_ids.shape[0]):
        for doc in doc_ids[row].unique():
            if doc < 0:
                continue
            here = doc_ids[row] == doc
            doc_max_id[row, here] = block_ids[row, here].max()
    query_global = (block_ids == doc_max_id)[:, :, None]
    key_private = torch.zeros_like(same_doc) if sink_mask is None else sink_mask.bool()[:, None, :]
    local = (q_block == k_block) & key_not_after_query
    from_global = query_global & key_not_after_query & ~key_private
    return same_doc & (local | from_global)
