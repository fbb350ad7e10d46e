"""Context parallelism inside the Megatron model: CP = 2 (and CP = 2 x TP = 2, with and without
sequence parallelism) trains exactly like CP = 1.

Every rank builds the same tiny GPTModel from one seed, takes its split_batch_for_cp part of the
same packed micro-batches (raw length not a multiple of 2 cp, so the splitter pads; documents
straddle chunk borders) and runs Megatron's schedule with DDP and per-token loss averaging.
Compared with the CP = 1 run of the unsplit batches: the outer loss (the ranks' [sum, count]
added up), every slow-weight gradient (main_grad after finalize_model_grads) and, for FocuSFT,
the inner losses, skipped steps and fast-weight update norm.
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch, sample_index_from_doc_ids
from megatron_focusft.data.cp_split import split_batch_for_cp
from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.parallel.cp_layout import cp_padded_length, split_for_cp
from megatron_focusft.parallel.tensor_parallel import unshard
from tests.helpers.batches import random_batch
from tests.helpers.distributed import init_model_parallel
from tests.helpers.model import fast_weights_with_random_b
from tests.helpers.noise_band import assert_in_band, perturb_by_one_ulp, with_step_band

FAST = FastWeightConfig(rank=8, alpha=16.0)
VOCAB = 512
RAW_LEN = 46  # padded to 48 for cp = 2: chunks of 12
# Summation order changes with CP (K/V gradients reduce-scattered, slow-weight gradients summed
# over two ranks) and TP (split matmul reductions), so parity is at fp32 noise level, not bitwise:
# every comparison is against the one-process run's own noise band (tests/helpers/noise_band.py).


# --- batches -------------------------------------------------------------------------------


def _straddling_batches(kind: str) -> list[SegmentBatch]:
    batches = [random_batch(2, RAW_LEN, VOCAB, seed=seed, kind=kind, max_doc=20) for seed in (31, 32)]
    padded_len = cp_padded_length(RAW_LEN, 2)
    chunk = padded_len // 4
    for batch in batches:
        doc = torch.cat([batch.doc_ids, batch.doc_ids.new_full((2, padded_len - RAW_LEN), -1)], dim=1)
        borders = torch.arange(chunk, padded_len, chunk)
        assert ((doc[:, borders - 1] == doc[:, borders]) & (doc[:, borders] >= 0)).any(), "no document straddles"
    return batches


def _front_loaded_batch(seq_len: int = 32) -> SegmentBatch:
    """Two samples in the first 8 tokens of row 0, padding elsewhere: at cp = 2 (chunks of 8)
    CP rank 1 (chunks 1 and 2) holds padding only."""
    doc_ids = torch.full((2, seq_len), -1, dtype=torch.long)
    response = torch.zeros((2, seq_len), dtype=torch.long)
    doc_ids[0, :8] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    response[0, :8] = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1])
    tokens = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(3))
    return make_batch(tokens, doc_ids, response)


# --- worker functions (every rank of a gloo pool) -------------------------------------------


def _run(tp: int, cp: int, batches: list[SegmentBatch], focusft: dict | None, sp: bool = False,
         perturb_seed: int | None = None) -> dict:
    """One forward/backward through Megatron's schedule; this rank's logs and main_grads (with
    `perturb_seed`: from weights moved by one ulp, for the noise band)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_focusft.engine.setup import ModelSetup, build_model
    from megatron_focusft.focusft import FocusftConfig, make_focusft_forward_step
    from megatron_focusft.sft import sft_forward_step

    init_model_parallel(tp=tp, cp=cp, seed=21)
    cp_rank = parallel_state.get_context_parallel_rank()
    model, config = build_model(ModelSetup(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                           sequence_parallel=sp, fast_weights=FAST if focusft is not None else None))
    if perturb_seed is not None:
        perturb_by_one_ulp(model.module, perturb_seed)
    local = [split_batch_for_cp(batch, cp, cp_rank) for batch in batches]
    if focusft is None:
        forward_step = sft_forward_step
    else:
        initial = [fast_weights_with_random_b(config, FAST, batch) for batch in batches]
        fast_weights_for = iter(initial).__next__
        forward_step = make_focusft_forward_step(FocusftConfig(fast_weights=FAST, **focusft),
                                                 lambda _batch: fast_weights_for())
    model.zero_grad_buffer()
    logs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(local), model=[model], num_microbatches=len(local),
        seq_length=local[0].tokens.shape[1], micro_batch_size=local[0].tokens.shape[0], forward_only=False)
    grads = {name: (p.main_grad.clone(), getattr(p, "partition_dim", -1), getattr(p, "partition_stride", 1))
             for name, p in model.module.named_parameters()}
    return {"logs": logs, "grads": grads, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "cp_rank": cp_rank, "local_tokens": [int((b.doc_ids >= 0).sum()) for b in local]}


