"""`focusft bench pipeline` runs the schedules (with virtual stages too), the layer-cost measurement, the balance and the
simulator end to end on two gloo ranks (tiny preset, small shapes). No timing is asserted: speed is
measured by the benchmark (docs/BENCHMARKS.md); this checks the records are whole and consistent."""

from __future__ import annotations

import pytest

from megatron_focusft.bench.pipeline import PipelineBenchConfig
from megatron_focusft.cli import main


def _bench(config: PipelineBenchConfig) -> list[dict]:
    from megatron_focusft.bench.pipeline import run_bench_pipeline
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel(pp=2)
    return run_bench_pipeline(config, as_json=True)


def test_bench_pipeline_reports_every_schedule_and_the_simulator(worker_pool):
    config = PipelineBenchConfig(preset="tiny", seq_length=32, num_micro_batches=2, iters=1, warmup=0,
                                 virtual_stages=(2, 3), simulate_stages=(2,), simulate_virtual_stages=(2, 3),
                                 simulate_micro_batches=4)
    records = worker_pool(2).run(_bench, config)
    assert records[0] == records[1]  # every figure is gathered: both ranks report the same
    runs = [r for r in records[0] if "schedule" in r]
    # tiny: 4 layers; 2 x 3 virtual stages do not fit them, so that size is left out, and 2 x 2
    # balanced chunks can only be the even ones.
    assert [r["schedule"] for r in runs] == ["sequential, even split", "sequential, balanced split",
                                             "interleaved, balanced split", "interleaved, 2 virtual stages per device",
                                             "interleaved, 2 virtual stages per device, balanced"]
    assert runs[3]["layers_per_stage"] == runs[4]["layers_per_stage"] == [1, 1, 1, 1]
    for run in runs:
        assert sum(run["layers_per_stage"]) == 4 and run["tokens_per_s"] > 0
        assert all(0 < share <= 1 for share in run["stage_busy_share"])
        assert run["pipeline_efficiency"] == pytest.approx(sum(run["stage_busy_share"]) / 2)
    assert runs[1]["layers_per_stage"] == runs[2]["layers_per_stage"]
    sims = [r for r in records[0] if "simulator" in r]
    assert [r["simulator"] for r in sims] == [run["schedule"] for run in runs[2:]]
    for sim in sims:
        assert sim["predicted_forward_backward_s"] > 0 and len(sim["measured_unit_busy_s"]) == 2
    simulated = [r for r in records[0] if "simulated_stages" in r]
    assert [(r["simulated_stages"], r["split"]) for r in simulated] == [
        (2, "first/last-stage flags"), (2, "any layer count per stage"), (2, "2 virtual stages per device, even"),
        (2, "2 virtual stages per device, balanced")]
    for sim in simulated[2:]:
        assert sim["layers_per_stage"] == [1, 1, 1, 1] and len(sim["predicted_stage_busy_s"]) == 2
    assert simulated[2]["predicted_iteration_s"] == simulated[3]["predicted_iteration_s"]  # the same chunks
    assert all(0 < r["predicted_efficiency"] <= r["efficiency_bound"] <= 1 for r in simulated)
    assert all(0 < run["efficiency_bound"] <= 1 for run in runs[2:]) and "efficiency_bound" not in runs[0]
    assert set(records[0][-1]["virtual_balanced_splits"]) == {"2"}


def test_bench_pipeline_needs_one_rank_per_stage(single_rank, capsys):
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "pipeline", "--preset", "tiny"])
    assert exit_info.value.code == 2
    assert "runs one rank per pipeline stage under torchrun" in capsys.readouterr().err
