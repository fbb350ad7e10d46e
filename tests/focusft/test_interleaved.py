"""The interleaved FocuSFT pipeline schedule (focusft/interleaved.py) trains exactly like one process.

PP = 2 on the tiny model (4 layers), three packed micro-batches, one forward/backward through
`FocusftForwardStep.forward_backward_func` (the interleaved schedule) with DDP and per-token loss
averaging, against the PP = 1, TP = 1 run (Megatron's no-pipelining schedule, the bilevel step in
one forward): every micro-batch's loss, inner loss before and after, skipped steps and update
norm, and every slow-weight gradient (main_grad after finalize_model_grads). Placements:
- response objective, layer fraction 0.5 (layers 3-4 adapted), even split: every adapted layer on
  the last stage;
- context objective, layer fraction 0.75 (layers 2-4 adapted): the adapted layers span both
  stages (stage 0 holds layer 1 below them and layer 2 with fast weights), so inner gradients, the
  guard's status and its decision cross the stages, and the causal activations travel beside the
  outer ones;
- response objective, layer fraction 0.75 with one layer on the last stage: stage 0 holds a
  bottom layer and two adapted ones (uneven stages).
And the guard's outer re-run (an inner lr that overflows the outer pass), adapted layers on the
last stage and on both stages; two model chunks per rank, also with a plan of another wavefront
stride. The cases keep the file near 2 minutes on two cores (each reference is four one-process
runs; the stride case reuses the virtual-stage case's).

Tolerance: the one-process run's own noise band (tests/helpers/noise_band.py): the reference
repeated from weights moved by one ulp (three seeds), each tensor's relative error x10, at least
32 fp32 eps. The schedule changes only the order of independent micro-batches' work and the
order of fp32 sums (the update norm is summed over the stages in float64), so a correct schedule
lands inside it; a wrong dependency (a stale fast weight, a missed decision, a gradient of the
wrong micro-batch) moves a loss or gradient by orders of magnitude more. The reference itself
must adapt (inner loss after < before), so the inner loop is not vacuous.
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.focusft.pipeline_cost import NOMINAL_COSTS, FocusftPipeline, LayerCosts, stage_layers
from tests.helpers.pipeline import (
    GUARD_RERUN,
    check_parity,
    guard_batches,
    pipeline_batches,
    reference_step,
    run_step,
)


@pytest.mark.parametrize("objective, fraction, last_stage_layers", [
    ("response", 0.5, None), ("context", 0.75, None), ("response", 0.75, 1)],
    ids=["response-adapted-on-last-stage", "context-adapted-on-both-stages", "response-three-adapted-layers-on-stage-0"])
def test_interleaved_schedule_matches_one_process(worker_pool, objective, fraction, last_stage_layers):
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": objective}
    reference = reference_step(pool, batches, focusft, layer_fraction=fraction)
    assert all(log["inner loss after"][0] < log["inner loss before"][0] for log in reference[0]["logs"])
    parallel = pool.run(run_step, 1, 2, batches, focusft, last_stage_layers, layer_fraction=fraction,
                        schedule="interleaved")
    check_parity(reference, parallel, focusft=True)


@pytest.mark.parametrize("objective, fraction", [("response", 0.5), ("context", 0.75)],
                         ids=["adapted-on-last-stage", "adapted-on-both-stages"])
def test_the_guards_outer_rerun_matches_one_process(worker_pool, objective, fraction):
    """GUARD_RERUN's inner step overflows the outer pass, so the guard's last check trains every
    adapted sample again with its initial fast weights (focusft/step.outer_broken_samples). Under
    PP the last stage sees it; the re-run crosses the stages after the planned units
    (interleaved._rerun). tests/parallel/test_pipeline.py checks the sequential schedule's."""
    pool = worker_pool(2)
    batches = guard_batches()
    focusft = {"inner_objective": objective, **GUARD_RERUN}
    reference = reference_step(pool, batches, focusft, layer_fraction=fraction)
    for log in reference[0]["logs"]:  # the check fired (a step skipped) and the loss is finite again
        assert log["inner skipped steps"][0] > 0 and torch.isfinite(log["lm loss"][0])
    parallel = pool.run(run_step, 1, 2, batches, focusft, layer_fraction=fraction, schedule="interleaved")
    check_parity(reference, parallel, focusft=True)


