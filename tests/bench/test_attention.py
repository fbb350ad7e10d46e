"""`focusft bench attention` (megatron_focusft.bench.attention): records, FLOP counts, flex on CPU.

The benchmark runs once as a subprocess through ``python -m megatron_focusft.cli`` so the module
entry point is covered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_focusft.bench.attention import FLOP_CONVENTION, count_visible_pairs
from megatron_focusft.cli import main
from megatron_focusft.data.synthetic import benchmark_layout
from megatron_focusft.masks import MASK_KINDS, segment_mask
from tests.helpers.layouts import random_layout

REPO = Path(__file__).resolve().parents[2]
TINY_SHAPE = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "fp32", "--iters", "1",
              "--warmup", "0"]


def test_bench_attention_json_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_focusft.cli", "bench", "attention", "--backend", "sdpa",
         "--device", "cpu", "--seq-lengths", "64,100", "--json", *TINY_SHAPE],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [(row["seq_length"], row["mask"]) for row in rows] == [(s, k) for s in (64, 100) for k in MASK_KINDS]
    for row in rows:
        for key in ("backend", "mask", "seq_length", "visible_fraction", "fwd_ms", "fwd_bwd_ms", "tflops_fwd",
                    "tflops_fwd_bwd", "device", "torch_version"):
            assert key in row, key
        assert row["backend"] == "sdpa" and row["error"] is None and row["fwd_bwd_skipped"] is None
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["tflops_fwd"] > 0 and row["tflops_fwd_bwd"] > 0
        assert row["flop_convention"] == FLOP_CONVENTION
        # The benchmark counts pairs from intervals; the dense mask is the reference.
        dense = segment_mask(**benchmark_layout(row["mask"], row["seq_length"], row["batch_size"])).to_dense()
        assert row["visible_pairs"] == int(dense.sum())
        assert row["visible_fraction"] == pytest.approx(dense.double().mean().item(), abs=1e-12)
        flops = 4 * row["visible_pairs"] * row["head_dim"] * row["heads"]
        assert row["tflops_fwd"] == pytest.approx(flops / (row["fwd_ms"] * 1e-3) / 1e12)
        assert row["tflops_fwd_bwd"] == pytest.approx(3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12)


def test_bench_flex_on_cpu_is_forward_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "attention", "--backend", "flex", "--device", "cpu", "--mask", "focusft",
                 "--seq-lengths", "64", "--json", *TINY_SHAPE]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert row["backend"] == "flex" and row["fwd_ms"] > 0
    assert row["fwd_bwd_ms"] is None and row["tflops_fwd_bwd"] is None
    assert "no backward on CPU" in row["fwd_bwd_skipped"]


@pytest.mark.parametrize("seed", range(4))
def test_count_visible_pairs_matches_dense(seed: int) -> None:
    # Random layouts with padding, single-token blocks and private (sink) keys.
    for kind in MASK_KINDS:
        mask = segment_mask(**random_layout(kind, 3, 40, seed=seed, max_doc=17))
        assert count_visible_pairs(mask) == int(mask.to_dense().sum()), kind
