"""`focusft analyze`: sink mass and context engagement per layer and head on a probe set.

    focusft analyze --load CKPT --data-path chats.jsonl --output-dir runs/analyze/base
    focusft analyze --hf-path DIR --tasks niah_single_essay,vt --lengths 4096 --samples 8 --output-dir OUT

The probes are chats (`messages`; the assistant turns are the response queries) or generated
long-context tasks (the prompt as a user turn, the reference answer as the reply), one forward
each under `--mask`. Writes analysis.json (per layer x head, pooled, the query count) and
heatmap.png. The numbers are the training log's metrics (analysis/attention_metrics.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_focusft.evaluation.long_context_tasks import TASKS
from megatron_focusft.generation.cli import add_model_source_arguments


def parse_analyze_args(argv: Sequence[str]) -> argparse.Namespace:
    from megatron_focusft.evaluation.cli import positive_ints, task_names

    parser = argparse.ArgumentParser(prog="focusft analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser)
    probes = parser.add_argument_group("probes")
    probes.add_argument("--data-path", default=None, help="chat JSONL (`messages`) as probes")
    probes.add_argument("--tasks", type=task_names, default=None, help=f"generated task probes, from {sorted(TASKS)}")
    probes.add_argument("--lengths", type=positive_ints, default="2048")
    probes.add_argument("--samples", type=int, default=4, help="probes per task and length")
    probes.add_argument("--mask", choices=("focusft", "causal"), default="focusft", help="the mask of the forward")
    probes.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    try:
        if (args.hf_path is None) == (args.load is None):
            raise ValueError("give exactly one of --hf-path and --load")
        if (args.data_path is None) == (args.tasks is None):
            raise ValueError("give --data-path FILE or --tasks NAMES as the probe set")
        if args.data_path and not Path(args.data_path).is_file():
            raise ValueError(f"--data-path {args.data_path} does not exist")
    except ValueError as e:
        parser.error(str(e))
    return args


def _probe_chats(args: argparse.Namespace, tokenizer) -> list[list[dict]]:
    if args.data_path:
        with open(args.data_path, encoding="utf-8") as f:
            return [json.loads(line)["messages"] for line in f if line.strip()]
    from megatron_focusft.evaluation.long_context_tasks import generate_samples

    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    # A block task's probe is its full-attention form: the blocks, then the question, one user turn.
    return [[{"role": "user", "content": "\n\n".join((*s.blocks, s.prompt))},
             {"role": "assistant", "content": " ".join(s.references)}]
            for task in args.tasks for length in args.lengths
            for s in generate_samples(task, length, args.samples, count, args.seed)]


def combine(profiles) -> tuple[tuple[int, ...], dict[str, torch.Tensor], int]:
    """Per (layer, head) means over all probes' response queries (each probe weighted by its count)."""
    queries = sum(p.queries for p in profiles)
    values = {name: sum(p.values[name] * p.queries for p in profiles) / max(queries, 1) for name in profiles[0].values}
    return profiles[0].layer_numbers, values, queries


def write_heatmap(path: Path, layers: Sequence[int], values: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(4 * len(values), 0.35 * len(layers) + 2), squeeze=False)
    for ax, (name, grid) in zip(axes[0], values.items()):
        image = ax.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(n) for n in layers])
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_analyze(args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_focusft.analysis.attention_metrics import attention_profile
    from megatron_focusft.data.batch import make_batch
    from megatron_focusft.data.tokenizer import flatten_segments, load_chat_tokenizer
    from megatron_focusft.generation.loading import load_inference_model

    loaded = load_inference_model(hf_path=args.hf_path, load=args.load, ckpt_step=args.ckpt_step, bf16=args.bf16,
                                  attention_backend=args.attention_backend)
    tokenizer_dir = args.tokenizer_model or (loaded.assets if (loaded.assets / "tokenizer.json").is_file() else None)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    device = next(loaded.model.parameters()).device
    profiles = []
    rank0 = dist.get_rank() == 0
    for messages in tqdm(_probe_chats(args, tokenizer), desc="analyze", unit="probe", disable=not rank0,
                         file=sys.stderr):
        ids, response = flatten_segments(tokenizer.render_chat(messages))
        tokens = torch.tensor([ids], device=device)
        batch = make_batch(tokens, torch.zeros_like(tokens), torch.tensor([response], device=device),
                           mask_kind=args.mask)
        profiles.append(attention_profile(loaded.model, batch))
    layers, values, queries = combine(profiles)
    report = {"model": args.load or args.hf_path, "mask": args.mask, "probes": len(profiles), "queries": queries,
              "layers": list(layers), "heads": int(values["sink_mass"].shape[1]),
              "pooled": {name: float(v.mean()) for name, v in values.items()},
              "per_layer_head": {name: v.tolist() for name, v in values.items()}}
    if rank0:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "analysis.json").write_text(json.dumps(report, indent=1))
        write_heatmap(out / "heatmap.png", layers, values)
        print(" | ".join(f"{k} {v:.4f}" for k, v in report["pooled"].items()) + f" ({queries} response queries)")
    return report


def main(argv: Sequence[str]) -> int:
    from megatron_focusft.generation.cli import run_inference_command

    return run_inference_command("focusft analyze", parse_analyze_args(argv), run_analyze)
