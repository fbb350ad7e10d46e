"""The embedded demo: plain SFT vs FocuSFT on a synthetic long-context chat task, on CPU.

``make demo`` / ``focusft demo`` / ``python -m megatron_focusft.demo``: train the ``tiny`` preset
from scratch twice, once with plain SFT and once with FocuSFT, on the same data, steps,
learning-rate schedule and seed (both under the FocuSFT attention mask, so the bilevel step is
the only difference); evaluate both at the training length and at 2x and 4x; print a comparison
table and write, under ``--output-dir`` (default ``runs/demo``):

    results.json                 every number of the table, the commands and the configuration
    loss_curves.png              training loss per step of both runs
    attention_metrics.png        sink mass / context engagement during training (probe batch)
    accuracy_by_length.png       answer accuracy at 1x, 2x, 4x the training length
    tensorboard/{sft,focusft}/   TensorBoard event files of each run (written by ``pretrain``)
    data/*.jsonl                 the generated chat data (train; eval at each length)

Each run is the ordinary training entry point (``pretrain`` with ``pretrain_focusft.py`` flags,
recorded in results.json) on chat JSONL written here, read by the chat pipeline with the
built-in byte tokenizer (one token per character).

The task (``data.long_context_task``): a haystack of filler words hides ``num_symbols``
distinct symbols; the answer to ``?`` is those symbols, sorted.

Training samples are packed into rows of ``seq_length`` tokens; their lengths run from the
task's minimum up to ``seq_length`` with density 1/length^2, so every octave of lengths holds
about the same share of the tokens: short samples bootstrap a from-scratch model (it learns
nothing within the CPU budget from long samples alone), long ones train at the full length.
Evaluation samples are single samples of exactly 1x, 2x and 4x ``seq_length`` tokens: the same
kind of question, a longer haystack.

Evaluation (``evaluation.teacher_forced``): the plain model (no fast weights), teacher-forced,
one forward per sample under the FocuSFT mask both runs trained with; exact match and token
accuracy at the answer's symbol tokens, against the best context-free guess. Plots:
``analysis.plots``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_focusft.analysis.plots import write_plots
from megatron_focusft.data.long_context_task import DemoTaskConfig, load_eval_samples, sample_lengths, write_chats
from megatron_focusft.evaluation import evaluate, probe_batch
from megatron_focusft.runtime import quiet_megatron_import_warnings

# megatron_focusft.focusft.INNER_OBJECTIVES (not imported: that package imports megatron-core).
INNER_OBJECTIVES = ("response", "context")
RUNS = ("sft", "focusft")
LABELS = {"sft": "SFT (FocuSFT mask)", "focusft": "FocuSFT (bilevel)"}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the SFT-vs-FocuSFT demo; the defaults take about 7 minutes on 2 CPU cores.

    steps             optimizer steps of each run, micro_batch_size rows of seq_length tokens each.
    seq_length        training row length and longest training sample; evaluation samples are
                      eval_multipliers x seq_length tokens. 512 by default: with rows of 1024
                      tokens (one per step, 300 steps) the tiny model stayed at chance even with
                      one symbol to find; at 512 x 2 rows it learns 3 symbols in part.
    eval_samples      held-out samples per evaluation length.
    metrics_interval  steps between attention-metric measurements during training.
    focusft_inner_objective  "response" (the reference code; the spec's default) or "context".
    """

    steps: int = 400
    seq_length: int = 512
    micro_batch_size: int = 2
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    eval_multipliers: tuple[int, ...] = (1, 2, 4)
    eval_samples: int = 32
    metrics_interval: int = 25
    task: DemoTaskConfig = field(default_factory=DemoTaskConfig)
    focusft_inner_objective: str = "response"
    preset: str = "tiny"
    attention_backend: str = "sdpa"
    output_dir: str = "runs/demo"
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("steps", "seq_length", "micro_batch_size", "eval_samples", "metrics_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.eval_multipliers or min(self.eval_multipliers) < 1:
            raise ValueError(f"eval_multipliers must be positive integers, got {self.eval_multipliers}")
        if self.seq_length < self.task.min_length():
            raise ValueError(f"seq_length {self.seq_length} is too short for {self.task.num_symbols} symbols "
                             f"(at least {self.task.min_length()} tokens)")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 < lr and 0 <= min_lr <= lr, got lr {self.lr}, min_lr {self.min_lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.focusft_inner_objective not in INNER_OBJECTIVES:
            raise ValueError(f"focusft_inner_objective must be one of {INNER_OBJECTIVES}, "
                             f"got {self.focusft_inner_objective!r}")

    @classmethod
    def short(cls, **overrides: Any) -> DemoConfig:
        """CI-sized variant: a few steps on 128-token rows, a handful of evaluation samples."""
        return cls(**{"steps": 6, "seq_length": 128, "eval_samples": 4, "metrics_interval": 3, **overrides})

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return tuple(self.seq_length * m for m in self.eval_multipliers)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def training_lengths(config: DemoConfig, rng: random.Random) -> list[int]:
    """Lengths of the training samples: 25% more tokens than the steps consume (packing leaves gaps)."""
    need = 1.25 * config.steps * config.micro_batch_size * config.seq_length
    lengths: list[int] = []
    while sum(lengths) < need:
        lengths += sample_lengths(256, config.task.min_length(), config.seq_length, rng)
    return lengths


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def training_argv(config: DemoConfig, run: str, data_path: Path, tensorboard_dir: Path, cache_dir: Path) -> list[str]:
    """`pretrain_focusft.py` flags of one run ("sft" or "focusft"); both train under the FocuSFT mask."""
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    argv = [
        "--model-preset", config.preset, "--attention-backend", config.attention_backend,
        "--data-path", str(data_path), "--data-cache-dir", str(cache_dir),
        "--seq-length", str(config.seq_length), "--micro-batch-size", str(config.micro_batch_size),
        "--train-iters", str(config.steps), "--lr", str(config.lr), "--min-lr", str(config.min_lr),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(int(config.warmup_fraction * config.steps)),
        "--weight-decay", str(config.weight_decay), "--clip-grad", "1.0", "--seed", str(config.seed),
        "--tensorboard-dir", str(tensorboard_dir), "--attention-metrics-interval", str(config.metrics_interval),
        "--log-interval", str(max(1, config.steps // 10)),
    ]
    if run == "sft":
        return argv + ["--training-mode", "sft", "--sft-mask", "focusft"]
    return argv + ["--training-mode", "focusft", "--focusft-inner-objective", config.focusft_inner_objective]


def _steady_median(values: list[float]) -> float:
    """Median after the first 10% of the values (at least the first one): start-up costs excluded,
    and robust to steps slowed down by other processes on a shared machine."""
    skip = min(max(1, len(values) // 10), len(values) - 1)
    return statistics.median(values[skip:])


def _train_and_evaluate(config: DemoConfig, run: str, out: Path, data: dict[str, Path],
                        log: Callable[[str], None]) -> dict[str, Any]:
    from megatron_focusft.analysis.attention_metrics import attention_metrics
    from megatron_focusft.training.arguments import parse_training_args
    from megatron_focusft.training.pretrain import pretrain

    argv = training_argv(config, run, data["train"], out / "tensorboard" / run, out / "data" / "cache")
    evaluation: dict[str, Any] = {}

    def on_finish(model: Any) -> None:
        gpt = model.module  # the plain GPTModel: fast weights are bound only inside the FocuSFT step
        for length in config.eval_lengths:
            t0 = time.perf_counter()
            samples = load_eval_samples(data[f"eval_{length}"], length)
            rows = max(1, 4096 // length)
            result = evaluate(gpt, samples, rows_per_batch=rows)
            result.update(attention_metrics(gpt, probe_batch(samples, rows)))
            result["seconds"] = time.perf_counter() - t0
            evaluation[str(length)] = result
            log(f"  {run} @ {length} tokens: exact match {result['accuracy']:.1%}, token accuracy "
                f"{result['token_accuracy']:.1%} (context-free guess {result['baseline_token_accuracy']:.1%}), "
                f"response loss {result['response_loss']:.3f}, sink mass {result['sink_mass']:.4f}, "
                f"context engagement {result['context_engagement']:.4f}")

    t0 = time.perf_counter()
    summary = pretrain(parse_training_args(argv), on_finish=on_finish)
    history = summary["history"]
    metrics = [{"iteration": h["iteration"], **{k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("attention/")}}
               for h in history if any(k.startswith("attention/") for k in h)]
    step_seconds = [h["iteration_s"] for h in history]
    record: dict[str, Any] = {
        "command": shlex.join(["python", "pretrain_focusft.py", *argv]),
        "loss": summary["losses"],
        "attention_metrics_during_training": metrics,
        "seconds_per_step": step_seconds,
        "median_seconds_per_step": _steady_median(step_seconds),
        "wall_seconds": time.perf_counter() - t0,
        "eval": evaluation,
    }
    if history and "inner_loss_before" in history[0]:
        record["inner_loss_before"] = [h["inner_loss_before"] for h in history]
        record["inner_loss_after"] = [h["inner_loss_after"] for h in history]
    return record


def format_table(runs: dict[str, dict[str, Any]], config: DemoConfig, step_time_ratio: float) -> str:
    """The comparison table printed at the end (and quoted in the README)."""
    ev = {r: runs[r]["eval"] for r in RUNS}
    rows: list[tuple[str, str, str, str]] = []
    for key, name, fmt in (("accuracy", "exact match", "{:.1%}"), ("token_accuracy", "token accuracy", "{:.1%}")):
        for length in config.eval_lengths:
            n = str(length)
            tag = f"{length // config.seq_length}x"
            rows.append((f"{name} @ {length} ({tag})", *(fmt.format(ev[r][n][key]) for r in RUNS),
                         fmt.format(ev["sft"][n][f"baseline_{key}"])))
    for length in config.eval_lengths:
        rows.append((f"response loss @ {length}", *(f"{ev[r][str(length)]['response_loss']:.3f}" for r in RUNS),
                     f"{config.task.context_free_loss():.3f}"))
    n = str(config.seq_length)
    for key, name in (("sink_mass", "sink mass"), ("sink_mass_first4", "sink mass (first 4)"),
                      ("context_engagement", "context engagement")):
        rows.append((f"{name} @ {n}", *(f"{ev[r][n][key]:.4f}" for r in RUNS), ""))
    tail = max(1, config.steps // 10)
    rows.append(("training loss (last 10% of steps)",
                 *(f"{statistics.fmean(runs[r]['loss'][-tail:]):.3f}" for r in RUNS), ""))
    rows.append(("seconds per step (median)", *(f"{runs[r]['median_seconds_per_step']:.3f}" for r in RUNS), ""))
    rows.append(("step time FocuSFT / SFT", "", f"{step_time_ratio:.2f}x", ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'SFT':>9}  {'FocuSFT':>9}  {'guess':>7}"]
    lines += [f"{name:<{width}}  {a:>9}  {b:>9}  {c:>7}" for name, a, b, c in rows]
    return "\n".join(lines)


def run_demo(config: DemoConfig, command: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate the data, train SFT then FocuSFT, evaluate both, write results.json and plots; returns the results."""
    import megatron.core

    quiet_megatron_import_warnings()
    t_start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Disjoint streams: the training data, and each evaluation length.
    train_lengths = training_lengths(config, random.Random(config.seed))
    data = {"train": write_chats(out / "data" / "train.jsonl", config.task, train_lengths, seed=config.seed * 1000 + 1)}
    for i, length in enumerate(config.eval_lengths):
        data[f"eval_{length}"] = write_chats(out / "data" / f"eval_{length}.jsonl", config.task,
                                             [length] * config.eval_samples, seed=config.seed * 1000 + 101 + i)
    log(f"focusft demo: {config.task.num_symbols} symbols to find, tiny preset from scratch, {config.steps} steps x "
        f"{config.micro_batch_size} row(s) of {config.seq_length} tokens (packed chats of "
        f"{config.task.min_length()}-{config.seq_length} tokens); SFT then FocuSFT; evaluation at "
        f"{', '.join(map(str, config.eval_lengths))} tokens")

    runs: dict[str, dict[str, Any]] = {}
    for run in RUNS:
        log(f"--- {LABELS[run]} ---")
        runs[run] = _train_and_evaluate(config, run, out, data, log)
    ratio = runs["focusft"]["median_seconds_per_step"] / runs["sft"]["median_seconds_per_step"]
    n = str(config.seq_length)
    ev = {r: runs[r]["eval"] for r in RUNS}

    def by_length(run: str, key: str) -> dict[str, float]:
        return {length: e[key] for length, e in ev[run].items()}

    results: dict[str, Any] = {
        "sft_accuracy": ev["sft"][n]["accuracy"],
        "focusft_accuracy": ev["focusft"][n]["accuracy"],
        "sink_mass_sft": ev["sft"][n]["sink_mass"],
        "sink_mass_focusft": ev["focusft"][n]["sink_mass"],
        "engagement_sft": ev["sft"][n]["context_engagement"],
        "engagement_focusft": ev["focusft"][n]["context_engagement"],
        "step_time_ratio": ratio,
        **{f"{r}_{key}_by_length": by_length(r, key) for r in RUNS
           for key in ("accuracy", "token_accuracy", "response_loss")},
        "baseline_accuracy_by_length": by_length("sft", "baseline_accuracy"),
        "baseline_token_accuracy_by_length": by_length("sft", "baseline_token_accuracy"),
        "context_free_response_loss": config.task.context_free_loss(),
        "evaluation": {
            "model": "plain model (no fast weights), teacher-forced, one forward per sample",
            "mask": "the FocuSFT mask both runs trained with (bidirectional context, causal answer): equals a "
                    "bidirectional prefill of the context then greedy decoding",
            "accuracy": "exact match: the argmax is right at every symbol token of the answer (end-of-turn not "
                        "scored); token_accuracy: over symbol tokens",
            "baseline": "context-free guess: successor of the previous answer symbol in the sorted alphabet",
            "context_free_response_loss": "cross-entropy per response token of the best model that ignores the "
                                          "context; a response_loss below it means the model reads the context",
            "attention_metrics": "megatron_focusft.analysis.attention_metrics (response-token queries) on the first "
                                 "held-out samples of each length; the *_sft / *_focusft keys are at seq_length",
            "samples_per_length": config.eval_samples,
        },
        "commands": {"demo": command, **{run: runs[run]["command"] for run in RUNS}},
        "config": dataclasses.asdict(config),
        "train_samples": len(train_lengths),
        "runs": runs,
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "torch_version": torch.__version__,
        "megatron_core_version": megatron.core.__version__,
    }
    results["plots"] = write_plots(out, runs, LABELS, steps=config.steps, seq_length=config.seq_length,
                                   eval_lengths=config.eval_lengths, context_free_loss=config.task.context_free_loss())
    results["wall_seconds"] = time.perf_counter() - t_start
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log("\n" + format_table(runs, config, ratio))
    log(f"\nresults: {path}\nplots: {', '.join(results['plots'])}\nTensorBoard: tensorboard --logdir "
        f"{out / 'tensorboard'}\ntotal wall time {results['wall_seconds']:.0f} s")
    return results


def build_parser() -> argparse.ArgumentParser:
    d, s = DemoConfig(), DemoConfig.short()
    p = argparse.ArgumentParser(prog="focusft demo", description="Plain SFT vs FocuSFT on a synthetic long-context "
                                "chat task: train the tiny preset twice on CPU, evaluate at 1x/2x/4x length.")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per run (default {d.steps}; with --short {s.steps})")
    p.add_argument("--seq-length", type=int, default=None,
                   help=f"training row length in tokens (default {d.seq_length}; with --short {s.seq_length})")
    p.add_argument("--output-dir", default=d.output_dir, help="results, plots, TensorBoard logs and data")
    p.add_argument("--seed", type=int, default=d.seed, help="model init, data and fast-weight seed")
    p.add_argument("--focusft-inner-objective", choices=INNER_OBJECTIVES, default=d.focusft_inner_objective,
                   help="FocuSFT inner-loop targets: response tokens (reference code) or the context")
    p.add_argument("--short", action="store_true", help="CI-sized variant (well under a minute)")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    overrides: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("seq_length", args.seq_length))
                                 if v is not None}
    overrides.update(output_dir=args.output_dir, seed=args.seed, focusft_inner_objective=args.focusft_inner_objective)
    return DemoConfig.short(**overrides) if args.short else DemoConfig(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``focusft demo`` / ``python -m megatron_focusft.demo``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
    run_demo(config, command=shlex.join(["focusft", "demo", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
