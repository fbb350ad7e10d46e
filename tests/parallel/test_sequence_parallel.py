"""Sequence parallelism with TP: TP = 2 + SP trains exactly like TP = 1 and like TP = 2 without SP.

Every rank builds the same tiny GPTModel from one seed and runs Megatron's schedule (DDP,
per-token loss averaging, finalize_model_grads) on the same packed micro-batches under the
FocuSFT mask. Compared: the outer loss, every slow-weight gradient (main_grad after finalize:
the norms' gradients are summed over TP there because their weights are marked
sequence_parallel) and, for the FocuSFT step, the inner losses, skipped steps and fast-weight
update norm. Under SP every activation outside the TP regions is a sequence shard, so this also
covers the embedding's reduce-scatter, the fast-weight column adapters on sequence shards, the
scored-position LM head on sequence shards, and the CPU shim for the SP collectives.
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.parallel.tensor_parallel import unshard
from tests.helpers.batches import random_batch
from tests.helpers.distributed import init_model_parallel
from tests.helpers.model import fast_weights_with_random_b
from tests.helpers.noise_band import assert_in_band, perturb_by_one_ulp, with_step_band

# qkv and proj as well: under SP the column adapters see sequence shards (qkv, fc1) and the row
# adapters feed a reduce-scatter (proj, fc2).
FAST = FastWeightConfig(rank=8, alpha=16.0, targets=("qkv", "proj", "fc1", "fc2"))
VOCAB = 512
SEQ = 48  # divisible by TP = 2
# TP = 2 splits the matmuls' reductions, and SP against TP = 2 without SP changes where sums
# over tokens happen (norm and column-adapter A gradients are summed per shard, then over TP):
# both are rounding-sized changes, checked against the TP = 1 run's noise band
# (tests/helpers/noise_band.py); replicated gradients must be equal on both ranks bit for bit.


def _batches() -> list[SegmentBatch]:
    return [random_batch(2, SEQ, VOCAB, seed=seed, max_doc=20) for seed in (51, 52)]


# --- worker functions (every rank of a gloo pool) -------------------------------------------


def _run(tp: int, sp: bool, batches: list[SegmentBatch], focusft: dict | None, perturb_seed: int | None = None) -> dict:
    """One forward/backward through Megatron's schedule; this rank's logs and main_grads (with
    `perturb_seed`: from weights moved by one ulp, for the noise band)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_focusft.engine.setup import ModelSetup, build_model
    from megatron_focusft.focusft import FocusftConfig, make_focusft_forward_step
    from megatron_focusft.sft import sft_forward_step

    init_model_parallel(tp=tp, seed=21)
    model, config = build_model(ModelSetup(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                           fast_weights=FAST if focusft is not None else None))
    assert config.sequence_parallel == sp
    if perturb_seed is not None:
        perturb_by_one_ulp(model.module, perturb_seed)
    if focusft is None:
        forward_step = sft_forward_step
    else:
        initial = iter([fast_weights_with_random_b(config, FAST, batch) for batch in batches])
        forward_step = make_focusft_forward_step(FocusftConfig(fast_weights=FAST, **focusft),
                                                 lambda _batch: next(initial))
    model.zero_grad_buffer()
    logs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=batches[0].tokens.shape[0], forward_only=False)
    grads = {name: (p.main_grad.clone(), getattr(p, "partition_dim", -1), getattr(p, "partition_stride", 1))
             for name, p in model.module.named_parameters()}
    norms_marked = all(getattr(p, "sequence_parallel", None) is sp
                       for name, p in model.module.named_parameters() if "layernorm" in name)
    return {"logs": logs, "grads": grads, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "norms_marked": norms_marked}


