"""The FocuSFT pipeline cost model and the split it picks (focusft/pipeline_cost.py), by hand.

Tiny numbers: bottom layers cost 1 forward and 2 backward, adapted layers 1 + 2 per inner step and
1 + 2 for the outer pass, the head a distinct cost per kind, so every unit's cost can be added up
by hand from the module doc's table.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_focusft.engine.pipeline_plan import Unit, default_window, focusft_passes, simulate
from megatron_focusft.focusft.pipeline_cost import (
    FocusftPipeline,
    LayerCosts,
    StageLayers,
    balance,
    best_split,
    megatron_splits,
    min_max_split,
    stage_layers,
    virtual_balance,
    virtual_split,
)

COSTS = LayerCosts(bottom_forward=1, bottom_backward=2, adapted_inner_forward=1, adapted_inner_backward=2,
                   adapted_outer_forward=1, adapted_outer_backward=2, head_inner_forward=0.25,
                   head_inner_backward=0.5, head_outer_forward=0.125, head_outer_backward=4)


def test_stage_layers_follow_megatron_placement():
    assert stage_layers(16, 11, [12, 4]) == (StageLayers(10, 2, False), StageLayers(0, 4, True))
    with pytest.raises(ValueError, match="do not add up"):
        stage_layers(16, 11, [12, 3])


@pytest.mark.parametrize("context", [False, True])
def test_unit_costs_by_hand(context):
    # Stage 0: 1 bottom layer + 1 adapted; stage 1: 2 adapted + head. k = 0, two inner steps.
    pipe = FocusftPipeline((StageLayers(1, 1, False), StageLayers(0, 2, True)), 2, context, 4)
    causal = 2 if context else 1
    assert pipe.unit_cost(Unit(0, 0, 0, False), COSTS) == 1 + causal * 1  # adapted inner F + own bottom
    assert pipe.unit_cost(Unit(0, 0, 1, False), COSTS) == 1
    assert pipe.unit_cost(Unit(1, 0, 1, False), COSTS) == 2 + 0.25
    assert pipe.unit_cost(Unit(1, 0, 1, True), COSTS) == 4 + 0.5
    assert pipe.unit_cost(Unit(1, 0, 2, False), COSTS) == 2 + 0.125 + ((2 + 0.25) if context else 0)
    assert pipe.unit_cost(Unit(1, 0, 2, True), COSTS) == 4 + 4
    assert pipe.unit_cost(Unit(0, 0, 2, True), COSTS) == 2 + 2


def test_megatron_splits_keep_the_middle_stages_even():
    assert [c for _, _, c in megatron_splits(4, 2)] == [[1, 3], [2, 2], [3, 1]]
    assert all(len(set(c[1:-1])) <= 1 and sum(c) == 16 for _, _, c in megatron_splits(16, 4))
    assert [4, 4, 4, 4] in [c for _, _, c in megatron_splits(16, 4)]


def test_balance_moves_layers_off_the_adapted_stage():
    # 4 layers, 3-4 adapted, 2 inner steps, no head cost: per micro-batch a bottom layer costs 3 and
    # an adapted one 3 x 3 = 9. Splits: 1/3 -> 3 vs 21, 2/2 -> 6 vs 18, 3/1 -> 15 vs 9: 3/1 wins.
    costs = LayerCosts(1, 2, 1, 2, 1, 2, 0, 0, 0, 0)
    chosen = balance(4, 2, 3, 2, False, 16, costs)
    assert (chosen.first, chosen.last, chosen.counts) == (3, 1, (3, 1))
    assert chosen.stage_busy == (16 * 15.0, 16 * 9.0)
    assert "--decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 1" in chosen.describe()


def test_min_max_split_by_hand():
    # Loads 1 1 1 1 4 4 over 3 stages: [1 1 1 1 | 4 | 4] has max 4; every other cut is worse.
    assert min_max_split([1, 1, 1, 1, 4, 4], 3) == [4, 1, 1]
    # 4 1 1 1 1 over 2 stages: [4 | 1 1 1 1] (max 4); with 2 more on the last stage (the head)
    # [4 1 | 1 1 1 + 2] (max 5) beats [4 | 6] and [4 1 1 | 1 1 + 2] (max 6).
    assert min_max_split([4, 1, 1, 1, 1], 2) == [1, 4]
    assert min_max_split([4, 1, 1, 1, 1], 2, last_extra=2) == [2, 3]
    chosen = balance(4, 2, 3, 2, False, 16, LayerCosts(1, 2, 1, 2, 1, 2, 0, 0, 0, 0), any_counts=True)
    assert chosen.counts == (3, 1)


def test_virtual_split_places_chunks_round_robin():
    # 8 layers, 7-8 adapted, over 2 devices x 2 virtual stages of 2 layers: device 0 holds layers
    # 1-2 and 5-6 (bottom), device 1 layers 3-4 (bottom) and 7-8 (adapted) + the head. Per
    # micro-batch a bottom layer costs 1 + 2 = 3; an adapted one 2 x (1 + 2) + 1 + 2 = 9; the head
    # 2 x (0.25 + 0.5) + 0.125 + 4 = 5.625.
    chosen = virtual_split(8, 2, 2, 7, 2, False, 4, COSTS)
    assert chosen.counts == (2, 2, 2, 2) and chosen.virtual_stages == 2
    assert chosen.stage_busy == (4 * 4 * 3.0, 4 * (2 * 3.0 + 2 * 9.0 + 5.625))
    assert chosen.iteration >= max(chosen.stage_busy)
    assert chosen.flags == "--num-layers-per-virtual-pipeline-stage 2"
    with pytest.raises(ValueError, match="do not split evenly"):
        virtual_split(8, 2, 3, 7, 2, False, 4, COSTS)


def test_best_split_takes_any_counts_when_the_flags_cannot_balance():
    # 8 layers, 7-8 adapted, 4 stages, 2 inner steps, no head cost: a bottom layer costs 3 per
    # micro-batch, an adapted one 9. The min-max split 3 / 3 / 1 / 1 loads every stage 9; the
    # first/last-stage flags keep the two middle stages even, and none of their splits has a
    # busiest stage under 12 (e.g. 3 / 2 / 2 / 1: 9, 6, 12, 9), so the layout wins.
    costs = LayerCosts(1, 2, 1, 2, 1, 2, 0, 0, 0, 0)
    chosen = best_split(8, 4, 7, 2, False, 16, costs)
    assert chosen.counts == (3, 3, 1, 1) and chosen.stage_busy == (16 * 9.0,) * 4
    assert max(balance(8, 4, 7, 2, False, 16, costs).stage_busy) >= 16 * 12.0
    assert chosen.flags == "--pipeline-model-parallel-layout Ettt|ttt|t|tL"
    # With two stages every split is a first/last one: the flags, as before.
    two = best_split(4, 2, 3, 2, False, 16, costs)
    assert two.counts == (3, 1) and two.flags.startswith("--decoder-first-pipeline-num-layers 3")


def _moves(counts):
    """Every split one layer away from `counts` across one chunk boundary (each chunk keeps a layer)."""
    for boundary in range(len(counts) - 1):
        for step in (1, -1):
            moved = list(counts)
            moved[boundary] += step
            moved[boundary + 1] -= step
            if min(moved) >= 1:
                yield tuple(moved)


def test_virtual_balance_moves_layers_off_the_device_with_the_adapted_chunk():
    # 8 layers, 7-8 adapted, 2 devices x 2 chunks, 4 micro-batches. Per micro-batch a bottom layer
    # costs 3, an adapted one 9, the head 5.625 (as above). Even chunks put layers 3-4 and 7-8 +
    # the head on device 1: 4 x 29.625 busy against device 0's 4 x 12. The search must shorten
    # the iteration, leave device 1 less busy, and stop at a split no one-layer move improves.
    even = virtual_split(8, 2, 2, 7, 2, False, 4, COSTS)
    chosen = virtual_balance(8, 2, 2, 7, 2, False, 4, COSTS)
    assert sum(chosen.counts) == 8 and min(chosen.counts) >= 1 and chosen.virtual_stages == 2
    assert chosen.iteration < even.iteration and max(chosen.stage_busy) < max(even.stage_busy)
    assert sum(chosen.stage_busy) == pytest.approx(sum(even.stage_busy))  # the same work, moved
    for moved in _moves(chosen.counts):
        layout = "E" + "|".join("t" * n for n in moved) + "L"
        other = FocusftPipeline(stage_layers(8, 7, list(moved)), 2, False, 4, 2).planned(COSTS).simulate(COSTS)
        assert (round(other.makespan, 12), max(other.device_busy(d) for d in range(2))) >= (
            round(chosen.iteration, 12), max(chosen.stage_busy)), layout
    assert chosen.flags == "--pipeline-model-parallel-layout " + "E" + "|".join("t" * n for n in chosen.counts) + "L"


def test_virtual_balance_of_layers_that_do_not_split_evenly():
    # 7 layers over 2 x 2 chunks: the search starts from the min-max split of the layers' loads.
    chosen = virtual_balance(7, 2, 2, 6, 2, False, 4, COSTS)
    assert sum(chosen.counts) == 7 and len(chosen.counts) == 4 and min(chosen.counts) >= 1
    with pytest.raises(ValueError, match="3 layers cannot fill 2 x 2 virtual pipeline stages"):
        virtual_balance(3, 2, 2, 3, 2, False, 4, COSTS)


def test_iteration_bound_by_hand_and_no_simulated_schedule_beats_it():
    # Stage 0: one bottom layer; stage 1: one adapted layer + the head; two inner steps, 4
    # micro-batches. One micro-batch's chain: inner pass 0 forward on stage 0 (1) and stage 1
    # (1 + 0.25), backward on stage 1 (2 + 0.5); pass 1 on stage 1 (1.25, 2.5); the outer forward
    # on stage 1 (1 + 0.125), backward on stage 1 (2 + 4) and stage 0 (2): 17.625 in all. Device 1
    # runs 14.625 of it per micro-batch, after the chain's first unit (1) and before its last (2):
    # iteration >= 1 + 4 x 14.625 + 2 = 61.5; efficiency <= 4 x 17.625 / (2 x 61.5).
    pipe = FocusftPipeline((StageLayers(1, 0, False), StageLayers(0, 1, True)), 2, False, 4)
    assert pipe.iteration_bound(COSTS) == pytest.approx(61.5)
    assert pipe.efficiency_bound(COSTS) == pytest.approx(4 * 17.625 / (2 * 61.5))
    for layers, stages, virtual, micro_batches in [(8, 2, None, 4), (8, 4, None, 16), (8, 2, 2, 4), (16, 4, 2, 16),
                                                   (16, 8, 2, 16)]:
        counts = [layers // (stages * (virtual or 1))] * (stages * (virtual or 1))
        for context in (False, True):
            pipe = FocusftPipeline(stage_layers(layers, layers - layers // 4 + 1, counts), 2, context, micro_batches,
                                   stages if virtual else None)
            for stride in range(1, 2 * pipe.adapted_depth + 1):  # every plan FocusftPipeline.planned weighs
                timeline = replace(pipe, wavefront_stride=stride).simulate(COSTS)
                assert timeline.makespan >= pipe.iteration_bound(COSTS) - 1e-9
                assert timeline.efficiency <= pipe.efficiency_bound(COSTS) + 1e-9


@pytest.mark.parametrize("layers, stages, virtual, first_adapted, micro_batches", [
    (4, 2, None, 2, 4), (16, 4, None, 11, 16), (16, 4, 2, 11, 16), (16, 8, 2, 11, 16), (6, 2, 2, 4, 3)])
def test_planned_takes_the_stride_with_the_shortest_iteration(layers, stages, virtual, first_adapted, micro_batches):
    """planned() against every wavefront stride it weighs (1 .. 2 x the adapted stages' depth),
    each replayed here from the planner's parts (focusft_passes in that stride's order,
    default_window's bound for it): its stride has the shortest iteration, the smallest such
    stride, so never longer than the default's (the depth), and its window is that stride's."""
    chunks = stages * (virtual or 1)
    counts = [layers // chunks + (c < layers % chunks) for c in range(chunks)]
    for context in (False, True):
        pipe = FocusftPipeline(stage_layers(layers, first_adapted, counts), 2, context, micro_batches, virtual and stages)
        k, depth = pipe.first_adapted_stage, chunks - pipe.first_adapted_stage
        makespans = {stride: simulate(focusft_passes(chunks, k, 2, micro_batches, stride), chunks,
                                      lambda unit: pipe.unit_cost(unit, COSTS), default_window(chunks, stride, 2),
                                      num_devices=virtual and stages).makespan
                     for stride in range(1, 2 * depth + 1)}
        planned = pipe.planned(COSTS)
        shortest = min(makespans.values())
        assert planned.stride == min(s for s, t in makespans.items() if t <= shortest + 1e-9)
        assert planned.simulate(COSTS).makespan == pytest.approx(shortest)
        assert shortest <= makespans[depth] and pipe.stride == depth
        assert planned.window == default_window(chunks, planned.stride, 2)


def test_the_chosen_split_carries_its_plan():
    """balance and virtual_balance simulate every split under its best plan and say which stride it
    is (the line --pipeline-balance auto prints)."""
    chosen = virtual_balance(8, 2, 2, 7, 2, False, 4, COSTS)
    pipe = FocusftPipeline(stage_layers(8, 7, list(chosen.counts)), 2, False, 4, 2).planned(COSTS)
    assert chosen.stride == pipe.stride and chosen.iteration == pytest.approx(pipe.simulate(COSTS).makespan)
    assert f"(wavefront stride {chosen.stride})" in chosen.describe()
    flags = balance(4, 2, 3, 2, False, 16, LayerCosts(1, 2, 1, 2, 1, 2, 0, 0, 0, 0))
    assert flags.stride == FocusftPipeline(stage_layers(4, 3, [3, 1]), 2, False, 16).planned(
        LayerCosts(1, 2, 1, 2, 1, 2, 0, 0, 0, 0)).stride
