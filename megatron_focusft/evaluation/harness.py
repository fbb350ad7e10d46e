"""Scoring a predictor on EvalSamples; results per task and length, written and plotted.

A predictor maps a batch of samples to (text, prompt tokens) per sample (`model_predictor`
makes one from a model; tests plug in oracles). `results.json` holds, per task and length,
the score (percent), its 95% bootstrap interval, the sample count and the mean prompt tokens;
`predictions.jsonl` every sample's prediction and score.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_focusft.evaluation.samples import EvalSample
from megatron_focusft.evaluation.scoring import mean_interval, score


@dataclass(frozen=True)
class Prediction:
    text: str
    prompt_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated tokens, when a model made the text


Predictor = Callable[[Sequence[EvalSample]], list[Prediction]]


@dataclass(frozen=True)
class ScoredSample:
    sample: EvalSample
    prediction: Prediction
    score: float


def _batches(samples: Sequence[EvalSample], size: int) -> list[list[EvalSample]]:
    """Batches of one task and length each (one generation length per batch), in input order."""
    groups: dict[tuple[str, int], list[EvalSample]] = defaultdict(list)
    for sample in samples:
        groups[(sample.task, sample.length)].append(sample)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_evaluation(samples: Sequence[EvalSample], predict: Predictor, batch_size: int = 8,
                   progress: bool = True) -> list[ScoredSample]:
    """Every sample through `predict` in batches (a progress bar with ETA on stderr), scored."""
    from tqdm import tqdm

    scored = []
    batches = _batches(samples, batch_size)
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        predictions = predict(batch)
        if len(predictions) != len(batch):
            raise RuntimeError(f"the predictor returned {len(predictions)} predictions for {len(batch)} samples")
        scored += [ScoredSample(s, p, score(s.metric, p.text, s.references)) for s, p in zip(batch, predictions)]
    return scored


def summarize(scored: Sequence[ScoredSample]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> length (as a string, JSON keys) -> score, ci95, samples, mean_prompt_tokens."""
    groups: dict[tuple[str, int], list[ScoredSample]] = defaultdict(list)
    for item in scored:
        groups[(item.sample.task, item.sample.length)].append(item)
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (task, length), items in sorted(groups.items()):
        mean, low, high = mean_interval([i.score for i in items])
        out[task][str(length)] = {"score": 100 * mean, "ci95": [100 * low, 100 * high], "samples": len(items),
                                  "mean_prompt_tokens": sum(i.prediction.prompt_tokens for i in items) / len(items)}
    return dict(out)


def write_results(out_dir: Path, scored: Sequence[ScoredSample], meta: dict[str, Any]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "results": summarize(scored)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for item in scored:
            f.write(json.dumps({"task": item.sample.task, "length": item.sample.length, "index": item.sample.index,
                                "prediction": item.prediction.text, "references": list(item.sample.references),
                                "score": item.score, "prompt_tokens": item.prediction.prompt_tokens,
                                "output_ids": list(item.prediction.token_ids)}) + "\n")
    return results


def comparison_table(results: dict[str, Any], other: dict[str, Any], labels: tuple[str, str]) -> str:
    """A markdown table of two results files side by side (tasks and lengths of either)."""
    rows = [f"| task | length | {labels[0]} | {labels[1]} | difference |", "| --- | --- | --- | --- | --- |"]
    mine, theirs = results["results"], other["results"]
    for task in sorted(set(mine) | set(theirs)):
        lengths = sorted(set(mine.get(task, {})) | set(theirs.get(task, {})), key=int)
        for length in lengths:
            a, b = mine.get(task, {}).get(length), theirs.get(task, {}).get(length)
            cell = lambda r: "n/a" if r is None else f"{r['score']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"  # noqa: E731
            diff = "" if a is None or b is None else f"{a['score'] - b['score']:+.1f}"
            rows.append(f"| {task} | {length} | {cell(a)} | {cell(b)} | {diff} |")
    return "\n".join(rows)


def plot_results(path: Path, runs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Score vs prompt length per task (one panel each), one line per run, with the intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for _, results in runs for task in results["results"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, results in runs:
            points = sorted(((int(k), v) for k, v in results["results"].get(task, {}).items()))
            if not points:
                continue
            xs = [k for k, _ in points]
            ax.errorbar(xs, [v["score"] for _, v in points], marker="o", capsize=3, label=label,
                        yerr=[[v["score"] - v["ci95"][0] for _, v in points],
                              [v["ci95"][1] - v["score"] for _, v in points]])
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("prompt tokens")
        ax.set_ylim(-5, 105)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
