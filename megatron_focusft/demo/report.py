"""The demo's numbers: eval results gathered over seeds, the table, the plots.

For each arm, mode, task and length: the mean score over seeds, each seed's score, the spread
(max - min over seeds) and a 95% bootstrap interval of the mean over all seeds' samples pooled
(evaluation/scoring.mean_interval). "all tasks" averages the tasks' per-sample scores.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from megatron_focusft.demo import commands
from megatron_focusft.demo.config import DemoConfig
from megatron_focusft.evaluation.harness import plot_results
from megatron_focusft.evaluation.scoring import mean_interval

ALL_TASKS = "all tasks"


def read_eval(where: Path) -> dict[str, Any]:
    """results.json's scores and, per sample ("task/length/index"), the generated token ids."""
    results = json.loads((where / "results.json").read_text())["results"]
    predictions = {}
    with open(where / "predictions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            predictions[f"{row['task']}/{row['length']}/{row['index']}"] = row["output_ids"]
    return {"results": results, "predictions": predictions}


def _sample_scores(where: Path) -> dict[tuple[str, str], list[float]]:
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    with open(where / "predictions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for task in (row["task"], ALL_TASKS):
                scores[(task, str(row["length"]))].append(row["score"])
    return scores


def summarize(config: DemoConfig, out: Path) -> dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]]:
    """arm -> mode -> task (and "all tasks") -> length -> mean, per_seed, spread, ci95, samples."""
    summary: dict[str, Any] = {}
    for arm in config.arms:
        for mode in commands.eval_modes(arm):
            per_seed = [_sample_scores(commands.run_dir(out, arm, seed, "eval") / mode) for seed in config.seeds]
            cells: dict[str, dict[str, Any]] = defaultdict(dict)
            for task, length in per_seed[0]:
                seed_means = [100 * statistics.fmean(s[(task, length)]) for s in per_seed]
                pooled = [v for s in per_seed for v in s[(task, length)]]
                mean, low, high = mean_interval(pooled)
                cells[task][length] = {"mean": 100 * mean, "per_seed": seed_means,
                                       "spread": max(seed_means) - min(seed_means),
                                       "ci95": [100 * low, 100 * high], "samples": len(pooled)}
            summary.setdefault(arm.name, {})[mode] = dict(cells)
    return summary


def format_table(config: DemoConfig, results: dict[str, Any]) -> str:
    """Markdown: one row per arm and mode; per length the all-tasks mean [95% interval] (spread over seeds)."""
    lengths = [str(n) for n in config.eval_lengths]
    head = " | ".join(f"{int(n) // config.seq_length}x ({n} tokens)" for n in lengths)
    lines = [f"| arm | prefill | {head} | final train loss | s/step |",
             "| --- | --- | " + " | ".join("---" for _ in lengths) + " | --- | --- |"]
    labels = {arm.name: arm.label for arm in config.arms}
    for arm, modes in results["summary"].items():
        runs = results["runs"][arm].values()
        loss = statistics.fmean(r["training"]["final_loss"] for r in runs)
        seconds = statistics.fmean(r["training"]["median_seconds_per_step"] for r in runs)
        for mode, cells in modes.items():
            row = []
            for n in lengths:
                c = cells[ALL_TASKS][n]
                spread = f" ±{c['spread'] / 2:.1f}" if len(config.seeds) > 1 else ""
                row.append(f"{c['mean']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]{spread}")
            lines.append(f"| {labels[arm]} | {mode} | " + " | ".join(row) + f" | {loss:.3f} | {seconds:.2f} |")
    per_task = ["", "Per task (mean over seeds), prefill focusft:", "",
                "| arm | " + " | ".join(f"{t} @ {n}" for t in config.tasks for n in lengths) + " |",
                "| --- | " + " | ".join("---" for _ in config.tasks for _ in lengths) + " |"]
    for arm, modes in results["summary"].items():
        cells = modes["focusft"]
        per_task.append(f"| {labels[arm]} | " + " | ".join(f"{cells[t][n]['mean']:.1f}" for t in config.tasks
                                                           for n in lengths) + " |")
    return "\n".join(lines + per_task)


def write_report(config: DemoConfig, out: Path, results: dict[str, Any]) -> str:
    """results.json, table.md and scores_<mode>.png (score vs length per task, one line per arm)."""
    table = format_table(config, results)
    plots = []
    for mode in ("causal", "focusft"):
        runs = [(arm, {"results": {task: {n: {"score": c["mean"], "ci95": c["ci95"]} for n, c in by_length.items()}
                                        for task, by_length in modes[mode].items()}})
                for arm, modes in results["summary"].items()]
        path = out / f"scores_{mode}.png"
        plot_results(path, runs)
        plots.append(str(path))
    results["plots"] = plots
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return table
