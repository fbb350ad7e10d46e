"""Texts with block boundaries: the JSONL format, its validation, and a reader for released sets.

JSONL format, one object per line (a row is its 1-based line number; blank lines are not rows)::

    {"text": "...", "boundaries": [412, 1038], "levels": [1, 2], ...}

text        the text, non-empty.
boundaries  character offsets (Python str indices) where a block starts, strictly increasing,
            each in (0, len(text)); block 0 starts at 0 and is never listed. Optional in the
            input of `focusft segment apply`, required in gold files.
levels      optional, one per boundary: its granularity level, 1 the coarsest. At level g a
            segmentation keeps the boundaries of level <= g; without levels every boundary
            belongs to every level.

Other keys are kept as they are by `focusft segment apply`. Bad rows raise SegmentDataError
naming the file and the row.

Released sets (SemanticSeg, ChatQA2Seg, LoCoMoSeg, LongbenchSeg): their files are not at hand
here, so `read_released` accepts the two layouts the released segmenter's scheme implies
[ours]: a row with a list of block strings (``segments``), or a text carrying the candidate
markers ``<cut i>`` with the ids of the markers that start a block (``cuts``: a list of ints or
a string naming them as ``<cut i>``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CUT_MARKER = re.compile(r"<cut (\d+)>")


class SegmentDataError(ValueError):
    """A bad row (or file): the message names the file, the row and the problem."""

    def __init__(self, path: str, row: int | None, detail: str) -> None:
        self.path, self.row, self.detail = path, row, detail
        where = path if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {detail}")


@dataclass(frozen=True)
class SegDocument:
    """One text and its block boundaries (the invariants of the JSONL format above hold)."""

    text: str
    boundaries: tuple[int, ...] = ()
    levels: tuple[int, ...] | None = None

    def at_level(self, level: int | None) -> tuple[int, ...]:
        """The boundaries of granularity `level` (all of them when `level` or `levels` is None)."""
        if level is None or self.levels is None:
            return self.boundaries
        return tuple(b for b, lv in zip(self.boundaries, self.levels) if lv <= level)


def check_document(text: Any, boundaries: Any, levels: Any = None) -> str | None:
    """Why (text, boundaries, levels) is not a valid document, or None when it is."""
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if not text:
        return "empty text"
    if not isinstance(boundaries, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                            for b in boundaries):
        return "boundaries must be a list of integer character offsets"
    outside = [b for b in boundaries if not 0 < b < len(text)]
    if outside:
        return (f"boundary {outside[0]} is outside the text: boundaries must lie in (0, {len(text)}) "
                f"(0 is the implicit start of the first block)")
    if any(b >= c for b, c in itertools.pairwise(boundaries)):
        return "boundaries must be strictly increasing"
    if levels is not None:
        if not isinstance(levels, (list, tuple)) or len(levels) != len(boundaries):
            return f"levels must be a list with one level per boundary ({len(boundaries)})"
        if not all(isinstance(lv, int) and not isinstance(lv, bool) and lv >= 1 for lv in levels):
            return "levels must be integers >= 1"
    return None


def iter_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, object) of each non-blank line of a JSONL file; SegmentDataError on bad JSON."""
    path = os.fspath(path)
    empty = True
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SegmentDataError(path, row, f"not JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise SegmentDataError(path, row, f"a row must be a JSON object, got {type(record).__name__}")
            empty = False
            yield row, record
    if empty:
        raise SegmentDataError(path, None, "no rows")


def document_from_row(record: Mapping[str, Any], path: str, row: int, *, gold: bool) -> SegDocument:
    """The SegDocument of one row; `gold` requires the boundaries key."""
    if gold and "boundaries" not in record:
        raise SegmentDataError(path, row, "no 'boundaries' key (a gold file lists each row's block starts)")
    text, boundaries, levels = record.get("text"), record.get("boundaries", []), record.get("levels")
    problem = check_document(text, boundaries, levels)
    if problem:
        raise SegmentDataError(path, row, problem)
    return SegDocument(text, tuple(boundaries), None if levels is None else tuple(levels))


def read_documents(path: str | os.PathLike[str], *, gold: bool = True) -> list[SegDocument]:
    """Every row of a JSONL file of the format above, validated."""
    return [document_from_row(record, os.fspath(path), row, gold=gold) for row, record in iter_rows(path)]


def document_row(document: SegDocument) -> dict[str, Any]:
    """The JSONL object of a document (levels only when it has them)."""
    row: dict[str, Any] = {"text": document.text, "boundaries": list(document.boundaries)}
    if document.levels is not None:
        row["levels"] = list(document.levels)
    return row


def write_rows(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write JSONL to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as tmp:
        for row in rows:
            tmp.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp.name, path)


def read_released(path: str | os.PathLike[str], *, segments_key: str = "segments", text_key: str = "text",
                  cuts_key: str = "cuts") -> list[SegDocument]:
    """Documents from a released segmentation set's JSONL (the two layouts of the module docstring).

    A row with `segments_key` (a list of non-empty strings) is their concatenation with a
    boundary at the start of each but the first. Otherwise the row's `text_key` holds ``<cut i>``
    markers (removed from the text) and `cuts_key` the ids of the markers that start a block;
    a selected ``<cut 0>`` or a marker at the end of the text starts no block.
    """
    path = os.fspath(path)
    documents = []
    for row, record in iter_rows(path):
        if segments_key in record:
            document = _from_segments(record[segments_key])
        elif text_key in record and cuts_key in record:
            document = _from_cut_markers(record[text_key], record[cuts_key])
        else:
            document = f"expected {segments_key!r}, or {text_key!r} with {cuts_key!r}; got keys {sorted(record)}"
        if isinstance(document, str):
            raise SegmentDataError(path, row, document)
        problem = check_document(document.text, list(document.boundaries))
        if problem:
            raise SegmentDataError(path, row, problem)
        documents.append(document)
    return documents


def _from_segments(segments: Any) -> SegDocument | str:
    if not isinstance(segments, list) or not segments or not all(isinstance(s, str) and s for s in segments):
        return "segments must be a non-empty list of non-empty strings"
    starts, offset = [], 0
    for segment in segments[:-1]:
        offset += len(segment)
        starts.append(offset)
    return SegDocument("".join(segments), tuple(starts))


def _from_cut_markers(marked: Any, cuts: Any) -> SegDocument | str:
    if not isinstance(marked, str):
        return f"text must be a string, got {type(marked).__name__}"
    if isinstance(cuts, str):
        cuts = [int(i) for i in CUT_MARKER.findall(cuts)]
    if not isinstance(cuts, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in cuts):
        return "cuts must be a list of marker ids or a string of <cut i> markers"
    offsets: dict[int, int] = {}
    pieces, removed, pos = [], 0, 0
    for match in CUT_MARKER.finditer(marked):
        pieces.append(marked[pos:match.start()])
        offsets[int(match.group(1))] = match.start() - removed
        removed += match.end() - match.start()
        pos = match.end()
    pieces.append(marked[pos:])
    text = "".join(pieces)
    unknown = sorted(set(cuts) - set(offsets))
    if unknown:
        return f"cuts name markers that are not in the text: {unknown[:5]}"
    return SegDocument(text, tuple(sorted({offsets[i] for i in cuts} - {0, len(text)})))
