"""Context parallelism for segment masks: chunking, local masks, and CP attention vs one process.

Legend: ``S`` full (padded) length, ``cp`` CP size, ``C = S / (2 cp)`` chunk length, ``s = S / cp``
tokens per rank. Distributed tests run CP = 2 and CP = 4 over gloo; every rank builds the same
full inputs from one seed, keeps its split_for_cp part, and the test process reassembles the
parts (merge_cp_parts) and compares them with naive attention over the full dense mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import create_mask

from megatron_focusft.attention.context_parallel import (
    attend_local_queries,
    cp_attention,
    cp_block_mask,
    cp_local_dense_mask,
    reduce_scatter_dim0,
)
from megatron_focusft.masks import dense_mask, segment_mask
from megatron_focusft.parallel.cp_layout import (
    cp_padded_length,
    cp_positions,
    merge_cp_parts,
    pad_mask_for_cp,
    pad_packed_for_cp,
    split_for_cp,
)
from tests.helpers.distributed import init_model_parallel
from tests.helpers.layouts import random_layout
from tests.helpers.naive_attention import naive_attention

KINDS = ["causal", "focusft", "block"]
BATCH, HQ, HKV, HEAD_DIM = 2, 4, 2, 16
SCALE = HEAD_DIM ** -0.5
RAW_LEN = 61  # padded by pad_packed_for_cp to S = 64 for both cp = 2 and cp = 4
# Seeds whose layouts put a document AND a padding run across a chunk border for cp = 2 and 4
# (checked by _assert_straddles, so a change of the layout helper cannot void the test).
LAYOUT_SEED = {"causal": 1, "focusft": 2, "block": 4}
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=1e-6)}


# --- layouts and inputs --------------------------------------------------------------------


def _straddling_layout(kind: str, cp_size: int) -> dict:
    """Random packed layout of RAW_LEN tokens, padded for cp with pad_packed_for_cp."""
    layout = random_layout(kind, BATCH, RAW_LEN, seed=LAYOUT_SEED[kind], max_doc=20)
    layout.pop("kind")
    return pad_packed_for_cp(layout, cp_size)


def _padded_rank_layout(kind: str, cp_size: int, seq_len: int = 32) -> dict:
    """Real tokens only in chunk 0 (row 0 all padding): every rank but 0 holds padding only."""
    chunk = seq_len // (2 * cp_size)
    layout = random_layout(kind, BATCH, chunk, seed=11, max_doc=3, all_padding_row=True)
    layout.pop("kind")
    tail = seq_len - chunk
    return {name: torch.cat([t, t.new_full((BATCH, tail), -1 if name == "doc_ids" else 0)], dim=1)
            for name, t in layout.items()}


def _assert_straddles(doc_ids: torch.Tensor, cp_size: int) -> None:
    seq_len = doc_ids.shape[1]
    chunk = seq_len // (2 * cp_size)
    borders = torch.arange(chunk, seq_len, chunk)
    before, after = doc_ids[:, borders - 1], doc_ids[:, borders]
    assert ((before == after) & (after >= 0)).any(), "no document crosses a chunk border"
    padding_starts = [int((row >= 0).nonzero().max()) + 1 for row in doc_ids if (row >= 0).any()]
    assert any(p % chunk and p // chunk < 2 * cp_size - 1 for p in padding_starts), \
        "no padding run starts inside a chunk and crosses a border"


def _full_inputs(seq_len: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [b, hq, S, d], k, v [b, hkv, S, d] and an output cotangent [b, hq, S, d]."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, HQ, seq_len, HEAD_DIM), (BATCH, HKV, seq_len, HEAD_DIM), (BATCH, HKV, seq_len, HEAD_DIM),
              (BATCH, HQ, seq_len, HEAD_DIM)]
    return tuple(torch.randn(shape, generator=g, dtype=dtype) for shape in shapes)


def _reference(kind: str, layout: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Single-process output and gradients w.r.t. q, k, v (naive attention, dense mask)."""
    q, k, v, cotangent = _full_inputs(layout["doc_ids"].shape[1], seed, dtype)
    for t in (q, k, v):
        t.requires_grad_()
    out = naive_attention(q, k, v, dense_mask(kind, **layout), SCALE)
    (out * cotangent).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


# --- worker functions (run on every rank of a gloo pool) ------------------------------------


