"""The schedule planner and simulator (engine/pipeline_plan.py) against schedules computed by hand.

- Megatron's 1F1B with equal stages: the known iteration time (M + P - 1)(t_f + t_b) and bubble
  fraction (P - 1) / (M + P - 1), exactly (costs are small integers: the simulated times are exact).
- FocuSFT at P = 2, adapted layers on both stages, one inner step, two micro-batches, every unit
  costing 1: each stage's unit order and the iteration time worked out by hand below.
- Virtual stages (4 stages on 2 devices, stage s on device s % 2), 1F1B's passes, forward 1 and
  backward 2: with one micro-batch the chain is serial; with two, worked out by hand below.
- A window too small for the pass order is an error, not a hang.
"""

from __future__ import annotations

import pytest

from megatron_focusft.engine.pipeline_plan import (
    Unit,
    default_window,
    focusft_passes,
    one_f_one_b_passes,
    simulate,
)


@pytest.mark.parametrize("stages, micro_batches", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_one_f_one_b_with_equal_stages_has_the_known_bubble(stages, micro_batches):
    timeline = simulate(one_f_one_b_passes(stages, micro_batches), stages,
                        lambda unit: 2.0 if unit.backward else 1.0, default_window(stages, 1))
    assert timeline.makespan == (micro_batches + stages - 1) * 3.0
    assert timeline.bubble_fraction == pytest.approx((stages - 1) / (micro_batches + stages - 1), abs=1e-12)
    for s in range(stages):  # 1F1B: P - s warm-up forwards, then one forward, one backward
        kinds = ["B" if u.backward else "F" for u in timeline.order[s]]
        warmup = min(stages - s - 1, micro_batches)
        assert kinds[:warmup + 1] == ["F"] * (warmup + 1) and kinds[warmup + 1] == "B"


def test_focusft_two_stages_one_inner_step_by_hand():
    # Passes in order: (m0, inner), (m1, inner), (m0, outer), (m1, outer), each over both stages.
    # t=0 s0 F(0,0); t=1 s0 F(1,0), s1 F(0,0); t=2 s1 B(0,0) (backward first); t=3 s0 B(0,0), s1 F(1,0);
    # t=4 s0 F(0,O) (its update is done), s1 B(1,0); t=5 s0 B(1,0), s1 F(0,O); t=6 s0 F(1,O), s1 B(0,O);
    # t=7 s0 B(0,O), s1 F(1,O); t=8 s1 B(1,O); t=9 s0 B(1,O): done at 10, 8 busy units per stage.
    passes = focusft_passes(2, 0, 1, 2, stride=2)
    timeline = simulate(passes, 2, lambda unit: 1.0, default_window(2, 2, 1))
    f, b = (lambda s, m, p: Unit(s, m, p, False)), (lambda s, m, p: Unit(s, m, p, True))
    assert timeline.order[0] == (f(0, 0, 0), f(0, 1, 0), b(0, 0, 0), f(0, 0, 1), b(0, 1, 0), f(0, 1, 1),
                                 b(0, 0, 1), b(0, 1, 1))
    assert timeline.order[1] == (f(1, 0, 0), b(1, 0, 0), f(1, 1, 0), b(1, 1, 0), f(1, 0, 1), b(1, 0, 1),
                                 f(1, 1, 1), b(1, 1, 1))
    assert timeline.start[b(0, 1, 1)] == 9.0 and timeline.makespan == 10.0
    assert timeline.efficiency == pytest.approx(16 / 20, abs=1e-12)


def test_focusft_passes_form_a_wavefront():
    # Pass (m, j) at position m + 2 j: (0,0) (1,0) (0,1)/(2,0) (1,1)/(3,0) ... older micro-batch first.
    order = [(p.micro_batch, p.step) for p in focusft_passes(2, 0, 2, 3, stride=2)]
    assert order == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (2, 1), (1, 2), (2, 2)]


def test_focusft_passes_cover_the_right_stages():
    passes = focusft_passes(4, 2, 2, 1, stride=2)
    assert [(p.step, p.forward_stages, p.backward_stages) for p in passes] == [
        (0, range(0, 4), range(2, 4)), (1, range(2, 4), range(2, 4)), (2, range(2, 4), range(0, 4))]


def test_a_window_too_small_is_an_error():
    with pytest.raises(RuntimeError, match="cannot progress"):
        simulate(focusft_passes(2, 0, 1, 2, stride=2), 2, lambda unit: 1.0, [1, 1])


def test_a_given_order_is_replayed_as_early_as_dependencies_allow():
    # 1F1B's own order replayed with other costs: each unit starts when its stage is free and its
    # inputs are there. P = 2, M = 2, stage 1 forward 2, everything else 1:
    # s0 F0 [0,1] F1 [1,2]; s1 F0 [1,3] B0 [3,4]; s0 B0 [4,5]; s1 F1 [4,6] B1 [6,7]; s0 B1 [7,8].
    plan = simulate(one_f_one_b_passes(2, 2), 2, lambda unit: 1.0, default_window(2, 1)).order
    timeline = simulate(one_f_one_b_passes(2, 2), 2, lambda u: 2.0 if (u.stage, u.backward) == (1, False) else 1.0,
                        default_window(2, 1), order=plan)
    assert timeline.order == plan
    assert timeline.start[Unit(0, 1, 0, True)] == 7.0 and timeline.makespan == 8.0


def test_virtual_stages_share_their_device_by_hand():
    cost = lambda unit: 2.0 if unit.backward else 1.0  # noqa: E731
    one = simulate(one_f_one_b_passes(4, 1), 4, cost, default_window(4, 1), num_devices=2)
    assert one.makespan == 4 * 1.0 + 4 * 2.0 and one.efficiency == 0.5  # F0 F1 F2 F3 B3 B2 B1 B0, serial
    # Two micro-batches, windows 4 3 2 1. Device 0 (stages 0, 2), device 1 (stages 1, 3); ties go to
    # the backward, then to the lower stage:
    # t=0 s0 F0; t=1 s0 F1, s1 F0; t=2 s1 F1, s2 F0; t=3 s2 F1, s3 F0; t=4 s3 B0 [4, 6] (s3 F1 waits:
    # window 1); t=6 s2 B0 [6, 8], s3 F1 [6, 7]; t=7 s3 B1 [7, 9]; t=9 s1 B0, s2 B1 [9, 11];
    # t=11 s0 B0, s1 B1 [11, 13]; t=13 s0 B1 [13, 15]. Each device is busy 4 x 1 + 4 x 2 = 12 of 15.
    two = simulate(one_f_one_b_passes(4, 2), 4, cost, default_window(4, 1), num_devices=2)
    starts = [[two.start[u] for u in two.order[s]] for s in range(4)]
    assert starts == [[0, 1, 11, 13], [1, 2, 9, 11], [2, 3, 6, 9], [3, 4, 6, 7]]
    assert [u.backward for u in two.order[3]] == [False, True, False, True]
    assert two.makespan == 15.0 and [two.device_busy(d) for d in range(2)] == [12.0, 12.0]
    assert two.efficiency == pytest.approx(24 / 30, abs=1e-12)
    with pytest.raises(ValueError, match="must divide"):
        simulate(one_f_one_b_passes(4, 2), 4, cost, default_window(4, 1), num_devices=3)
