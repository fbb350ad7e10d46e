"""One evaluation item, and the readers of the official pre-generated files and of block rows.

RULER's JSONL (one row per sample: `input` the whole prompt, `outputs` the reference strings,
`length` the target token count, optional `index` and `answer_prefix`), BABILong rows (`input`
the long context, `question`, `target`), and the RAG task's block rows (`focusft data rag`,
data/rag_task.py: `blocks` texts, `messages` [user question, assistant answer], optional
`meta` with `index` and `target_tokens`).
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
    (evaluation/scoring.py) scores a prediction against them. blocks: a block task's local
    blocks (texts, each encoded alone), which come before the user turn (then the global block)."""

    task: str
    length: int
    index: int
    prompt: str
    references: tuple[str, ...]
    metric: str
    max_new_tokens: int = 64
    answer_prefix: str = ""
    blocks: tuple[str, ...] = ()


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


def sample_of_rag_row(row: object, task: str, metric: str, max_new_tokens: int, where: str,
                      index: int = 0) -> EvalSample:
    """A block row (`blocks` texts, `messages` [user question, assistant answer], optional `meta`)
    as an EvalSample: the answer is the reference, meta's `target_tokens` the length (0 when
    absent), its `index` the index (else `index`)."""
    blocks = _field(row, "blocks", list, where)
    for i, block in enumerate(blocks):
        if not isinstance(block, str) or not block:
            raise SampleFileError(f"{where}: block {i + 1} must be a non-empty text (evaluation reads texts)")
    messages = _field(row, "messages", list, where)
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
    if roles != ["user", "assistant"] or not all(isinstance(c, str) and c for c in contents):
        raise SampleFileError(f"{where}: 'messages' must be a user question and the assistant's answer (non-empty "
                              f"texts), got roles {roles}")
    meta = row.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k, 0), int) for k in ("index", "target_tokens")):
        raise SampleFileError(f"{where}: 'meta' must be an object whose 'index' and 'target_tokens' are integers")
    return EvalSample(task, meta.get("target_tokens", 0), meta.get("index", index), contents[0], (contents[1],),
                      metric, max_new_tokens, blocks=tuple(blocks))


def read_rag_jsonl(path: str | os.PathLike, task: str, metric: str, max_new_tokens: int) -> list[EvalSample]:
    """The RAG task's block rows (`focusft data rag`), one EvalSample each."""
    return [sample_of_rag_row(row, task, metric, max_new_tokens, f"{path}:{line_number}", index)
            for index, (line_number, row) in enumerate(_rows(Path(path)))]
