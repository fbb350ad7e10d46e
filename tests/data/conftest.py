"""Helpers for the chat data tests: small JSONL / Parquet files written to tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    """A row from (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def write_jsonl(path: Path, rows: Sequence[dict[str, Any] | str]) -> str:
    """One line per row; a str row is written as it is (for malformed lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")
    return str(path)


def write_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return str(path)


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[..., str]:
    def make(rows: Sequence[dict[str, Any] | str], name: str = "data.jsonl") -> str:
        return write_jsonl(tmp_path / name, rows)

    return make


@pytest.fixture
def parquet(tmp_path: Path) -> Callable[..., str]:
    def make(rows: Sequence[dict[str, Any]], name: str = "data.parquet") -> str:
        return write_parquet(tmp_path / name, rows)

    return make