def _cp_forward_backward(kind: str, layout: dict, seed: int, dtype: torch.dtype, backend: str = "dense",
                         block_size: int = 8) -> dict[str, torch.Tensor]:
    """This rank's output (and q/k/v gradients for the differentiable dense path)."""
    from megatron.core import parallel_state

    init_model_parallel(cp=dist.get_world_size())
    group = parallel_state.get_context_parallel_group()
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    mask = segment_mask(kind, **layout)
    q, k, v, cotangent = _full_inputs(mask.shape[1], seed, dtype)
    differentiable = backend == "dense"
    local = [split_for_cp(t, cp_size, cp_rank, seq_dim=2).requires_grad_(differentiable) for t in (q, k, v)]
    out = cp_attention(*local, mask, SCALE, group, backend=backend, block_size=block_size)
    if not differentiable:
        return {"out": out}
    (out * split_for_cp(cotangent, cp_size, cp_rank, seq_dim=2)).sum().backward()
    return {"out": out.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}


def _wrong_local_length_error() -> str:
    mask = segment_mask("causal", doc_ids=torch.zeros(BATCH, 16, dtype=torch.long))
    q, k, v, _ = _full_inputs(16, seed=0, dtype=torch.float32)
    try:
        cp_attention(q, k, v, mask, SCALE, None)  # full tensors where the rank's half belongs
    except ValueError as error:
        return str(error)
    return "no error"


