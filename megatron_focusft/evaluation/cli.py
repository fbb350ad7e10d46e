"""`focusft eval`: long-context tasks on a checkpoint or an HF directory (torchrun for TP > 1).

    focusft eval --load CKPT --tasks niah_single_essay,vt,cwe --lengths 4096,8192 --samples 50 \\
        --output-dir runs/eval/base [--prefill focusft] [--test-time-adaptation] [--compare OTHER]
    focusft eval --load CKPT --tasks rag_shared --lengths 2048 --attention block --output-dir runs/eval/rag

Generated tasks (evaluation/long_context_tasks.py) are sized in tokens of the model's own
tokenizer; `--ruler-file` / `--babilong-file` read the official pre-generated files instead, and
`--rag-file` the block rows of `focusft data rag`. Block tasks (rag, rag_shared) put their
passages in local blocks: `--attention full` prefills the blocks' tokens then the question as
one prompt, `--attention block` runs block attention with KV reuse (one block cache for the run).
Writes results.json, predictions.jsonl and scores.png to --output-dir; with --compare (another
results.json) also compare.md and compare.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_focusft.evaluation.long_context_tasks import TASKS
from megatron_focusft.evaluation.model_predictor import ATTENTION_MODES, check_attention
from megatron_focusft.generation.cli import add_model_arguments, check_model_arguments

DEFAULT_TASKS = ("niah_single_essay", "niah_multikey_essay", "vt", "cwe", "babilong_qa1")


def task_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; expected names from {sorted(TASKS)}")
    return names


def positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_eval_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="focusft eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    tasks = parser.add_argument_group("tasks")
    tasks.add_argument("--tasks", type=task_names, default=",".join(DEFAULT_TASKS), help="generated tasks, comma-separated")
    tasks.add_argument("--lengths", type=positive_ints, default="4096", help="prompt lengths in tokens, comma-separated")
    tasks.add_argument("--samples", type=int, default=20, help="samples per task and length")
    tasks.add_argument("--ruler-file", action="append", default=[],
                       help="RULER validation.jsonl (task name: its folder; repeatable; replaces --tasks)")
    tasks.add_argument("--babilong-file", action="append", default=[], metavar="TASK:LENGTH:PATH",
                       help="BABILong rows (input, question, target) for TASK at LENGTH (repeatable)")
    tasks.add_argument("--rag-file", action="append", default=[],
                       help="block rows of `focusft data rag` (task rag; repeatable; replaces --tasks)")
    tasks.add_argument("--prompt-format", choices=("chat", "raw"), default="chat",
                       help="chat: one user turn with the chat template; raw: the prompt text as is")
    tasks.add_argument("--attention", choices=ATTENTION_MODES, default="full",
                       help="full: each prompt prefilled whole; block: block attention with KV reuse (local blocks "
                            "encoded alone and cached across the run, the global block over them)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True)
    out.add_argument("--compare", default=None, help="another run's results.json: side-by-side table and plot")
    out.add_argument("--label", default=None, help="this run's name in tables and plots (default: the output dir)")
    args = parser.parse_args(argv)
    try:
        check_model_arguments(args)
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        for spec in args.babilong_file:
            if spec.count(":") < 2 or not spec.split(":")[1].isdigit():
                raise ValueError(f"--babilong-file {spec!r}: expected TASK:LENGTH:PATH")
        block_tasks = args.rag_file or [t for t in args.tasks if TASKS[t].family == "rag"]
        if block_tasks and args.prompt_format == "raw":
            raise ValueError("--prompt-format raw: the block tasks' global block is a chat turn (use chat)")
        check_attention(args.attention, args.prefill, args.test_time_adaptation)
        for path in [*args.ruler_file, *(s.split(":", 2)[2] for s in args.babilong_file), *args.rag_file]:
            if not Path(path).is_file():
                raise ValueError(f"{path} does not exist")
        if args.compare and not Path(args.compare).is_file():
            raise ValueError(f"--compare {args.compare} does not exist")
    except ValueError as e:
        parser.error(str(e))
    return args


def _samples(args: argparse.Namespace, count_tokens) -> list:
    from megatron_focusft.evaluation.long_context_tasks import generate_samples
    from megatron_focusft.evaluation.samples import read_babilong_jsonl, read_rag_jsonl, read_ruler_jsonl

    files = [s for path in args.ruler_file for s in read_ruler_jsonl(path)]
    for spec in args.babilong_file:
        task, length, path = spec.split(":", 2)
        files += read_babilong_jsonl(path, task, int(length))
    rag = TASKS["rag"]
    files += [s for path in args.rag_file for s in read_rag_jsonl(path, rag.name, rag.metric, rag.max_new_tokens)]
    if files:
        return files
    return [s for task in args.tasks for length in args.lengths
            for s in generate_samples(task, length, args.samples, count_tokens, args.seed)]


def run_eval(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_focusft.evaluation.harness import comparison_table, plot_results, run_evaluation, write_results
    from megatron_focusft.evaluation.model_predictor import ModelPredictor
    from megatron_focusft.generation.cli import load_for_inference
    from megatron_focusft.generation.decode import GenerationConfig

    rank0 = dist.get_rank() == 0
    setup = load_for_inference(args)
    tokenizer = setup.tokenizer
    samples = _samples(args, lambda text: len(tokenizer.encode(text)))
    predictor = ModelPredictor(setup.loaded, tokenizer, GenerationConfig(prefill=args.prefill,
                                                                          stop_token_ids=setup.stop_token_ids),
                               chat=args.prompt_format == "chat", test_time_adaptation=setup.test_time_adaptation,
                               seed=args.seed, attention=args.attention)
    scored = run_evaluation(samples, predictor, args.micro_batch_size, progress=rank0)
    if not rank0:
        return {}
    out = Path(args.output_dir)
    label = args.label or out.name
    meta = {"model": args.load or args.hf_path, "ckpt_step": args.ckpt_step, "prefill": args.prefill,
            "test_time_adaptation": args.test_time_adaptation, "attention": args.attention, "seed": args.seed,
            "label": label,
            "command": args.command}
    if args.attention == "block":
        cache = predictor.cache
        meta["block_cache"] = {"hits": cache.hits, "misses": cache.misses}
        print(f"block cache: {cache.hits} hits, {cache.misses} blocks encoded", file=sys.stderr)
    results = write_results(out, scored, meta)
    plot_results(out / "scores.png", [(label, results)])
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        other_label = other.get("meta", {}).get("label", Path(args.compare).parent.name)
        (out / "compare.md").write_text(comparison_table(results, other, (label, other_label)) + "\n")
        plot_results(out / "compare.png", [(label, results), (other_label, other)])
    for task, by_length in results["results"].items():
        for length, r in by_length.items():
            print(f"{task:>24} @ {length:>6}: {r['score']:5.1f} [{r['ci95'][0]:5.1f}, {r['ci95'][1]:5.1f}] "
                  f"({r['samples']} samples, {r['mean_prompt_tokens']:.0f} prompt tokens)")
    return results


def main(argv: Sequence[str]) -> int:
    from megatron_focusft.generation.cli import run_inference_command

    args = parse_eval_args(argv)
    args.command = shlex.join(["focusft", "eval", *argv])
    return run_inference_command("focusft eval", args, run_eval)
