"""One evaluation item, and the readers of the official pre-generated files.

RULER's JSONL (one row per sample: `input` the whole prompt, `outputs` the reference strings,
`length` the target token count, optional `index` and `answer_prefix`) and BABILong rows
(`input` the long context, `question`, `target`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalSample:
    """task: the task name (results are grouped by task and length). length: the target prompt
    size in tokens. prompt: the user turn given to the model. references: the answers; `metric`
    (evaluation/scoring.py) scores a prediction against them."""

    task: str
    length: int
    index: int
    prompt: str
    references: tuple[str, ...]
    metric: str
    max_new_tokens: int = 64
    answer_prefix: str = ""


class SampleFileError(ValueError):
    """A row of a pre-generated file that cannot be read; the message names file and line."""


def _rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_number, json.loads(line)
                except ValueError as e:
                    raise SampleFileError(f"{path}:{line_number}: not valid JSON ({e})") from None


def _field(row: dict, name: str, kind: type, where: str):
    if not isinstance(row, dict) or name not in row:
        raise SampleFileError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], kind):
        raise SampleFileError(f"{where}: field {name!r} must be {kind.__name__}, got {type(row[name]).__name__}")
    return row[name]


def read_ruler_jsonl(path: str | os.PathLike, task: str | None = None, metric: str = "all",
                     max_new_tokens: int = 128) -> list[EvalSample]:
    """RULER's generated files (`validation.jsonl` per task and length); the task defaults to
    the file's parent folder name, as RULER lays its data out (<length>/<task>/validation.jsonl)."""
    path = Path(path)
    name = task or path.parent.name
    samples = []
    for line_number, row in _rows(path):
        where = f"{path}:{line_number}"
        outputs = _field(row, "outputs", list, where)
        samples.append(EvalSample(name, int(row.get("length", 0)), int(row.get("index", len(samples))),
                                  _field(row, "input", str, where), tuple(str(o) for o in outputs), metric,
                                  max_new_tokens, str(row.get("answer_prefix", ""))))
    return samples


def read_babilong_jsonl(path: str | os.PathLike, task: str, length: int, max_new_tokens: int = 16) -> list[EvalSample]:
    """BABILong rows (`input`, `question`, `target`): the context, then the question."""
    samples = []
    for line_number, row in _rows(Path(path)):
        where = f"{path}:{line_number}"
        context, question = _field(row, "input", str, where), _field(row, "question", str, where)
        target = _field(row, "target", str, where)
        samples.append(EvalSample(task, length, len(samples), f"{context}\n\nQuestion: {question}\nAnswer:",
                                  (target,), "babilong", max_new_tokens))
    return samples