def _reduce_scatter_methods(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = (torch.arange(world * 3 * 5, dtype=torch.float64).view(world * 3, 5) * (rank + 1) / 7).to(dtype)
    expected = x.clone()
    dist.all_reduce(expected)
    results = {method: reduce_scatter_dim0(x, None, method) for method in ("native", "all_to_all", "auto")}
    return {"expected": expected[rank * 3:(rank + 1) * 3], **results}


# --- chunking ------------------------------------------------------------------------------


def test_positions_follow_megatron_layout():
    # S = 8, cp = 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_positions(12, 3, 2).tolist() == [4, 5, 6, 7]
    assert cp_positions(6, 1, 0).tolist() == list(range(6))


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_positions_partition_the_sequence_with_balanced_causal_work(cp_size):
    seq_len = 8 * cp_size
    parts = [cp_positions(seq_len, cp_size, rank) for rank in range(cp_size)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(seq_len))
    # Causal attention work of a query at position p is p + 1 keys: equal on every rank.
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_split_and_merge_round_trip(cp_size, seq_dim):
    x = torch.randn(2, 3, 16, 5) if seq_dim == 2 else torch.randn(2, 16, 3)
    parts = [split_for_cp(x, cp_size, rank, seq_dim=seq_dim) for rank in range(cp_size)]
    assert all(p.shape[seq_dim] == 16 // cp_size for p in parts)
    torch.testing.assert_close(parts[-1].select(seq_dim, 0), x.select(seq_dim, (cp_size - 1) * 16 // (2 * cp_size)))
    assert torch.equal(merge_cp_parts(parts, seq_dim=seq_dim), x)


def test_chunking_rejects_bad_lengths_and_ranks():
    with pytest.raises(ValueError, match=r"not a multiple of 2 \* cp = 4.*pad_packed_for_cp.*12"):
        cp_positions(10, 2, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        cp_positions(8, 2, 2)
    with pytest.raises(ValueError, match="one part per CP rank"):
        merge_cp_parts([])
    assert [cp_padded_length(n, 2) for n in (1, 4, 5, 61)] == [4, 4, 8, 64]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cp_size", [2, 3])
def test_padding_for_cp_keeps_the_mask_of_real_tokens(kind, cp_size):
    layout = random_layout(kind, BATCH, RAW_LEN, seed=1, max_doc=20)
    layout.pop("kind")
    layout["labels"] = torch.randint(1, 9, (BATCH, RAW_LEN))
    padded = pad_packed_for_cp(layout, cp_size, fill={"labels": -100})
    seq_len = cp_padded_length(RAW_LEN, cp_size)
    assert all(t.shape == (BATCH, seq_len) for t in padded.values())
    assert (padded["doc_ids"][:, RAW_LEN:] == -1).all() and (padded["labels"][:, RAW_LEN:] == -100).all()
    assert all((padded[name][:, RAW_LEN:] == 0).all() for name in layout if name not in ("doc_ids", "labels"))
    padded.pop("labels")
    layout.pop("labels")
    # Invariant: the real tokens' mask is unchanged; padding sees nothing and is seen by nothing.
    before, after = dense_mask(kind, **layout), dense_mask(kind, **padded)
    assert torch.equal(after[:, :RAW_LEN, :RAW_LEN], before)
    assert not after[:, RAW_LEN:].any() and not after[:, :, RAW_LEN:].any()
    # Padding an already built mask gives the mask of the padded inputs, field by field.
    from_mask, rebuilt = pad_mask_for_cp(segment_mask(kind, **layout), cp_size), segment_mask(kind, **padded)
    for field in ("doc_ids", "block_index", "causal", "sees_prefix", "private"):
        assert torch.equal(getattr(from_mask, field), getattr(rebuilt, field)), field


def test_padding_for_cp_is_a_no_op_on_aligned_batches_and_checks_inputs():
    doc_ids = torch.zeros(1, 8, dtype=torch.long)
    assert torch.equal(pad_packed_for_cp({"doc_ids": doc_ids}, 2)["doc_ids"], doc_ids)
    with pytest.raises(ValueError, match="no 'doc_ids'"):
        pad_packed_for_cp({"tokens": doc_ids}, 2)
    with pytest.raises(ValueError, match=r"tokens has shape \(1, 7\)"):
        pad_packed_for_cp({"doc_ids": doc_ids, "tokens": doc_ids[:, :7]}, 2)
    with pytest.raises(ValueError, match="doc id -1"):
        pad_packed_for_cp({"doc_ids": doc_ids}, 2, fill={"doc_ids": 0})


# --- local masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cp_size", [2, 4])
def test_local_dense_mask_is_the_global_rows(kind, cp_size):
    layout = _straddling_layout(kind, cp_size)
    mask = segment_mask(kind, **layout)
    full = dense_mask(kind, **layout)
    for rank in range(cp_size):
        rows = cp_local_dense_mask(mask, cp_size, rank)
        assert rows.shape == (BATCH, 64 // cp_size, 64)
        assert torch.equal(rows, full[:, cp_positions(64, cp_size, rank)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cp_size", "block_size"), [(2, 8), (2, 16), (4, 8)])
def test_local_block_mask_matches_the_global_rows(kind, cp_size, block_size):
    layout = _straddling_layout(kind, cp_size)
    mask = segment_mask(kind, **layout)
    full = dense_mask(kind, **layout)
    for rank in range(cp_size):
        rows = full[:, cp_positions(64, cp_size, rank)]  # [b, s, S]
        block_mask = cp_block_mask(mask, cp_size, rank, block_size)
        s = rows.shape[1]
        assert block_mask.seq_lengths == (s, 64)
        # Element level: the mask_mod reads the global mask at the local rows' positions.
        assert torch.equal(create_mask(block_mask.mask_mod, BATCH, 1, s, 64, device="cpu")[:, 0], rows)
        # Tile level: every visible pair lies in a selected tile, full tiles are fully visible.
        tiles = rows.view(BATCH, s // block_size, block_size, 64 // block_size, block_size)
        any_visible, all_visible = tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)
        partial = _selected(block_mask.kv_num_blocks, block_mask.kv_indices)
        full_tiles = _selected(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        assert not (partial & full_tiles).any()
        assert torch.equal(any_visible & ~(partial | full_tiles), torch.zeros_like(any_visible))
        assert torch.equal(full_tiles & ~all_visible, torch.zeros_like(full_tiles))


def _selected(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """BlockMask's ordered layout [b, 1, nq], [b, 1, nq, nk] -> selected tiles [b, nq, nk] bool."""
    b, _, nq, nk = indices.shape
    tiles = torch.zeros(b, nq, nk, dtype=torch.bool)
    for row in range(b):
        for q_tile in range(nq):
            tiles[row, q_tile, indices[row, 0, q_tile, :num_blocks[row, 0, q_tile]].long()] = True
    return tiles


def test_local_block_mask_needs_chunks_made_of_whole_tiles():
    mask = segment_mask("causal", doc_ids=torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match=r"S / \(2 cp\) = 12 must be a multiple of block_size 8.*32"):
        cp_block_mask(mask, 2, 0, block_size=8)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("backend", ["dense", "flex"])
@pytest.mark.parametrize("kind", KINDS)
def test_local_attention_of_every_rank_reassembles_full_attention(kind, backend, cp_size):
    """Compute half of cp_attention, ranks simulated in one process (flex forward on CPU)."""
    layout = _straddling_layout(kind, 4)  # S = 64 for every cp_size here
    mask = segment_mask(kind, **layout)
    q, k, v, _ = _full_inputs(64, seed=5, dtype=torch.float64)
    parts = [attend_local_queries(split_for_cp(q, cp_size, rank, seq_dim=2), k, v, mask, SCALE, cp_size, rank,
                                  backend=backend, block_size=8) for rank in range(cp_size)]
    expected = naive_attention(q, k, v, dense_mask(kind, **layout), SCALE)
    torch.testing.assert_close(merge_cp_parts(parts, seq_dim=2), expected, **TOLERANCE[torch.float64])


def test_local_attention_rejects_unknown_backends_and_mismatched_shapes():
    mask = segment_mask("causal", doc_ids=torch.zeros(BATCH, 16, dtype=torch.long))
    q, k, v, _ = _full_inputs(16, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown CP attention backend 'te'"):
        attend_local_queries(split_for_cp(q, 2, 0, seq_dim=2), k, v, mask, SCALE, 2, 0, backend="te")
    with pytest.raises(ValueError, match="do not fit"):
        attend_local_queries(q, k, v, mask, SCALE, 2, 0)


# --- CP = 2 over gloo ----------------------------------------------------------------------


def _check_against_reference(results: list[dict], reference: dict, dtype: torch.dtype,
                             keys: tuple[str, ...] = ("out", "dq", "dk", "dv")) -> None:
    for key in keys:
        parts = [r[key] for r in results]
        assert all(torch.isfinite(p).all() for p in parts), key
        torch.testing.assert_close(merge_cp_parts(parts, seq_dim=2), reference[key], **TOLERANCE[dtype],
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_cp2_matches_single_process_outputs_and_gradients(worker_pool, kind):
    layout = _straddling_layout(kind, 2)
    _assert_straddles(layout["doc_ids"], 2)
    if kind == "block":
        assert segment_mask(kind, **layout).has_private_keys
    results = worker_pool(2).run(_cp_forward_backward, kind, layout, 7, torch.float64)
    reference = _reference(kind, layout, 7, torch.float64)
    assert all(reference[key].abs().max() > 0 for key in ("dq", "dk", "dv"))
    _check_against_reference(results, reference, torch.float64)


def test_cp2_fp32(worker_pool):
    layout = _straddling_layout("focusft", 2)
    results = worker_pool(2).run(_cp_forward_backward, "focusft", layout, 8, torch.float32)
    _check_against_reference(results, _reference("focusft", layout, 8, torch.float32), torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_cp2_rank_with_only_padding_gives_zeros_not_nan(worker_pool, kind):
    layout = _padded_rank_layout(kind, 2)
    assert (split_for_cp(layout["doc_ids"], 2, 1) == -1).all()
    results = worker_pool(2).run(_cp_forward_backward, kind, layout, 9, torch.float64)
    _check_against_reference(results, _reference(kind, layout, 9, torch.float64), torch.float64)
    padding_rank = results[1]
    assert not padding_rank["out"].any() and not padding_rank["dq"].any()
    # Rank 1's keys are seen by nobody: their gradients, summed over ranks, are exactly zero.
    assert not padding_rank["dk"].any() and not padding_rank["dv"].any()
    assert results[0]["dk"].abs().max() > 0


def test_cp2_flex_forward(worker_pool):
    layout = _straddling_layout("block", 2)
    results = worker_pool(2).run(_cp_forward_backward, "block", layout, 10, torch.float64, "flex", 16)
    _check_against_reference(results, _reference("block", layout, 10, torch.float64), torch.float64, keys=("out",))


def test_cp2_rejects_full_length_inputs_before_communicating(worker_pool):
    assert all("s must be S / cp" in message for message in worker_pool(2).run(_wrong_local_length_error))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reduce_scatter_methods_agree_with_all_reduce(worker_pool, dtype):
    for result in worker_pool(2).run(_reduce_scatter_methods, dtype):
        for method in ("native", "all_to_all", "auto"):
            torch.testing.assert_close(result[method], result["expected"], rtol=0, atol=0, msg=method)


# --- CP = 4 over gloo (last: switching pools costs a restart) --------------------------------


def test_cp4_matches_single_process_including_padding_only_ranks(worker_pool):
    pool = worker_pool(4)
    for kind in KINDS:
        layout = _straddling_layout(kind, 4)
        _assert_straddles(layout["doc_ids"], 4)
        results = pool.run(_cp_forward_backward, kind, layout, 12, torch.float64)
        _check_against_reference(results, _reference(kind, layout, 12, torch.float64), torch.float64)
    layout = _padded_rank_layout("block", 4)
    results = pool.run(_cp_forward_backward, "block", layout, 13, torch.float64)
    _check_against_reference(results, _reference("block", layout, 13, torch.float64), torch.float64)
    assert all(not r["out"].any() and not r["dk"].any() for r in results[1:])
