"""`focusft bench attention`: forward / forward+backward time of an attention backend per mask kind.

Each case is one representative layout (``data.synthetic.benchmark_layout``) of a mask kind at
one sequence length; TFLOP/s are counted on the visible area of the mask. Needs torch, the
masks and the attention backends, no Megatron-Core.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron_focusft.masks import MASK_KINDS, SegmentMask, segment_mask
from megatron_focusft.runtime import device_name, median_ms, synchronize

# FLOPs of attention over the pairs a mask leaves visible: QK^T and PV are 2 * d FLOPs each
# per (query, key, head) -> 4 * pairs * d * heads for the forward. The backward recomputes
# QK^T and does 4 more matmuls (dV, dP, dQ, dK): 2.5x the forward (FlashAttention's
# convention), so forward + backward counts 1 + 2.5 = 3.5x the forward.
FWD_FLOPS_PER_PAIR_DIM_HEAD = 4
BWD_OVER_FWD_FLOPS = 2.5
FLOP_CONVENTION = (
    "visible-area FLOPs: fwd = 4 * visible_pairs * head_dim * heads (heads = query heads; "
    "visible_pairs summed over the batch, counted from the SegmentMask intervals); "
    f"bwd = {BWD_OVER_FWD_FLOPS} x fwd; fwd_bwd = {1 + BWD_OVER_FWD_FLOPS} x fwd"
)
CPU_MAX_SEQ_LENGTH = 8192
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class AttentionBenchConfig:
    """Settings of ``focusft bench attention``."""

    backend: str = "flex"
    masks: tuple[str, ...] = MASK_KINDS
    seq_lengths: tuple[int, ...] = (4096, 16384, 32768)
    batch_size: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bf16"
    iters: int = 10
    warmup: int = 3
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self) -> None:
        unknown = [m for m in self.masks if m not in MASK_KINDS]
        if unknown:
            raise ValueError(f"unknown mask kind(s) {unknown}; expected any of {MASK_KINDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a positive multiple of kv_heads ({self.kv_heads})")
        if self.head_dim < 1 or self.batch_size < 1 or self.iters < 1 or self.warmup < 0:
            raise ValueError("head_dim, batch_size and iters must be >= 1, warmup >= 0")
        if not self.seq_lengths or min(self.seq_lengths) < 16:
            raise ValueError(f"seq_lengths must be >= 16 (the block layout has 9 blocks), got {self.seq_lengths}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if device.type == "cpu" and max(self.seq_lengths) > CPU_MAX_SEQ_LENGTH:
            raise ValueError(f"on CPU the benchmark is a smoke test: seq lengths up to {CPU_MAX_SEQ_LENGTH} "
                             f"(got {max(self.seq_lengths)}); try --seq-lengths 256 --heads 4 --kv-heads 2 "
                             f"--head-dim 32 --dtype fp32")


def count_visible_pairs(mask: SegmentMask) -> int:
    """Number of visible (query, key) pairs of `mask`, summed over the batch, in O(b * s).

    Without private keys, query q sees exactly [kv_start[q], kv_end[q]). With private (sink)
    keys the row intervals over-count, so the count is taken per key from the column
    intervals instead (key k is seen by two query intervals, privacy included).
    """
    if not mask.has_private_keys:
        kv_start, kv_end = mask.kv_interval
        return int((kv_end - kv_start).clamp(min=0).sum())
    q_start, q_end, q2_start, q2_end = mask.column_intervals()
    return int(((q_end - q_start).clamp(min=0) + (q2_end - q2_start).clamp(min=0)).sum())


def bench_attention_case(config: AttentionBenchConfig, kind: str, seq_length: int) -> dict[str, Any]:
    """Time one (mask kind, seq length) case; never raises for OOM (reported in 'error')."""
    from megatron_focusft.attention.backends import attention_backend, get_attention_backend
    from megatron_focusft.data.synthetic import benchmark_layout

    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]
    b, s, d = config.batch_size, seq_length, config.head_dim
    mask = segment_mask(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                           for k, v in benchmark_layout(kind, s, b).items()})
    pairs = count_visible_pairs(mask)
    fwd_flops = FWD_FLOPS_PER_PAIR_DIM_HEAD * pairs * d * config.heads
    result: dict[str, Any] = {
        "backend": config.backend, "mask": kind, "seq_length": s, "batch_size": b,
        "heads": config.heads, "kv_heads": config.kv_heads, "head_dim": d, "dtype": config.dtype,
        "visible_pairs": pairs, "visible_fraction": pairs / (b * s * s),
        "fwd_ms": None, "fwd_bwd_ms": None, "tflops_fwd": None, "tflops_fwd_bwd": None,
        "fwd_bwd_skipped": None, "error": None, "fwd_mode": None, "first_call_ms": None,
        "iters": config.iters, "warmup": config.warmup,
        "device": device_name(device), "torch_version": torch.__version__,
        "flop_convention": FLOP_CONVENTION,
    }
    attention = get_attention_backend(config.backend)
    scale = 1.0 / math.sqrt(d)
    # FlexAttention refuses CPU inputs that require grad ("does not support backward on CPU"),
    # so on CPU it is timed as an inference forward and its backward is reported as skipped.
    backward = device.type == "cuda" or attention_backend(config.backend).cpu_backward
    if not backward:
        result["fwd_bwd_skipped"] = f"{config.backend} has no backward on CPU; forward timed without grad"
    result["fwd_mode"] = "training (inputs require grad)" if backward else "inference (no grad)"
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous case's tensors are gone; start from a clean pool
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, config.heads, s, d, device=device, dtype=dtype, generator=gen).requires_grad_(backward)
        k, v = (torch.randn(b, config.kv_heads, s, d, device=device, dtype=dtype, generator=gen)
                .requires_grad_(backward) for _ in range(2))
        grad_out = torch.randn_like(q)

        def forward() -> None:
            attention(q, k, v, mask, scale)

        def forward_backward() -> None:
            q.grad = k.grad = v.grad = None
            attention(q, k, v, mask, scale).backward(grad_out)

        # First calls, untimed: compilation (flex on CUDA) and the mask's backend form.
        t0 = time.perf_counter()
        forward()
        synchronize(device)
        result["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        if backward:
            forward_backward()
        result["fwd_ms"] = median_ms(forward, config.iters, config.warmup, device)
        if backward:
            result["fwd_bwd_ms"] = median_ms(forward_backward, config.iters, config.warmup, device)
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    if result["fwd_ms"]:
        result["tflops_fwd"] = fwd_flops / (result["fwd_ms"] * 1e-3) / 1e12
    if result["fwd_bwd_ms"]:
        result["tflops_fwd_bwd"] = (1 + BWD_OVER_FWD_FLOPS) * fwd_flops / (result["fwd_bwd_ms"] * 1e-3) / 1e12
    return result


def _fmt(value: float | None, width: int, precision: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{precision}f}"


def run_bench_attention(config: AttentionBenchConfig, as_json: bool) -> list[dict[str, Any]]:
    """All cases of `config`; prints a table (or one JSON object per line) as cases finish."""
    results = []
    if not as_json:
        print(f"bench attention: backend {config.backend}, [b={config.batch_size}, hq={config.heads}, "
              f"hkv={config.kv_heads}, d={config.head_dim}], {config.dtype}, {device_name(torch.device(config.device))}, "
              f"torch {torch.__version__}; median of {config.iters} after {config.warmup} warm-up")
        print(f"TFLOP/s convention: {FLOP_CONVENTION}")
        print(f"{'mask':>8} {'seq':>7} {'visible':>8} {'fwd ms':>10} {'fwd+bwd ms':>11} {'TF/s fwd':>9} {'TF/s f+b':>9}")
    for s in config.seq_lengths:
        for kind in config.masks:
            result = bench_attention_case(config, kind, s)
            results.append(result)
            if as_json:
                print(json.dumps(result), flush=True)
                continue
            note = result["error"] or ("fwd+bwd skipped: " + result["fwd_bwd_skipped"] if result["fwd_bwd_skipped"] else "")
            print(f"{kind:>8} {s:>7} {result['visible_fraction']:>8.3f} {_fmt(result['fwd_ms'], 10)} "
                  f"{_fmt(result['fwd_bwd_ms'], 11)} {_fmt(result['tflops_fwd'], 9)} "
                  f"{_fmt(result['tflops_fwd_bwd'], 9)}  {note}".rstrip(), flush=True)
    return results