# --- comparison ----------------------------------------------------------------------------


def _full_grad(ranks: list[dict], name: str) -> torch.Tensor:
    """A gradient unsharded over the TP ranks of one CP rank (rank order = TP rank order)."""
    grad, dim, stride = ranks[0]["grads"][name]
    if dim < 0 or len(ranks) == 1:
        return grad
    return unshard([r["grads"][name][0] for r in ranks], dim, stride)


def _reference(pool, *args) -> list[dict]:
    """The CP = 1, TP = 1 run of these arguments, with its noise band (tests/helpers/noise_band.py)."""
    return with_step_band(lambda seed: pool.run(_run, 1, 1, *args, perturb_seed=seed))


def _check_parity(reference: list[dict], parallel: list[dict], focusft: bool) -> None:
    """reference: _reference's result; parallel: all ranks of the CP run. Every loss, inner log and
    gradient must agree within the reference's band (relative error of the whole tensor).
    """
    ref = reference[0]
    band = ref["band"]
    cp_ranks = sorted({r["cp_rank"] for r in parallel})
    assert len(cp_ranks) > 1
    for mb, ref_logs in enumerate(ref["logs"]):
        # The outer loss: each CP rank's [sum, count] of its tokens; together the whole batch.
        by_cp = [next(r for r in parallel if r["cp_rank"] == c)["logs"][mb]["lm loss"] for c in cp_ranks]
        total = torch.stack(by_cp).sum(dim=0)
        assert int(total[1]) == int(ref_logs["lm loss"][1])
        assert_in_band(total[0], ref_logs["lm loss"][0], band[f"lm loss/{mb}"], f"micro-batch {mb} lm loss")
        if focusft:
            for r in parallel:  # inner-loop logs describe the whole micro-batch on every CP rank
                for key in ("inner loss before", "inner loss after", "inner skipped steps",
                            "fast weight update norm"):
                    assert int(r["logs"][mb][key][1]) == int(ref_logs[key][1])
                    assert_in_band(r["logs"][mb][key][0], ref_logs[key][0], band[f"{key}/{mb}"],
                                   f"micro-batch {mb} {key}")
    for c in cp_ranks:
        ranks = sorted((r for r in parallel if r["cp_rank"] == c), key=lambda r: r["tp_rank"])
        for name, (ref_grad, _, _) in ref["grads"].items():
            assert_in_band(_full_grad(ranks, name), ref_grad, band[f"grad/{name}"], f"cp rank {c} {name}")


# --- CP = 2 x TP = 2 (first: the suite's previous test leaves the 4-rank pool up) --------------


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_focusft_step_cp2_tp2_matches_cp1(worker_pool, sp):
    # With SP each CP rank's 24 tokens per row are split again over its 2 TP ranks.
    pool = worker_pool(4)
    batches = _straddling_batches("focusft")
    focusft = {"inner_objective": "context"}
    reference = _reference(pool, batches, focusft)
    _check_parity(reference, pool.run(_run, 2, 2, batches, focusft, sp), focusft=True)


# --- CP = 2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["focusft", "block"])
def test_sft_cp2_matches_cp1(worker_pool, kind):
    pool = worker_pool(2)
    batches = _straddling_batches(kind)
    reference = _reference(pool, batches, None)
    _check_parity(reference, pool.run(_run, 1, 2, batches, None), focusft=False)


@pytest.mark.parametrize("objective", ["response", "context"])
def test_focusft_step_cp2_matches_cp1(worker_pool, objective):
    pool = worker_pool(2)
    batches = _straddling_batches("focusft")
    focusft = {"inner_objective": objective}
    reference = _reference(pool, batches, focusft)
    logs = reference[0]["logs"]
    assert all(log["inner loss after"][0] < log["inner loss before"][0] for log in logs)  # it adapts
    _check_parity(reference, pool.run(_run, 1, 2, batches, focusft), focusft=True)


@pytest.mark.parametrize("focusft", [None, {"inner_objective": "response"}, {"inner_objective": "context"}],
                         ids=["sft", "focusft-response", "focusft-context"])
def test_rank_holding_only_padding_contributes_nothing_and_no_nan(worker_pool, focusft):
    batch = _front_loaded_batch()
    assert (split_for_cp(batch.doc_ids, 2, 1) == -1).all() and batch.loss_mask.any()
    pool = worker_pool(2)
    reference = _reference(pool, [batch], focusft)
    parallel = pool.run(_run, 1, 2, [batch], focusft)
    padding_rank = next(r for r in parallel if r["cp_rank"] == 1)
    assert padding_rank["local_tokens"] == [0]
    assert padding_rank["logs"][0]["lm loss"].tolist() == [0.0, 0.0]
    for r in parallel:
        assert all(torch.isfinite(g).all() for g, _, _ in r["grads"].values())
        if focusft is not None:
            assert r["logs"][0]["inner skipped steps"][0] == 0
    _check_parity(reference, parallel, focusft=focusft is not None)


