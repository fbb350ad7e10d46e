"""The product commands the demo runs, as argument lists (each also printed and recorded).

    base     pretrain_focusft.py: the tiny preset from scratch, causal SFT on data/base.jsonl
    train    pretrain_focusft.py --finetune --pretrained-checkpoint <base>: one arm, one seed
    export   focusft convert export-hf
    eval     focusft eval on the exported HF directory, per prefill mode (and test-time adaptation)
    analyze  focusft analyze on the exported HF directory (task probes at the training length)

Paths under the output directory: base/, runs/<arm>/s<seed>/ (checkpoints and TensorBoard),
hf/<arm>/s<seed>/, eval/<arm>/s<seed>/<mode>/, analyze/<arm>/s<seed>/.
"""

from __future__ import annotations

from pathlib import Path

from megatron_focusft.demo.config import Arm, DemoConfig

TTA_MODE = "focusft+tta"  # the eval mode name of --prefill focusft --test-time-adaptation


def _common(config: DemoConfig, data: Path, out: Path, steps: int, lr: float, seed: int) -> list[str]:
    return ["--model-preset", config.preset, "--vocab-size", str(config.vocab_size),
            "--data-path", str(data), "--data-cache-dir", str(out / "data" / "cache"),
            "--seq-length", str(config.seq_length), "--micro-batch-size", str(config.micro_batch_size),
            "--train-iters", str(steps), "--lr", f"{lr:g}", "--min-lr", f"{lr / 30:g}", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(max(1, steps // 10)), "--weight-decay", "0.01", "--clip-grad", "1.0",
            "--seed", str(seed), "--log-interval", str(max(1, steps // 5)), "--attention-metrics-interval", "0"]


def base_argv(config: DemoConfig, out: Path) -> list[str]:
    return [*_common(config, out / "data" / "base.jsonl", out, config.base_steps, config.base_lr, config.base_seed),
            "--tokenizer-model", str(out / "data" / "tokenizer"), "--training-mode", "sft", "--sft-mask", "causal",
            "--save", str(out / "base"), "--save-interval", str(config.base_steps),
            "--tensorboard-dir", str(out / "base" / "tensorboard")]


def run_dir(out: Path, arm: Arm, seed: int, kind: str) -> Path:
    return out / kind / arm.name / f"s{seed}"


def train_argv(config: DemoConfig, out: Path, arm: Arm, seed: int) -> list[str]:
    ckpt = run_dir(out, arm, seed, "runs")
    return [*_common(config, out / "data" / f"finetune_s{seed}.jsonl", out, config.steps, config.lr, seed),
            "--finetune", "--pretrained-checkpoint", str(out / "base"), *arm.flags,
            "--save", str(ckpt), "--save-interval", str(config.steps), "--tensorboard-dir", str(ckpt / "tensorboard")]


def export_argv(out: Path, arm: Arm, seed: int) -> list[str]:
    return ["export-hf", "--megatron-path", str(run_dir(out, arm, seed, "runs")),
            "--hf-path", str(run_dir(out, arm, seed, "hf")), "--overwrite"]


def eval_modes(arm: Arm) -> tuple[str, ...]:
    return ("causal", "focusft", *((TTA_MODE,) if arm.test_time_adaptation else ()))


def eval_argv(config: DemoConfig, out: Path, arm: Arm, seed: int, mode: str, *, load: bool = False) -> list[str]:
    """One eval of the arm's HF export; with `load`, of its Megatron checkpoint at the training
    length only (the export's check: the same samples must give the same tokens)."""
    source = (["--load", str(run_dir(out, arm, seed, "runs"))] if load
              else ["--hf-path", str(run_dir(out, arm, seed, "hf"))])
    prefill = ["--prefill", "focusft", "--test-time-adaptation"] if mode == TTA_MODE else ["--prefill", mode]
    where = run_dir(out, arm, seed, "eval") / (f"{mode}-megatron" if load else mode)
    return [*source, *prefill, "--tasks", ",".join(config.tasks),
            "--lengths", str(config.seq_length) if load else ",".join(map(str, config.eval_lengths)),
            "--samples", str(config.eval_samples), "--micro-batch-size", "16", "--output-dir", str(where),
            "--label", f"{arm.name} s{seed} {mode}"]


def analyze_argv(config: DemoConfig, out: Path, arm: Arm, seed: int) -> list[str]:
    return ["--hf-path", str(run_dir(out, arm, seed, "hf")), "--tasks", ",".join(config.tasks),
            "--lengths", str(config.seq_length), "--samples", str(config.analyze_samples),
            "--output-dir", str(run_dir(out, arm, seed, "analyze"))]


def arm_outputs_exist(out: Path, arm: Arm, seed: int, check_export: bool = False) -> bool:
    """Whether every file the demo reads of one arm and seed is there (export, evals, analysis)."""
    evals = [run_dir(out, arm, seed, "eval") / mode for mode in (*eval_modes(arm), *(("causal-megatron",)
                                                                                     if check_export else ()))]
    files = [run_dir(out, arm, seed, "hf") / "config.json", run_dir(out, arm, seed, "analyze") / "analysis.json",
             *(where / name for where in evals for name in ("results.json", "predictions.jsonl"))]
    return all(f.is_file() for f in files)
