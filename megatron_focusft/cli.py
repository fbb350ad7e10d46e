"""The ``focusft`` command line: ``train``, ``convert``, ``generate``, ``eval``, ``analyze``, ``demo``
``bench attention | step | ttft | pipeline``, ``segment`` and ``data rag | copy | tokenizer``.

train            the training entry point (``pretrain_focusft.py``), with its own Megatron-style flags.
convert          ``import-hf`` / ``export-hf`` (``megatron_focusft.convert.cli``).
generate         text generation (``megatron_focusft.generation.cli``).
eval             long-context evaluation (``megatron_focusft.evaluation.cli``).
analyze          attention sink mass and context engagement per layer and head (``megatron_focusft.analysis.cli``).
demo             plain SFT vs FocuSFT on a synthetic long-context chat task, the ``tiny`` preset
                 trained twice on CPU (``megatron_focusft.demo``, its own flags; ``make demo``).
bench attention  forward / forward+backward time of an attention backend on a representative
                 layout of each mask kind, with TFLOP/s counted on the visible area of the mask
                 (``megatron_focusft.bench.attention``).
bench step       a FocuSFT training step against a plain SFT step (``megatron_focusft.bench.step``).
bench ttft       time to first token with cached blocks vs a full prefill (``megatron_focusft.bench.ttft``).
bench pipeline   FocuSFT's pipeline schedules side by side under torchrun, and the simulator
                 (``megatron_focusft.bench.pipeline``).
segment          automatic segmentation into blocks: apply, train, eval, bench, synthetic
                 (``megatron_focusft.segment.cli``, which holds its flags).
data             synthetic data sets: the RAG-style block-attention task (``rag``), copy practice
                 (``copy``) and a word-level tokenizer for them (``tokenizer``)
                 (``megatron_focusft.data.cli``, which holds their flags).

Megatron-Core is imported only by ``train``, ``convert``, ``generate``, ``eval``, ``analyze``, ``demo``,
``bench step``, ``bench ttft`` and ``bench pipeline``: ``bench attention`` needs torch and the masks alone,
``segment`` and ``data`` torch and the tokenizers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any
from collections.abc import Sequence

from megatron_focusft.masks import MASK_KINDS
from megatron_focusft.runtime import megatron_session, quiet_megatron_import_warnings


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


def _add_timing_flags(parser: argparse.ArgumentParser, defaults: Any, unit: str, per: str) -> None:
    """A benchmark's --iters / --warmup (from its config's defaults) and --json flags."""
    parser.add_argument("--iters", type=int, default=defaults.iters, help=f"timed {unit} (median)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help=f"untimed {unit} first")
    parser.add_argument("--json", action="store_true", help=f"one JSON object per {per} on stdout")


def _defaults(cls: type) -> argparse.Namespace:
    """A dataclass's field defaults, read without constructing (and so validating) an instance."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    from megatron_focusft.attention.backends import attention_backend_names
    from megatron_focusft.bench.attention import DTYPES, FLOP_CONVENTION, AttentionBenchConfig

    parser = argparse.ArgumentParser(prog="focusft", description="megatron-focusft command line")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{train,convert,generate,eval,analyze,demo,bench,segment,data}")
    commands.add_parser("train", help="FocuSFT / SFT training (same flags as pretrain_focusft.py; see train --help)",
                        add_help=False)
    commands.add_parser("convert", help="import-hf / export-hf: Hugging Face <-> Megatron checkpoints "
                        "(see convert --help)", add_help=False)
    commands.add_parser("generate", help="text from an HF directory or a checkpoint: causal or focusft prefill, "
                        "test-time adaptation (see generate --help)", add_help=False)
    commands.add_parser("eval", help="RULER- and BABILong-style long-context tasks on a model (see eval --help)",
                        add_help=False)
    commands.add_parser("analyze", help="sink mass and context engagement per layer and head (see analyze --help)",
                        add_help=False)
    commands.add_parser("demo", help="plain SFT vs FocuSFT on a synthetic long-context task, tiny preset on CPU "
                        "(see demo --help)", add_help=False)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench", required=True, metavar="{attention,step,ttft,pipeline}")
    bench_defaults = _defaults(AttentionBenchConfig)
    attn = bench_commands.add_parser(
        "attention", help="attention backend time and visible-area TFLOP/s per mask kind",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"TFLOP/s convention: {FLOP_CONVENTION}.",
    )
    attn.add_argument("--backend", choices=attention_backend_names(), default=bench_defaults.backend,
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
    _add_timing_flags(attn, bench_defaults, "iterations", "case")
    attn.add_argument("--device", default=bench_defaults.device, help="torch device")

    from megatron_focusft.bench.step import StepBenchConfig

    step_defaults = _defaults(StepBenchConfig)
    step = bench_commands.add_parser(
        "step", help="FocuSFT training step vs plain SFT step, same model and batch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    step.add_argument("--preset", default=step_defaults.preset, help="model preset (tiny, 1b, llama3-8b)")
    step.add_argument("--seq-lengths", type=_int_list, default=",".join(map(str, step_defaults.seq_lengths)),
                      help="comma-separated sequence lengths")
    step.add_argument("--micro-batch-size", type=int, default=step_defaults.micro_batch_size, help="rows")
    step.add_argument("--attention-backend", choices=attention_backend_names(), default=step_defaults.attention_backend,
                      help="attention backend")
    step.add_argument("--inner-steps", type=int, default=step_defaults.inner_steps, help="FocuSFT inner steps")
    step.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    step.add_argument("--recompute-num-layers", type=int, default=step_defaults.recompute_num_layers,
                      help="full activation recomputation in uniform groups of N layers (0: off)")
    _add_timing_flags(step, step_defaults, "steps", "case")
    from megatron_focusft.bench.ttft import TtftBenchConfig

    ttft_defaults = _defaults(TtftBenchConfig)
    ttft = bench_commands.add_parser(
        "ttft", help="time to first token: cached blocks (block attention KV reuse) vs a full prefill",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ttft.add_argument("--preset", default=ttft_defaults.preset, help="model preset")
    ttft.add_argument("--seq-lengths", type=_int_list, default=",".join(map(str, ttft_defaults.seq_lengths)),
                      help="comma-separated prompt lengths")
    ttft.add_argument("--num-blocks", type=int, default=ttft_defaults.num_blocks, help="local blocks per prompt")
    ttft.add_argument("--global-tokens", type=int, default=ttft_defaults.global_tokens, help="global block size")
    ttft.add_argument("--attention-backend", choices=attention_backend_names(), default=ttft_defaults.attention_backend)
    _add_timing_flags(ttft, ttft_defaults, "runs", "length")

    from megatron_focusft.bench.pipeline import PipelineBenchConfig
    from megatron_focusft.focusft.config import INNER_OBJECTIVES

    pipe_defaults = _defaults(PipelineBenchConfig)
    pipe = bench_commands.add_parser(
        "pipeline", help="FocuSFT pipeline schedules side by side (under torchrun, one rank per stage) and the "
        "simulator", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pipe.add_argument("--preset", default=pipe_defaults.preset, help="model preset")
    pipe.add_argument("--seq-length", type=int, default=pipe_defaults.seq_length)
    pipe.add_argument("--micro-batch-size", type=int, default=pipe_defaults.micro_batch_size)
    pipe.add_argument("--num-micro-batches", type=int, default=pipe_defaults.num_micro_batches,
                      help="micro-batches per iteration")
    pipe.add_argument("--inner-steps", type=int, default=pipe_defaults.inner_steps)
    pipe.add_argument("--inner-objective", choices=INNER_OBJECTIVES, default=pipe_defaults.inner_objective)
    pipe.add_argument("--iters", type=int, default=pipe_defaults.iters, help="timed steps per schedule (median)")
    pipe.add_argument("--warmup", type=int, default=pipe_defaults.warmup, help="untimed steps first")
    pipe.add_argument("--simulate-stages", type=_int_list, default=",".join(map(str, pipe_defaults.simulate_stages)),
                      help="PP sizes to simulate from the measured layer costs")
    pipe.add_argument("--virtual-stages", type=_int_list, default=",".join(map(str, pipe_defaults.virtual_stages)),
                      help="also run the interleaved schedule with this many model chunks per rank (virtual "
                           "pipeline stages, even chunks; where the layers split evenly)")
    pipe.add_argument("--simulate-virtual-stages", type=_int_list,
                      default=",".join(map(str, pipe_defaults.simulate_virtual_stages)),
                      help="virtual pipeline stages per device to simulate at each --simulate-stages size "
                           "(where the layers split evenly)")
    pipe.add_argument("--simulate-micro-batches", type=int, default=pipe_defaults.simulate_micro_batches)
    pipe.add_argument("--json", action="store_true", help="one JSON object per record on stdout")

    from megatron_focusft.segment.cli import add_segment_commands

    add_segment_commands(commands)

    from megatron_focusft.data.cli import add_data_commands

    add_data_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``focusft`` and ``python -m megatron_focusft.cli``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["train"]:  # the training entry point keeps its own (Megatron-style) flags
        from megatron_focusft.training.pretrain import main as train_main

        quiet_megatron_import_warnings()
        return train_main(args_list[1:])
    if args_list[:1] == ["convert"]:  # conversion and generation parse their own flags too
        from megatron_focusft.convert.cli import main as convert_main

        return convert_main(args_list[1:])
    if args_list[:1] == ["generate"]:
        from megatron_focusft.generation.cli import main as generate_main

        return generate_main(args_list[1:])
    if args_list[:1] == ["eval"]:
        from megatron_focusft.evaluation.cli import main as eval_main

        return eval_main(args_list[1:])
    if args_list[:1] == ["analyze"]:
        from megatron_focusft.analysis.cli import main as analyze_main

        return analyze_main(args_list[1:])
    if args_list[:1] == ["demo"]:  # the demo parses its own flags too
        from megatron_focusft.demo import main as demo_main

        return demo_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "segment":
        from megatron_focusft.segment.cli import run_segment_command

        try:
            run_segment_command(args)
        except (ValueError, OSError) as exc:  # bad settings, bad rows, missing files: usage errors
            parser.error(str(exc))
        return 0
    if args.command == "data":
        from megatron_focusft.data.cli import run_data_command

        try:
            run_data_command(args)
        except (ValueError, OSError) as exc:  # bad settings, a missing tokenizer, an unwritable output
            parser.error(str(exc))
        return 0
    # Settings are validated here, before any work starts, so a bad flag is a usage error.
    try:
        if args.bench == "ttft":
            from megatron_focusft.bench.ttft import TtftBenchConfig

            ttft_config = TtftBenchConfig(
                preset=args.preset, seq_lengths=args.seq_lengths, num_blocks=args.num_blocks,
                global_tokens=args.global_tokens, attention_backend=args.attention_backend, iters=args.iters,
                warmup=args.warmup)
        elif args.bench == "step":
            from megatron_focusft.bench.step import StepBenchConfig

            step_config = StepBenchConfig(
                preset=args.preset, seq_lengths=args.seq_lengths, micro_batch_size=args.micro_batch_size,
                attention_backend=args.attention_backend, inner_steps=args.inner_steps, bf16=args.bf16,
                recompute_num_layers=args.recompute_num_layers, iters=args.iters, warmup=args.warmup)
        elif args.bench == "pipeline":
            from megatron_focusft.bench.pipeline import PipelineBenchConfig

            pipeline_config = PipelineBenchConfig(
                preset=args.preset, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                num_micro_batches=args.num_micro_batches, inner_steps=args.inner_steps,
                inner_objective=args.inner_objective, iters=args.iters, warmup=args.warmup,
                virtual_stages=args.virtual_stages, simulate_stages=args.simulate_stages,
                simulate_virtual_stages=args.simulate_virtual_stages,
                simulate_micro_batches=args.simulate_micro_batches)
        else:
            from megatron_focusft.bench.attention import AttentionBenchConfig

            bench_config = AttentionBenchConfig(
                backend=args.backend, masks=args.mask, seq_lengths=args.seq_lengths, batch_size=args.batch_size,
                heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
                iters=args.iters, warmup=args.warmup, device=args.device,
            )
            from megatron_focusft.attention.backends import get_attention_backend

            get_attention_backend(bench_config.backend)
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
    if args.bench == "ttft":
        from megatron_focusft.bench.ttft import run_bench_ttft

        quiet_megatron_import_warnings()
        with megatron_session(seed=ttft_config.seed):
            run_bench_ttft(ttft_config, as_json=args.json)
    elif args.bench == "pipeline":
        import os

        from megatron_focusft.bench.pipeline import run_bench_pipeline

        quiet_megatron_import_warnings()
        with megatron_session(seed=pipeline_config.seed,
                              pipeline_model_parallel_size=int(os.environ.get("WORLD_SIZE", "1"))):
            try:
                run_bench_pipeline(pipeline_config, as_json=args.json)
            except ValueError as exc:
                parser.error(str(exc))
    elif args.bench == "step":
        from megatron_focusft.bench.step import run_bench_step

        quiet_megatron_import_warnings()
        with megatron_session(seed=step_config.seed):
            run_bench_step(step_config, as_json=args.json)
    else:
        from megatron_focusft.bench.attention import run_bench_attention

        run_bench_attention(bench_config, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