# --- the splitter on its own ---------------------------------------------------------------


def test_split_batch_pads_splits_and_keeps_the_global_mask_and_sample_numbers():
    batch = random_batch(2, RAW_LEN, VOCAB, seed=31, max_doc=20)
    padded_len = cp_padded_length(RAW_LEN, 2)
    global_index = sample_index_from_doc_ids(batch.doc_ids)
    parts = [split_batch_for_cp(batch, 2, rank) for rank in range(2)]
    for rank, part in enumerate(parts):
        assert part.tokens.shape == (2, padded_len // 2)
        assert part.attention.shape == (2, padded_len)
        assert torch.equal(part.attention.doc_ids[:, :RAW_LEN], batch.attention.doc_ids)
        assert (part.attention.doc_ids[:, RAW_LEN:] == -1).all()
        index, n = part.sample_index, part.num_samples
        assert n == int(global_index.max()) + 1  # every rank knows every sample
        padded_index = torch.cat([global_index, global_index.new_full((2, padded_len - RAW_LEN), -1)], dim=1)
        assert torch.equal(index, split_for_cp(padded_index, 2, rank))
    # The parts hold every token once; padding has doc id -1 and loss weight 0.
    assert sum(int(p.loss_mask.sum()) for p in parts) == int(batch.loss_mask.sum())
    assert sum(int((p.doc_ids >= 0).sum()) for p in parts) == int((batch.doc_ids >= 0).sum())
    positions = torch.cat([p.position_ids for p in parts], dim=1).sort(dim=1).values
    assert torch.equal(positions, torch.arange(padded_len).expand(2, -1))
    assert split_batch_for_cp(batch, 1, 0) is batch
    tiled = split_batch_for_cp(batch, 2, 1, chunk_multiple=16)  # whole 16-token tiles per chunk
    assert tiled.attention.shape == (2, 64) and tiled.tokens.shape == (2, 32)
    with pytest.raises(ValueError, match="already split"):
        split_batch_for_cp(parts[0], 2, 0)


# --- SegmentCoreAttention's CP paths: flex forward, te refused, unsplit batches refused --------


def _per_token_loss(cp: int, backend: str, batch: SegmentBatch) -> dict:
    """Forward only: this rank's per-token loss [b, s] and its tokens' global positions."""
    from megatron.core import parallel_state

    from megatron_focusft.engine.setup import ModelSetup, build_model

    init_model_parallel(cp=cp, seed=21)
    cp_rank = parallel_state.get_context_parallel_rank()
    model, _ = build_model(ModelSetup(attention_backend=backend, context_parallel_size=cp))
    local = split_batch_for_cp(batch, cp, cp_rank, chunk_multiple=128 if backend == "flex" else 1)
    with torch.no_grad():
        loss = model(local.tokens, local.position_ids, local.attention, labels=local.labels)
    return {"loss": loss, "positions": local.global_positions}


def _construction_and_shape_errors() -> dict:
    from megatron_focusft.engine.setup import ModelSetup, build_model

    init_model_parallel(cp=2, seed=21)
    errors = {}
    try:
        build_model(ModelSetup(attention_backend="te", context_parallel_size=2))
    except ValueError as error:
        errors["te"] = str(error)
    model, _ = build_model(ModelSetup(context_parallel_size=2))
    batch = random_batch(1, 16, VOCAB, seed=5)
    try:  # the unsplit batch: every rank refuses it in its first layer, before any collective
        model(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
    except ValueError as error:
        errors["unsplit"] = str(error)
    return errors


def test_flex_backend_forward_under_cp_matches_sdpa_without_cp(worker_pool):
    # flex has no CPU backward (see tests/attention/test_flex.py): forward parity here. Chunks must
    # be whole 128-token tiles: the splitter pads 500 tokens to S = 512 at cp = 2.
    batch = random_batch(1, 500, VOCAB, seed=41, max_doc=150)
    pool = worker_pool(2)
    expected = pool.run(_per_token_loss, 1, "sdpa", batch)[0]["loss"]
    parts = pool.run(_per_token_loss, 2, "flex", batch)
    for part in parts:
        real = part["positions"] < expected.shape[1]
        torch.testing.assert_close(part["loss"][:, real], expected[:, part["positions"][real]],
                                   rtol=1e-5, atol=1e-5)


def test_cp_refuses_te_and_unsplit_batches(worker_pool):
    for errors in worker_pool(2).run(_construction_and_shape_errors):
        assert "no context-parallel path" in errors["te"]
        assert "the mask must be [b, S]" in errors["unsplit"]
