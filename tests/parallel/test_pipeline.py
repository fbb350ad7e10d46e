"""Pipeline parallelism: PP = 2 (also x TP = 2, with SP, and x CP = 2) trains exactly like one process.

The harness (tests/helpers/pipeline.py) runs Megatron's 1F1B schedule here, with FocuSFT's
sequential arrangement (engine/pipeline.py): the inner loop on the last stage, or in schedule
calls of its own when the adapted layers span stages. tests/focusft/test_interleaved.py runs the
PP = 2 comparisons through the interleaved schedule; here it also runs with TP = 2 + SP (adapted
layers on both stages), with CP = 2 (also with two model chunks per rank) and at PP = 4.
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.data.batch import make_batch
from tests.helpers.batches import random_batch
from tests.helpers.pipeline import (
    GUARD_RERUN,
    VOCAB,
    check_parity,
    guard_batches,
    pipeline_batches,
    reference_step,
    run_step,
)

# --- PP = 2 x TP = 2 (4 processes) -----------------------------------------------------------


@pytest.mark.parametrize("focusft, sp, fraction, schedule", [
    (None, False, None, "sequential"), ({"inner_objective": "context"}, False, None, "sequential"),
    ({"inner_objective": "response"}, True, None, "sequential"), ({"inner_objective": "context"}, False, 0.75, "sequential"),
    ({"inner_objective": "context"}, True, 0.75, "interleaved")],
    ids=["sft-block", "focusft-context", "focusft-response-sequence-parallel", "focusft-context-adapted-on-both-stages",
         "interleaved-context-adapted-on-both-stages-sequence-parallel"])
def test_pp2_tp2_matches_one_process(worker_pool, focusft, sp, fraction, schedule):
    pool = worker_pool(4)
    batches = pipeline_batches("block" if focusft is None else "focusft")
    reference = reference_step(pool, batches, focusft, layer_fraction=fraction)
    parallel = pool.run(run_step, 2, 2, batches, focusft, None, False, sp, layer_fraction=fraction, schedule=schedule)
    check_parity(reference, parallel, focusft is not None)


@pytest.mark.parametrize("schedule", ["sequential", "interleaved"])
def test_focusft_step_pp2_cp2_matches_one_process(worker_pool, schedule):
    # Each CP rank's chunks of every row (documents straddle the chunk borders) go through
    # the two stages; the context objective also sends the causal activations along.
    pool = worker_pool(4)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": "context"}
    reference = reference_step(pool, batches, focusft)
    parallel = pool.run(run_step, 1, 2, batches, focusft, None, False, False, 2, schedule=schedule)
    check_parity(reference, parallel, focusft=True)


@pytest.mark.parametrize("pp, cp, virtual", [(4, 1, None), (2, 2, 2)],
                         ids=["interleaved-pp4", "interleaved-pp2-cp2-two-chunks-per-rank"])
def test_interleaved_schedule_at_pp4_and_with_model_chunks_under_cp(worker_pool, pp, cp, virtual):
    # PP = 4 (one layer per stage): a rank's previous and next stages are different ranks, so its
    # messages come over two links (interleaved._Link). PP = 2 x CP = 2 with two model chunks per
    # rank. Adapted layers 2-4 (from stage 1), context objective; the reference is the one of the
    # context case adapted on both stages above (the same arguments).
    pool = worker_pool(4)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": "context"}
    reference = reference_step(pool, batches, focusft, layer_fraction=0.75)
    parallel = pool.run(run_step, 1, pp, batches, focusft, None, False, False, cp, layer_fraction=0.75,
                        schedule="interleaved", virtual=virtual)
    check_parity(reference, parallel, focusft=True)


def test_the_sequential_guard_reruns_every_data_parallel_replica(worker_pool):
    """PP = 2 x DP = 2, adapted layers on both stages, GUARD_RERUN: replica 0's samples overflow,
    replica 1's have no response tokens (nothing adapted, nothing to reset). Both replicas must
    run the outer call again, since their gradients are reduced together (a replica that did not
    would leave the other waiting in the reduction). Reference: one process per replica (DP = 4,
    replicas 0, 1, 0, 1: the same token-mean gradient as DP = 2)."""
    pool = worker_pool(4)
    quiet = [make_batch(b.tokens, b.doc_ids, torch.zeros_like(b.response)) for b in pipeline_batches("focusft")]
    replicas = [guard_batches(), quiet]
    focusft = {"inner_objective": "response", **GUARD_RERUN}
    reference = reference_step(pool, replicas[0], focusft, layer_fraction=0.75, replica_batches=replicas)
    assert all(log["inner skipped steps"][0] > 0 for log in reference[0]["logs"])
    parallel = pool.run(run_step, 1, 2, replicas[0], focusft, layer_fraction=0.75, schedule="sequential",
                        replica_batches=replicas)
    check_parity(reference, [r for r in parallel if r["dp_rank"] == 0], focusft=True)


# --- PP = 2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["focusft", "block"])
def test_sft_pp2_matches_one_process(worker_pool, kind):
    pool = worker_pool(2)
    batches = pipeline_batches(kind)
    check_parity(reference_step(pool, batches, None), pool.run(run_step, 1, 2, batches, None), focusft=False)


@pytest.mark.parametrize("kind", ["focusft", "block"])
def test_sft_with_virtual_stages_matches_one_process(worker_pool, kind):
    """Two model chunks per rank (four stages of one layer) through Megatron's interleaved 1F1B,
    four micro-batches (a multiple of PP, as it needs): from the third on, each rank sends to its
    one peer in both directions at once, which the p2p settings of engine/setup.build_gpt keep
    apart (with batched p2p the two directions' tensors were swapped there)."""
    pool = worker_pool(2)
    batches = [*pipeline_batches(kind), random_batch(2, 40, VOCAB, seed=44, kind=kind, max_doc=20)]
    reference = reference_step(pool, batches, None)
    parallel = pool.run(run_step, 1, 2, batches, None, virtual=2)
    assert {r["pp_rank"]: r["layers"] for r in parallel} == {0: [1, 3], 1: [2, 4]}
    check_parity(reference, parallel, focusft=False)


@pytest.mark.parametrize("objective", ["response", "context"])
def test_focusft_step_pp2_matches_one_process(worker_pool, objective):
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": objective}
    reference = reference_step(pool, batches, focusft)
    assert all(log["inner loss after"][0] < log["inner loss before"][0] for log in reference[0]["logs"])
    check_parity(reference, pool.run(run_step, 1, 2, batches, focusft), focusft=True)


@pytest.mark.parametrize("placement", [{"last_stage_layers": 3}, {"layout": "Et|tttL"}],
                         ids=["last-stage-flag", "layout"])
def test_uneven_stages_last_stage_runs_its_own_bottom_layer(worker_pool, placement):
    # Stage 0: layer 1; stage 1: layer 2 (below the fast weights: both masks) and layers 3-4; by
    # Megatron's last-stage flag or by its layout string.
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": "context"}
    parallel = pool.run(run_step, 1, 2, batches, focusft, **placement)
    assert [r["layers"] for r in parallel] == [[1], [2, 3, 4]]
    check_parity(reference_step(pool, batches, focusft), parallel, focusft=True)


def test_stage_times_report_the_inner_loop_on_the_last_stage(worker_pool):
    pool = worker_pool(2)
    results = pool.run(run_step, 1, 2, pipeline_batches("focusft"), {"inner_objective": "response"}, None, True)
    assert results[0]["stage_times"] == results[1]["stage_times"]  # gathered: every rank has all stages
    first, last = results[0]["stage_times"]
    assert (first.stage, last.stage) == (0, 1)
    for t in (first, last):
        assert t.forward > 0 and t.backward > 0 and t.total >= t.forward + t.backward
        assert 0 < t.busy_fraction <= 1
    assert first.inner == 0 and 0 < last.inner < last.forward


@pytest.mark.parametrize("objective", ["response", "context"])
def test_adapted_layers_on_both_stages_match_one_process(worker_pool, objective):
    # Layer fraction 0.75: layers 2-4 adapted; stage 0 holds layers 1 (below) and 2 (adapted),
    # stage 1 layers 3-4. Each inner step is a schedule call of its own over both stages.
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": objective}
    reference = reference_step(pool, batches, focusft, layer_fraction=0.75)
    assert all(log["inner loss after"][0] < log["inner loss before"][0] for log in reference[0]["logs"])
    parallel = pool.run(run_step, 1, 2, batches, focusft, layer_fraction=0.75)
    assert [r["layers"] for r in parallel] == [[1, 2], [3, 4]]
    check_parity(reference, parallel, focusft=True)


@pytest.mark.parametrize("objective", ["response", "context"])
def test_the_guards_outer_rerun_with_the_sequential_schedule_matches_one_process(worker_pool, objective):
    """Adapted layers 2-4 on both stages, GUARD_RERUN's overflowing inner step: the last stage's
    check after the outer call resets every adapted sample on both stages and the outer call runs
    again (pipelined_inner.reset_broken_samples, FocusftForwardStep.after_schedule); the context
    objective's inner loss after is taken again with the initial fast weights."""
    pool = worker_pool(2)
    batches = guard_batches()
    focusft = {"inner_objective": objective, **GUARD_RERUN}
    reference = reference_step(pool, batches, focusft, layer_fraction=0.75)
    for log in reference[0]["logs"]:  # the check fired (a step skipped) and the loss is finite again
        assert log["inner skipped steps"][0] > 0 and torch.isfinite(log["lm loss"][0])
    parallel = pool.run(run_step, 1, 2, batches, focusft, layer_fraction=0.75, schedule="sequential")
    check_parity(reference, parallel, focusft=True)