def _split_model_under_sp() -> dict:
    """SP: embed gives sequence shards; embed -> layers -> lm_head_loss is GPTModel.forward; the
    scored head equals the full head where one rank holds no scored token."""
    from megatron.core import parallel_state

    from megatron_focusft.engine.setup import ModelSetup, build_model
    from megatron_focusft.engine.split_model import embed, forward_layers, lm_head_loss

    init_model_parallel(tp=2, seed=21)
    model, _ = build_model(ModelSetup(tensor_model_parallel_size=2, sequence_parallel=True))
    gpt = model.module
    batch = _batches()[0]
    with torch.no_grad():
        expected = gpt(batch.tokens, batch.position_ids, batch.attention, labels=batch.labels)
        hidden, rotary = embed(gpt, batch.tokens, batch.position_ids)
        shard_shape = tuple(hidden.shape)
        hidden = forward_layers(gpt, hidden, batch.attention, rotary, range(len(gpt.decoder.layers)))
        full = lm_head_loss(gpt, hidden, batch.labels)
        scored = batch.loss_mask.bool()
        front = scored.clone()
        front[:, SEQ // 2:] = False  # TP rank 1's shard (the second half of every row) scores nothing
        partial = {name: lm_head_loss(gpt, hidden, batch.labels, mask) for name, mask in
                   (("scored", scored), ("front", front))}
    return {"expected": expected, "full": full, "shard_shape": shard_shape, "partial": partial,
            "scored": scored, "front": front, "rank": parallel_state.get_tensor_model_parallel_rank()}


# --- comparison ----------------------------------------------------------------------------


def _full_grad(ranks: list[dict], name: str) -> torch.Tensor:
    """A gradient unsharded over the TP ranks (rank order = TP rank order)."""
    grad, dim, stride = ranks[0]["grads"][name]
    if dim < 0 or len(ranks) == 1:
        return grad
    return unshard([r["grads"][name][0] for r in ranks], dim, stride)


def _check_parity(reference: list[dict], parallel: list[dict], focusft: bool, band: dict[str, float]) -> None:
    """reference: every rank of a run (TP = 1: any rank; TP = 2: all ranks), parallel: all ranks of
    a TP = 2 run. Every loss, inner log and gradient must agree within `band` (the TP = 1 run's noise
    band, tests/helpers/noise_band.py; relative error of the whole tensor)."""
    ref_ranks = sorted(reference, key=lambda r: r["tp_rank"])
    if ref_ranks[0]["tp_rank"] == ref_ranks[-1]["tp_rank"]:
        ref_ranks = ref_ranks[:1]  # TP = 1: both ranks are data-parallel replicas
    ranks = sorted(parallel, key=lambda r: r["tp_rank"])
    for mb, ref_logs in enumerate(ref_ranks[0]["logs"]):
        for r in ranks:  # the loss is the whole micro-batch's on every TP rank
            assert int(r["logs"][mb]["lm loss"][1]) == int(ref_logs["lm loss"][1])
            assert_in_band(r["logs"][mb]["lm loss"][0], ref_logs["lm loss"][0], band[f"lm loss/{mb}"],
                           f"micro-batch {mb} lm loss")
            if focusft:
                for key in ("inner loss before", "inner loss after", "inner skipped steps",
                            "fast weight update norm"):
                    assert int(r["logs"][mb][key][1]) == int(ref_logs[key][1])
                    assert_in_band(r["logs"][mb][key][0], ref_logs[key][0], band[f"{key}/{mb}"],
                                   f"micro-batch {mb} {key}")
    names = ref_ranks[0]["grads"].keys()
    assert names == ranks[0]["grads"].keys()
    for name in names:
        ref_grad = _full_grad(ref_ranks, name)
        assert ref_grad.abs().max() > 0, name
        assert_in_band(_full_grad(ranks, name), ref_grad, band[f"grad/{name}"], name)
        if ranks[0]["grads"][name][1] < 0:  # replicated (norms): the same summed gradient on every rank
            torch.testing.assert_close(ranks[1]["grads"][name][0], ranks[0]["grads"][name][0], rtol=0, atol=0)


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("focusft", [None, {"inner_objective": "response"}, {"inner_objective": "context"}],
                         ids=["sft", "focusft-response", "focusft-context"])
def test_tp2_sequence_parallel_matches_tp1_and_tp2(worker_pool, focusft):
    pool = worker_pool(2)
    batches = _batches()
    tp1 = with_step_band(lambda seed: pool.run(_run, 1, False, batches, focusft, seed))
    tp2 = pool.run(_run, 2, False, batches, focusft)
    sp = pool.run(_run, 2, True, batches, focusft)
    assert all(r["norms_marked"] for r in tp2 + sp)
    if focusft is not None:
        logs = tp1[0]["logs"]
        assert all(log["inner loss after"][0] < log["inner loss before"][0] for log in logs)  # it adapts
    _check_parity(tp1, sp, focusft is not None, tp1[0]["band"])
    _check_parity(tp2, sp, focusft is not None, tp1[0]["band"])


def test_split_model_under_sequence_parallelism(worker_pool):
    results = worker_pool(2).run(_split_model_under_sp)
    for r in results:
        assert r["shard_shape"] == (SEQ // 2, 2, 256)  # [s / TP, b, h]
        assert torch.equal(r["full"], r["expected"])  # GPTModel.forward, op for op
        for name, mask in (("scored", r["scored"]), ("front", r["front"])):
            loss = r["partial"][name]
            assert mask.any() and not loss[~mask].any()
            torch.testing.assert_close(loss[mask], r["expected"][mask], rtol=1e-6, atol=1e-6)
    assert torch.equal(results[0]["expected"], results[1]["expected"])