@pytest.mark.parametrize("objective, fraction", [("response", 0.5), ("context", 0.75)],
                         ids=["response-adapted-on-both-chunks-of-rank-0-and-1", "context-adapted-from-stage-1"])
def test_virtual_stages_match_one_process(worker_pool, objective, fraction):
    """Two model chunks per rank (four stages of one layer, stage s on rank s mod 2): the messages
    of both chunks share each link, in the sender's order (interleaved._Link)."""
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": objective}
    reference = reference_step(pool, batches, focusft, layer_fraction=fraction)
    parallel = pool.run(run_step, 1, 2, batches, focusft, layer_fraction=fraction, schedule="interleaved", virtual=2)
    assert {r["pp_rank"]: r["layers"] for r in parallel} == {0: [1, 3], 1: [2, 4]}
    check_parity(reference, parallel, focusft=True)


def test_a_plan_of_another_stride_from_plan_costs_matches_one_process(worker_pool):
    """With an inner backward three times its forward, FocusftPipeline.planned picks wavefront
    stride 3 for two chunks per rank with layers 3-4 adapted (the default, the adapted stages'
    depth, is 2; nominal costs keep 2): every rank runs that plan's units, in its order, and the
    step trains as one process."""
    costs = LayerCosts(bottom_forward=1, bottom_backward=2, adapted_inner_forward=1, adapted_inner_backward=6,
                       adapted_outer_forward=1, adapted_outer_backward=2, head_inner_forward=0,
                       head_inner_backward=0, head_outer_forward=0, head_outer_backward=0)
    pipeline = FocusftPipeline(stage_layers(4, 3, [1, 1, 1, 1]), 2, False, 3, num_devices=2)
    planned = pipeline.planned(costs)
    assert (pipeline.stride, pipeline.planned(NOMINAL_COSTS).stride, planned.stride) == (2, 2, 3)
    plan = planned.simulate(costs)
    assert plan.order != pipeline.simulate(NOMINAL_COSTS).order
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": "response"}
    reference = reference_step(pool, batches, focusft, layer_fraction=0.5)
    parallel = pool.run(run_step, 1, 2, batches, focusft, layer_fraction=0.5, schedule="interleaved", virtual=2,
                        plan_costs=costs)
    assert {r["pp_rank"]: r["units"] for r in parallel} == {rank: list(plan.device_order(rank)) for rank in (0, 1)}
    check_parity(reference, parallel, focusft=True)


def test_uneven_virtual_stages_from_a_layout_match_one_process(worker_pool):
    """Six layers in chunks of 1 / 2 / 1 / 2 layers (layout Et|tt|t|ttL at PP 2, as
    --pipeline-balance auto writes for virtual stages): rank 0 holds layers 1 and 4, rank 1 layers
    2-3 and 5-6; the context objective with layers 4-6 adapted, so the inner loop runs from
    rank 0's second chunk to rank 1's and back."""
    pool = worker_pool(2)
    batches = pipeline_batches("focusft")
    focusft = {"inner_objective": "context"}
    reference = reference_step(pool, batches, focusft, layer_fraction=0.5, num_layers=6)
    parallel = pool.run(run_step, 1, 2, batches, focusft, layer_fraction=0.5, schedule="interleaved", virtual=2,
                        layout="Et|tt|t|ttL", num_layers=6)
    assert {r["pp_rank"]: r["layers"] for r in parallel} == {0: [1, 4], 1: [2, 3, 5, 6]}
    check_parity(reference, parallel, focusft=True)
