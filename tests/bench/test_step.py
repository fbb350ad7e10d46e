"""`focusft bench step`: both steps run and the record is consistent with its own timings."""

from __future__ import annotations

import pytest

from megatron_focusft.bench.step import StepBenchConfig, run_bench_step


@pytest.mark.parametrize("recompute", [0, 1])
def test_bench_step_record(single_rank, recompute, capsys):
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    config = StepBenchConfig(seq_lengths=(64,), micro_batch_size=2, iters=1, warmup=0, recompute_num_layers=recompute)
    (record,) = run_bench_step(config, as_json=False)
    assert record["seq_length"] == 64 and record["recompute_num_layers"] == recompute
    assert record["ratio"] == pytest.approx(record["focusft_step_s"] / record["sft_step_s"])
    assert record["focusft_tokens_per_s"] == pytest.approx(2 * 64 / record["focusft_step_s"])
    assert record["adapted_layers"] == 2  # tiny: 4 layers, fraction 0.35 -> layers 3 and 4
    assert record["focusft_peak_gib"] is None  # peak memory is a GPU measurement
    assert "tok/s" in capsys.readouterr().out


def test_bench_step_rejects_negative_recompute():
    with pytest.raises(ValueError, match="recompute_num_layers must be >= 0"):
        StepBenchConfig(recompute_num_layers=-1)
