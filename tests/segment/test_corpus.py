"""The JSONL format with gold boundaries: round trip, levels, bad rows named by file and row, and
the reader of released segmentation sets (block lists and <cut i> markers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_focusft.segment.corpus import (
    SegDocument,
    SegmentDataError,
    document_row,
    read_documents,
    read_released,
    write_rows,
)


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_round_trip_and_levels(tmp_path: Path):
    docs = [SegDocument("one\n\ntwo\nthree", (5, 9), (1, 2)), SegDocument("solo")]
    path = tmp_path / "out" / "gold.jsonl"
    write_rows(path, [document_row(d) for d in docs])
    assert read_documents(path) == docs
    assert not list(path.parent.glob(".*"))  # the temporary file was renamed, not left behind
    assert docs[0].at_level(1) == (5,) and docs[0].at_level(2) == (5, 9) and docs[0].at_level(None) == (5, 9)
    assert docs[1].at_level(1) == ()


def test_blank_lines_are_not_rows_and_boundaries_are_optional_without_gold(tmp_path: Path):
    path = _write(tmp_path / "in.jsonl", [{"text": "a b"}, "", {"text": "c", "id": 7}])
    assert [d.text for d in read_documents(path, gold=False)] == ["a b", "c"]
    with pytest.raises(SegmentDataError, match=r"in\.jsonl, row 1: no 'boundaries' key"):
        read_documents(path)


@pytest.mark.parametrize(("row", "message"), [
    ({"text": "", "boundaries": []}, "empty text"),
    ({"text": "abcdef", "boundaries": [2, 6]}, r"boundary 6 is outside the text: boundaries must lie in \(0, 6\)"),
    ({"text": "abcdef", "boundaries": [0]}, "boundary 0 is outside the text"),
    ({"text": "abcdef", "boundaries": [-3]}, "boundary -3 is outside the text"),
    ({"text": "abcdef", "boundaries": [3, 2]}, "strictly increasing"),
    ({"text": "abcdef", "boundaries": [2.5]}, "integer character offsets"),
    ({"text": "abcdef", "boundaries": [2], "levels": [1, 2]}, "one level per boundary"),
    ({"text": "abcdef", "boundaries": [2], "levels": [0]}, "levels must be integers >= 1"),
    ({"text": 5, "boundaries": []}, "text must be a string"),
    ("[1, 2]", "a row must be a JSON object"),
    ("{not json", "not JSON"),
])
def test_bad_rows_name_the_file_and_row(tmp_path: Path, row, message: str):
    path = _write(tmp_path / "gold.jsonl", [{"text": "fine", "boundaries": [2]}, "", row])
    with pytest.raises(SegmentDataError, match=message) as error:
        read_documents(path)
    assert str(error.value).startswith(f"{path}, row 3: ")
    assert error.value.row == 3


def test_an_empty_file_is_an_error(tmp_path: Path):
    path = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(SegmentDataError, match="empty.jsonl: no rows"):
        read_documents(path)


def test_released_layouts(tmp_path: Path):
    path = _write(tmp_path / "released.jsonl", [
        {"segments": ["First block.\n", "Second\n\n", "Third"]},
        {"text": "<cut 0>Alpha.\n<cut 1>Beta.\n<cut 2>Gamma.\n<cut 3>", "cuts": [0, 2, 3]},
        {"text": "<cut 0>Alpha.\n<cut 1>Beta.", "cuts": "<cut 1>"},
    ])
    first, second, third = read_released(path)
    assert first == SegDocument("First block.\nSecond\n\nThird", (13, 21))
    # <cut 0> and a marker at the end of the text start no block; markers leave the text.
    assert second == SegDocument("Alpha.\nBeta.\nGamma.\n", (13,))
    assert third == SegDocument("Alpha.\nBeta.", (7,))


@pytest.mark.parametrize(("row", "message"), [
    ({"segments": ["a", ""]}, "non-empty list of non-empty strings"),
    ({"text": "<cut 0>a<cut 1>b", "cuts": [4]}, r"markers that are not in the text: \[4\]"),
    ({"text": "<cut 0><cut 1>", "cuts": [1]}, "empty text"),
    ({"other": 1}, "expected 'segments', or 'text' with 'cuts'"),
])
def test_released_bad_rows(tmp_path: Path, row, message: str):
    path = _write(tmp_path / "released.jsonl", [row])
    with pytest.raises(SegmentDataError, match=message) as error:
        read_released(path)
    assert error.value.row == 1
