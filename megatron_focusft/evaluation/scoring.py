"""Scores as the benchmarks score, and a 95% interval over samples.

all  (RULER's string_match_all): the fraction of references that occur in the prediction,
     case-insensitively; NIAH, variable tracking, common / frequent words.
part (RULER's string_match_part): 1 if any reference occurs; QA.
babilong: the target occurs in the prediction's first line, case-insensitively (BABILong's
     answer match on its one-word targets).
Scores are per sample in [0, 1]; reported as percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _all(prediction: str, references: Sequence[str]) -> float:
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def _part(prediction: str, references: Sequence[str]) -> float:
    text = prediction.lower()
    return float(any(ref.lower() in text for ref in references))


def _babilong(prediction: str, references: Sequence[str]) -> float:
    first_line = prediction.strip().split("\n", 1)[0].lower()
    return float(references[0].lower() in first_line)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {"all": _all, "part": _part, "babilong": _babilong}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    if not references:
        raise ValueError("a sample needs at least one reference")
    return METRICS[metric](prediction, references)


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap 95% interval of the mean (fixed seed, so a
    results file is reproducible). One sample gives a zero-width interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values")
    means = data[np.random.default_rng(seed).integers(0, data.size, (resamples, data.size))].mean(axis=1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
