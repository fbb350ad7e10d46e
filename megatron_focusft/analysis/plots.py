"""The demo's matplotlib PNGs (loss curves, attention metrics, accuracy by length) from plain run records."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def write_plots(out: Path, runs: dict[str, dict[str, Any]], labels: dict[str, str], *, steps: int, seq_length: int,
                eval_lengths: Sequence[int], context_free_loss: float) -> list[str]:
    """loss_curves.png, attention_metrics.png and accuracy_by_length.png under `out`; returns their paths.

    runs: "sft" and "focusft" records (the demo's results.json "runs"): "loss" per step (optional
    "inner_loss_before"), "attention_metrics_during_training" [{"iteration", metric: value}], and
    "eval" {str(length): accuracies}; the context-free guess is read from the "sft" record.
    labels: legend text per run. steps sets the running-mean window (steps // 20).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sft": "tab:blue", "focusft": "tab:red"}
    paths = [out / "loss_curves.png", out / "attention_metrics.png", out / "accuracy_by_length.png"]

    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, steps // 20)
    for run, rec in runs.items():
        x = range(1, len(rec["loss"]) + 1)
        ax.plot(x, rec["loss"], color=colors[run], alpha=0.25, linewidth=0.8)
        ax.plot(x, _running_mean(rec["loss"], window), color=colors[run], label=f"{labels[run]}, mean of {window}")
        if "inner_loss_before" in rec:
            ax.plot(x, _running_mean(rec["inner_loss_before"], window), color=colors[run], linestyle=":",
                    label="FocuSFT, before the inner loop")
    ax.axhline(context_free_loss, color="gray", linestyle="--", linewidth=1, label="context-free best")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on response tokens")
    ax.set_title("Training loss (FocuSFT: outer loss, with the adapted fast weights)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("sink_mass", "sink_mass_first4", "context_engagement"),
                              ("sink mass (first token)", "sink mass (first 4 tokens)", "context engagement")):
        for run, rec in runs.items():
            points = rec["attention_metrics_during_training"]
            ax.plot([p["iteration"] for p in points], [p[key] for p in points], marker="o", markersize=3,
                    color=colors[run], label=labels[run])
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"Attention of response queries on the fixed probe batch ({seq_length}-token rows), "
                 f"plain model")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lengths = list(eval_lengths)
    for ax, key, title in zip(axes, ("accuracy", "token_accuracy"), ("exact match", "token accuracy")):
        for run, rec in runs.items():
            ax.plot(lengths, [rec["eval"][str(n)][key] for n in lengths], marker="o", color=colors[run],
                    label=labels[run])
        base = [runs["sft"]["eval"][str(n)][f"baseline_{key}"] for n in lengths]
        ax.plot(lengths, base, color="gray", linestyle="--", linewidth=1, label="context-free guess")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel(f"context length (tokens); trained on rows of {seq_length}")
        ax.set_title(f"answer {title}")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]
