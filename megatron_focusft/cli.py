"""The ``focusft`` command line: ``train``, ``demo``, ``bench attention`` and ``bench step``.

train            the training entry point (``pretrain_focusft.py``), with its own Megatron-style flags.
demo             plain SFT vs FocuSFT on a synthetic long-context chat task, the ``tiny`` preset
                 trained twice on CPU (``megatron_focusft.demo``, its own flags; ``make demo``).
bench attention  forward / forward+backward time of an attention backend on a representative
                 layout of each mask kind, with TFLOP/s counted on the visible area of the mask.
bench step       a FocuSFT training step against a plain SFT step (``megatron_focusft.bench.step``).

Megatron-Core is imported only by ``train``, ``demo`` and ``bench step``: ``bench attention``
needs torch and the masks alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_focusft.masks import MASK_KINDS, SegmentMask, segment_mask
from megatron_focusft.runtime import device_name, median_ms, megatron_session, synchronize

# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


def _quiet_megatron_import_warnings() -> None:
    # Megatron warns at import that TE/Apex are absent and it falls back to torch: expected on
    # CPU (local layer spec, torch optimizer), so it only clutters the progress lines.
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "MimoModelConfig is experimental"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


# ---------------------------------------------------------------------------------------------
# focusft bench attention
# ---------------------------------------------------------------------------------------------

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
    from megatron_focusft.attention.backends import get_attention_backend
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
    backward = not (config.backend == "flex" and device.type == "cpu")
    if not backward:
        result["fwd_bwd_skipped"] = "FlexAttention has no backward on CPU; forward timed without grad"
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


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _mask_list(text: str) -> tuple[str, ...]:
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in MASK_KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated mask kinds from {MASK_KINDS}, got {text!r}")
    return kinds


def _defaults(cls: type) -> argparse.Namespace:
    """A dataclass's field defaults, read without constructing (and so validating) an instance."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    from megatron_focusft.attention.backends import ATTENTION_BACKENDS

    parser = argparse.ArgumentParser(prog="focusft", description="megatron-focusft command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,demo,bench}")
    commands.add_parser("train", help="FocuSFT / SFT training (same flags as pretrain_focusft.py; see train --help)",
                        add_help=False)
    commands.add_parser("demo", help="plain SFT vs FocuSFT on a synthetic long-context task, tiny preset on CPU "
                        "(see demo --help)", add_help=False)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench", required=True, metavar="{attention,step}")
    bench_defaults = _defaults(AttentionBenchConfig)
    attn = bench_commands.add_parser(
        "attention", help="attention backend time and visible-area TFLOP/s per mask kind",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"TFLOP/s convention: {FLOP_CONVENTION}.",
    )
    attn.add_argument("--backend", choices=ATTENTION_BACKENDS, default=bench_defaults.backend,
                      help="attention backend, timed as the model calls it (sdpa includes building its dense mask)")
    attn.add_argument("--mask", type=_mask_list, default=",".join(bench_defaults.masks),
                      help="mask kind(s), comma-separated")
    attn.add_argument("--seq-lengths", type=_int_list, default=",".join(map(str, bench_defaults.seq_lengths)),
                      help="comma-separated sequence lengths")
    attn.add_argument("--batch-size", type=int, default=bench_defaults.batch_size, help="rows (same layout each)")
    attn.add_argument("--heads", type=int, default=bench_defaults.heads, help="query heads")
    attn.add_argument("--kv-heads", type=int, default=bench_defaults.kv_heads, help="key/value heads (GQA)")
    attn.add_argument("--head-dim", type=int, default=bench_defaults.head_dim, help="head dimension")
    attn.add_argument("--dtype", choices=sorted(DTYPES), default=bench_defaults.dtype, help="q/k/v dtype")
    attn.add_argument("--iters", type=int, default=bench_defaults.iters, help="timed iterations (median)")
    attn.add_argument("--warmup", type=int, default=bench_defaults.warmup, help="untimed iterations first")
    attn.add_argument("--device", default=bench_defaults.device, help="torch device")
    attn.add_argument("--json", action="store_true", help="one JSON object per case on stdout")

    from megatron_focusft.bench.step import StepBenchConfig

    step_defaults = _defaults(StepBenchConfig)
    step = bench_commands.add_parser(
        "step", help="FocuSFT training step vs plain SFT step, same model and batch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    step.add_argument("--preset", default=step_defaults.preset, help="model preset (tiny, 1b, llama3-8b)")
    step.add_argument("--seq-lengths", type=_int_list, default=",".join(map(str, step_defaults.seq_lengths)),
                      help="comma-separated sequence lengths")
    step.add_argument("--micro-batch-size", type=int, default=step_defaults.micro_batch_size, help="rows")
    step.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=step_defaults.attention_backend,
                      help="attention backend")
    step.add_argument("--inner-steps", type=int, default=step_defaults.inner_steps, help="FocuSFT inner steps")
    step.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    step.add_argument("--recompute-num-layers", type=int, default=step_defaults.recompute_num_layers,
                      help="full activation recomputation in uniform groups of N layers (0: off)")
    step.add_argument("--iters", type=int, default=step_defaults.iters, help="timed steps (median)")
    step.add_argument("--warmup", type=int, default=step_defaults.warmup, help="untimed steps first")
    step.add_argument("--json", action="store_true", help="one JSON object per case on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``focusft`` and ``python -m megatron_focusft.cli``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["train"]:  # the training entry point keeps its own (Megatron-style) flags
        from megatron_focusft.training.pretrain import main as train_main

        _quiet_megatron_import_warnings()
        return train_main(args_list[1:])
    if args_list[:1] == ["demo"]:  # the demo parses its own flags too
        from megatron_focusft.demo import main as demo_main

        return demo_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    # Settings are validated here, before any work starts, so a bad flag is a usage error.
    try:
        if args.bench == "step":
            from megatron_focusft.bench.step import StepBenchConfig

            step_config = StepBenchConfig(
                preset=args.preset, seq_lengths=args.seq_lengths, micro_batch_size=args.micro_batch_size,
                attention_backend=args.attention_backend, inner_steps=args.inner_steps, bf16=args.bf16,
                recompute_num_layers=args.recompute_num_layers, iters=args.iters, warmup=args.warmup)
        else:
            bench_config = AttentionBenchConfig(
                backend=args.backend, masks=args.mask, seq_lengths=args.seq_lengths, batch_size=args.batch_size,
                heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                iters=args.iters, warmup=args.warmup, device=args.device,
            )
            from megatron_focusft.attention.backends import get_attention_backend

            get_attention_backend(bench_config.backend)
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
    if args.bench == "step":
        from megatron_focusft.bench.step import run_bench_step

        _quiet_megatron_import_warnings()
        with megatron_session(seed=step_config.seed):
            run_bench_step(step_config, as_json=args.json)
    else:
        run_bench_attention(bench_config, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
