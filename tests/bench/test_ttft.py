"""`focusft bench ttft` runs both paths on the same prompt and reports their times (no timing is
asserted: speed is measured by the benchmark, docs/BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.bench.ttft import TtftBenchConfig
from megatron_focusft.cli import main


def test_bench_ttft_reports_both_paths(single_rank, capsys):
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    assert main(["bench", "ttft", "--seq-lengths", "96", "--num-blocks", "2", "--global-tokens", "16", "--iters", "1",
                 "--warmup", "0", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["prompt_tokens"] == 96 and row["num_blocks"] == 2
    assert row["full_prefill_ms"] > 0 and row["cached_blocks_ms"] > 0
    assert row["ttft_ratio"] == pytest.approx(row["cached_blocks_ms"] / row["full_prefill_ms"])


def test_bench_ttft_rejects_lengths_without_room():
    with pytest.raises(ValueError, match="leave no room"):
        TtftBenchConfig(seq_lengths=(40,), num_blocks=8, global_tokens=64)
