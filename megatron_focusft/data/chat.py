"""Chat SFT data: JSONL / Parquet files of conversations -> token ids with response flags.

A row holds ``messages``, a list of ``{"role", "content"}`` with roles system / user /
assistant / tool, and optionally ``tools`` (tool definitions for the chat template) and
``blocks``: pre-segmented context (block attention, e.g. retrieved passages), a list of texts or
token-id lists, each encoded alone (``tokenizer.encode``, no template) and placed, in order,
before the rendered conversation. Extra keys
of a message (``tool_calls``, ``name``, ``tool_call_id``, ...) go to the chat template as they
are; an assistant message with ``tool_calls`` may have no content.

A path is a file or a directory (its files with one of the suffixes below, sorted by name, not
recursive); the suffix gives the format, and a file without one is refused with the list.
- JSONL (``.jsonl``, ``.ndjson``, ``.json``): read here line by line, one JSON object per line. A
  row is its 1-based line number; blank lines are not rows. Each line is decoded on its own, so
  bytes that are not UTF-8 make that row bad ("malformed"), not the file. Parsing each line on
  its own keeps values exactly as written: a joint Arrow schema over all rows would turn absent
  keys into nulls and, once one row holds a non-string content, re-read string contents such as
  "42" as JSON numbers.
- Parquet (``.parquet``): read with ``datasets``, streaming (nothing is converted to Arrow on
  disk); a row is its 1-based record number. Arrow fills keys that a struct lacks with null, so
  null-valued keys are dropped from messages and tools.

Bad input never disappears silently. Each case has a reason:

    empty_file           a file without rows
    malformed            not JSON, not an object, no messages list, a message that is not an
                         object, without a role, or with non-string content, bad tools
    unknown_role         a role other than system / user / assistant / tool
    template_error       the tokenizer's chat template cannot render the conversation
    no_assistant_tokens  nothing to learn: no assistant turn, or no response token after rendering
    too_long             more tokens than seq_length (a sample is never split or truncated)

With ``policy="error"`` (default) the first bad row raises BadSampleError naming file, row and
reason. With ``policy="skip"`` bad rows are skipped and counted per reason in the DataSummary
that ``load_chat_samples`` prints before it returns.

A row becomes one sample (its full form) unless ``load_chat_samples`` is given ``forms``
(`SampleForms`, e.g. block attention's full and block forms): then each row gives the samples
it returns, each with a block id per token (the highest is the sample's global block) and sink
flags. The tokenised set is cached on disk (``cache_dir``), keyed by the files (path, size,
mtime), the tokenizer's identity, seq_length, policy, column names and the forms' identity: a
second load reads the cache and tokenises nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from megatron_focusft.data.tokenizer import ChatTemplateError, ChatTokenizer, flatten_segments

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
BadSamplePolicy = Literal["error", "skip"]
POLICIES: tuple[str, ...] = ("error", "skip")
REASONS: tuple[str, ...] = ("empty_file", "malformed", "unknown_role", "template_error",
                            "no_assistant_tokens", "too_long")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
DATA_SUFFIXES: tuple[str, ...] = JSONL_SUFFIXES + PARQUET_SUFFIXES
CACHE_VERSION = 2


class BadSampleError(ValueError):
    """A bad row (or an empty file) under policy "error"."""

    def __init__(self, path: str, row: int | None, reason: str, detail: str) -> None:
        self.path, self.row, self.reason, self.detail = path, row, reason, detail
        where = path if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {reason}: {detail} (policy 'skip' skips such rows and counts them)")


class BadSample(Exception):
    """Why one row cannot become a sample: a reason from REASONS and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ChatDataConfig:
    """Where the chat data is and how bad rows are handled.

    paths         JSONL / Parquet files or directories of them, read in this order.
    seq_length    tokens per packed row; a longer sample is a bad row ("too_long").
    policy        "error": raise on the first bad row; "skip": skip and count it.
    cache_dir     directory of the tokenised-set cache (None: no cache).
    messages_key  column with the conversation; tools_key: column with tool definitions;
    blocks_key    column with pre-segmented context blocks.
    """

    paths: tuple[str, ...]
    seq_length: int
    policy: BadSamplePolicy = "error"
    cache_dir: str | None = None
    messages_key: str = "messages"
    tools_key: str = "tools"
    blocks_key: str = "blocks"

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if not self.paths:
            raise ValueError("paths must name at least one JSONL or Parquet file")
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {self.seq_length}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for path in self.paths:
            if not os.path.isdir(path):
                _file_format(path)


@dataclass
class DataSummary:
    """What loading did: rows read, samples kept, rows skipped per reason.

    rows counts every row read from a non-empty file (blank JSONL lines are not rows), so
    rows == samples - extra_forms + skipped rows (empty files are counted in skipped but hold no
    row); extra_forms counts the samples beyond a row's first (`SampleForms`), block_forms the
    samples in block form.
    first_skipped holds the first skipped row of each reason, as "file, row N: detail".
    """

    files: list[str]
    policy: str
    seq_length: int
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    max_length: int = 0
    blank_lines: int = 0
    extra_forms: int = 0
    block_forms: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, str] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def record_skip(self, path: str, row: int | None, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        where = path if row is None else f"{path}, row {row}"
        self.first_skipped.setdefault(reason, f"{where}: {detail}")

    def format(self) -> str:
        response = 100.0 * self.response_tokens / max(self.tokens, 1)
        lines = [f"chat data: {len(self.files)} file(s), {self.rows} row(s) -> {self.samples} sample(s), "
                 f"{self.tokens} tokens ({response:.1f}% response), longest {self.max_length} of "
                 f"seq_length {self.seq_length}, bad-sample policy '{self.policy}'"]
        if self.block_forms:
            lines.append(f"  block form: {self.block_forms} sample(s)")
        if self.blank_lines:
            lines.append(f"  blank lines ignored: {self.blank_lines}")
        if self.skipped:
            lines.append(f"  skipped: {self.num_skipped}")
            for reason in REASONS:
                if reason in self.skipped:
                    lines.append(f"    {reason}: {self.skipped[reason]} (first: {self.first_skipped[reason]})")
        else:
            lines.append("  skipped: none")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSummary:
        return cls(**data)


@dataclass(frozen=True)
class ChatRow:
    """A validated row: the conversation, its tools, and its pre-segmented context blocks (token
    ids, each encoded alone; empty when the row has none)."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None
    blocks: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class SampleForm:
    """One training sample made from a row: token ids and response flags [n]; for block attention
    each token's block id [n] (non-decreasing, the highest is the global block) and sink flags
    [n] (1 on block sink slots, which carry no token of the row)."""

    ids: list[int]
    response: list[int]
    block_ids: list[int] | None = None
    sink: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.response) != n or (self.block_ids is not None and len(self.block_ids) != n) or (
                self.sink is not None and len(self.sink) != n):
            raise ValueError(f"a sample form's per-token lists differ in length: {n} ids, {len(self.response)} "
                             f"flags, block ids {None if self.block_ids is None else len(self.block_ids)}, sinks "
                             f"{None if self.sink is None else len(self.sink)}")

    @property
    def is_block_form(self) -> bool:
        """More than one block: the sample is trained under block attention."""
        return self.block_ids is not None and len(set(self.block_ids)) > 1


class SampleForms(Protocol):
    """The samples a row trains on (block attention: its full form and its block form).

    identity  changes whenever the forms of any row could change (method, settings, segmenter);
              it keys the tokenised cache.
    __call__(row, tokenizer, row_key) -> forms, each with block_ids and sink; at least one.
              row_key names the row ("file:row") for seeded per-row choices. Raises BadSample.
    """

    identity: str

    def __call__(self, row: ChatRow, tokenizer: ChatTokenizer, row_key: str) -> list[SampleForm]: ...


@dataclass
class _BlockArrays:
    block_ids: array = field(default_factory=lambda: array("i"))
    sink: array = field(default_factory=lambda: array("B"))

    @classmethod
    def of(cls, forms: Sequence[SampleForm]) -> _BlockArrays:
        arrays = cls()
        for form in forms:
            arrays.add(form)
        return arrays

    def add(self, form: SampleForm) -> None:
        if form.block_ids is None:
            raise ValueError("SampleForms must give every form block ids (all 0 for the full form)")
        ids = form.block_ids
        if any(ids[i + 1] < ids[i] for i in range(len(ids) - 1)) or min(ids) < 0:
            raise ValueError(f"block ids must be >= 0 and non-decreasing in a sample, got {ids[:16]}...")
        self.block_ids.extend(ids)
        self.sink.extend(form.sink if form.sink is not None else [0] * len(ids))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"block_ids": _as_tensor(self.block_ids, np.int32), "sink": _as_tensor(self.sink, np.uint8)}


@dataclass(frozen=True, eq=False)
class ChatSamples:
    """Tokenised samples, concatenated: sample i is tokens[offsets[i]:offsets[i + 1]].

    tokens       [num_tokens] int32 token ids.
    response     [num_tokens] uint8, 1 on response tokens.
    offsets      [num_samples + 1] int64.
    source_file  [num_samples] int32 index into files; source_row [num_samples] int64 row.
    block_ids    [num_tokens] int32 or None: each token's block in its sample (non-decreasing;
                 the sample's highest id is its global block, which holds the response);
                 present when the samples were made by `SampleForms`.
    sink         [num_tokens] uint8 or None (with block_ids): 1 on block sink slots.
    """

    tokens: torch.Tensor
    response: torch.Tensor
    offsets: torch.Tensor
    source_file: torch.Tensor
    source_row: torch.Tensor
    files: tuple[str, ...]
    pad_id: int
    vocab_size: int
    summary: DataSummary
    from_cache: bool = False
    block_ids: torch.Tensor | None = None
    sink: torch.Tensor | None = None

    @classmethod
    def from_lists(cls, samples: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
                   vocab_size: int, source: str = "<memory>",
                   forms: Sequence[SampleForm] | None = None) -> ChatSamples:
        """Samples given as (token ids, response flags) pairs, e.g. from another pipeline, or as
        SampleForms (`forms`, with block ids and sinks; then `samples` must be empty)."""
        if forms is not None:
            if samples:
                raise ValueError("give either (ids, flags) pairs or forms, not both")
            samples = [(form.ids, form.response) for form in forms]
        tokens, response, offsets = array("i"), array("B"), array("q", [0])
        for index, (ids, flags) in enumerate(samples):
            if len(ids) != len(flags) or not ids:
                raise ValueError(f"sample {index}: {len(ids)} ids and {len(flags)} flags (need equal, non-zero)")
            tokens.extend(ids)
            response.extend(int(bool(f)) for f in flags)
            offsets.append(len(tokens))
        blocks = _BlockArrays.of(forms) if forms is not None else None
        n = len(offsets) - 1
        lengths = np.diff(np.array(offsets, dtype=np.int64))
        summary = DataSummary(files=[source], policy="error", seq_length=int(lengths.max(initial=0)), rows=n,
                              samples=n, tokens=len(tokens), response_tokens=sum(response),
                              max_length=int(lengths.max(initial=0)))
        return cls(_as_tensor(tokens, np.int32), _as_tensor(response, np.uint8), _as_tensor(offsets, np.int64),
                   torch.zeros(n, dtype=torch.int32), torch.arange(1, n + 1, dtype=torch.int64), (source,),
                   pad_id, vocab_size, summary, **(blocks.tensors() if blocks is not None else {}))

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, response flags) of sample `index`, each [length]."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[lo:hi], self.response[lo:hi]

    @property
    def has_blocks(self) -> bool:
        return self.block_ids is not None

    def source(self, index: int) -> tuple[str, int]:
        """(file, row) the sample was read from."""
        return self.files[int(self.source_file[index])], int(self.source_row[index])


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


def _file_format(path: str) -> Literal["jsonl", "parquet"]:
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    supported = f"JSON Lines ({', '.join(JSONL_SUFFIXES)}) or Parquet ({', '.join(PARQUET_SUFFIXES)})"
    if not suffix:
        raise ValueError(f"{path}: a data file without a suffix; name it for its format, {supported}")
    raise ValueError(f"{path}: unknown data file type {suffix!r}; expected {supported}")


def data_files(path: str | os.PathLike) -> tuple[str, ...]:
    """The chat data files `path` names: the file itself, or a directory's files with a suffix
    of DATA_SUFFIXES, sorted by name (not recursive)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = tuple(sorted(str(child) for child in Path(path).iterdir()
                             if child.is_file() and child.suffix.lower() in DATA_SUFFIXES))
        if not files:
            raise ValueError(f"directory {path} holds no chat data files ({', '.join(DATA_SUFFIXES)})")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat data file {path!r} does not exist")
    _file_format(path)
    return (path,)


def _stream(builder: str, path: str, hf_cache_dir: str) -> Iterator[dict[str, Any]]:
    """Rows of `path` through datasets' streaming loader; its read errors name the file."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(builder, data_files=path, split="train", streaming=True, cache_dir=hf_cache_dir)
        rows = iter(dataset)
    except Exception as error:  # noqa: BLE001 - any reader failure is a failure to read this file
        raise ValueError(f"{path}: datasets could not read the file: {type(error).__name__}: {error}") from error
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"{path}: datasets could not read the file: {type(error).__name__}: {error}") from error
        yield row


def _jsonl_rows(path: str, summary: DataSummary) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or BadSample) for every non-blank line of a JSONL file."""
    with open(path, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_no, BadSample("malformed", f"not UTF-8 text: byte 0x{raw[error.start]:02x} at byte "
                                                      f"{error.start + 1} of the line")
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                summary.blank_lines += 1
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield line_no, BadSample("malformed", f"not valid JSON: {error.msg} (column {error.colno})")
                continue
            if not isinstance(record, dict):
                yield line_no, BadSample("malformed", f"a row must be a JSON object, got {_type_name(record)}")
                continue
            yield line_no, record


def _parquet_rows(path: str, hf_cache_dir: str, messages_key: str) -> Iterator[tuple[int, Any]]:
    """(record number, row dict) of a Parquet file; nothing for an empty one."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable Parquet file: {type(error).__name__}: {error}") from error
    if metadata.num_rows == 0:
        return
    columns = metadata.schema.to_arrow_schema().names
    if messages_key not in columns:
        raise ValueError(f"{path}: no {messages_key!r} column (columns: {', '.join(columns)})")
    for row_no, row in enumerate(_stream("parquet", path, hf_cache_dir), start=1):
        yield row_no, row


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", type(None): "null", bool: "boolean"}.get(
        type(value), type(value).__name__)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _maybe_json(value: Any, name: str) -> Any:
    """Columns sometimes hold JSON text instead of the structure itself."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise BadSample("malformed", f"{name!r} is a string that is not JSON ({error.msg})") from None
    return value


def parse_chat_row(record: Mapping[str, Any], *, messages_key: str = "messages", tools_key: str = "tools",
                   drop_nulls: bool = False) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """Validated (messages, tools) of one row; raises BadSample.

    drop_nulls removes null-valued keys from messages and tools (for Arrow-typed rows, see the
    module doc).
    """
    if record.get(messages_key) is None:
        raise BadSample("malformed", f"no {messages_key!r} field")
    messages = _maybe_json(record[messages_key], messages_key)
    if drop_nulls:
        messages = _drop_nulls(messages)
    if not isinstance(messages, list):
        raise BadSample("malformed", f"{messages_key!r} must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise BadSample("malformed", f"{messages_key!r} is empty")
    clean: list[dict[str, Any]] = []
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise BadSample("malformed", f"message {index} must be an object, got {_type_name(message)}")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadSample("malformed", f"message {index} has no 'role' string (got {_type_name(role)})")
        if role not in ROLES:
            raise BadSample("unknown_role", f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise BadSample("malformed", f"message {index} ({role}) 'tool_calls' must be a list, got "
                                    f"{_type_name(tool_calls)}")
        if content is None and role == "assistant" and tool_calls:
            message = {**message, "content": ""}
        elif not isinstance(content, str):
            what = "no 'content'" if content is None else f"content of type {_type_name(content)}"
            raise BadSample("malformed", f"message {index} ({role}) has {what}; content must be a string")
        clean.append(message)
    tools = record.get(tools_key)
    if tools is not None:
        tools = _maybe_json(tools, tools_key)
        if drop_nulls:
            tools = _drop_nulls(tools)
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadSample("malformed", f"{tools_key!r} must be a list of objects, got {_type_name(tools)}")
    return clean, tools or None


def parse_blocks(record: Mapping[str, Any], tokenizer: ChatTokenizer, *, blocks_key: str = "blocks",
                 drop_nulls: bool = False) -> tuple[tuple[int, ...], ...]:
    """The row's context blocks as token ids (texts encoded alone); () without the field. Raises BadSample."""
    blocks = record.get(blocks_key)
    if blocks is None:
        return ()
    blocks = _maybe_json(blocks, blocks_key)
    if not isinstance(blocks, list):
        raise BadSample("malformed", f"{blocks_key!r} must be a list of texts or token-id lists, got {_type_name(blocks)}")
    out = []
    for index, block in enumerate(blocks, start=1):
        if isinstance(block, str) and block:
            ids = tokenizer.encode(block)
        elif isinstance(block, list) and block and all(isinstance(t, int) and not isinstance(t, bool) for t in block):
            ids = block
        else:
            raise BadSample("malformed", f"block {index} must be a non-empty text or list of token ids, got "
                                         f"{_type_name(block)}")
        if not ids:
            raise BadSample("malformed", f"block {index} encodes to no token")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise BadSample("malformed", f"block {index}: token id {bad[0]} is outside the tokenizer's vocabulary "
                                         f"[0, {tokenizer.vocab_size})")
        out.append(tuple(ids))
    return tuple(out)


def read_chat_row(record: Mapping[str, Any], tokenizer: ChatTokenizer, config: ChatDataConfig, *,
                  drop_nulls: bool = False) -> ChatRow:
    """The validated ChatRow of a raw row; raises BadSample."""
    messages, tools = parse_chat_row(record, messages_key=config.messages_key, tools_key=config.tools_key,
                                     drop_nulls=drop_nulls)
    return ChatRow(messages, tools, parse_blocks(record, tokenizer, blocks_key=config.blocks_key))


def tokenize_chat(tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None,
                  seq_length: int, blocks: Sequence[Sequence[int]] = ()) -> tuple[list[int], list[int]]:
    """(token ids, response flags) of one validated conversation after its context blocks (whose
    tokens are context); raises BadSample."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("no_assistant_tokens", "no assistant message")
    try:
        ids, response = flatten_segments(tokenizer.render_chat(messages, tools))
    except ChatTemplateError as error:
        raise BadSample("template_error", str(error)) from None
    if not any(response):
        raise BadSample("no_assistant_tokens", "the assistant turns render to no response token")
    context = [t for block in blocks for t in block]
    ids, response = context + ids, [0] * len(context) + response
    check_length(len(ids), seq_length)
    return ids, response


def check_length(num_tokens: int, seq_length: int, form: str = "") -> None:
    if num_tokens > seq_length:
        raise BadSample("too_long", f"{num_tokens} tokens{form} > seq_length {seq_length} (samples are never split)")


# ---------------------------------------------------------------------------------------------
# Loading, with the cache
# ---------------------------------------------------------------------------------------------


def cache_key(config: ChatDataConfig, tokenizer: ChatTokenizer, forms: SampleForms | None = None) -> str:
    """Hex digest of everything the tokenised set depends on."""
    files = []
    for path in config.paths:
        stat = os.stat(path)
        files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    material = {"version": CACHE_VERSION, "files": files, "tokenizer": tokenizer.identity,
                "seq_length": config.seq_length, "policy": config.policy,
                "messages_key": config.messages_key, "tools_key": config.tools_key,
                "blocks_key": config.blocks_key, "forms": None if forms is None else forms.identity}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _cache_path(config: ChatDataConfig, tokenizer: ChatTokenizer, forms: SampleForms | None) -> Path | None:
    if config.cache_dir is None:
        return None
    return Path(config.cache_dir) / f"chat-{cache_key(config, tokenizer, forms)[:32]}.pt"


def _save(samples: ChatSamples, path: Path) -> None:
    payload = {"tokens": samples.tokens, "response": samples.response, "offsets": samples.offsets,
               "source_file": samples.source_file, "source_row": samples.source_row,
               "files": list(samples.files), "pad_id": samples.pad_id, "vocab_size": samples.vocab_size,
               "summary": samples.summary.to_dict(), "block_ids": samples.block_ids, "sink": samples.sink}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader (another rank, a later run) never sees half a file.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        torch.save(payload, tmp)
    os.replace(tmp.name, path)


def _load(path: Path) -> ChatSamples:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return ChatSamples(payload["tokens"], payload["response"], payload["offsets"], payload["source_file"],
                       payload["source_row"], tuple(payload["files"]), int(payload["pad_id"]),
                       int(payload["vocab_size"]), DataSummary.from_dict(payload["summary"]), from_cache=True,
                       block_ids=payload["block_ids"], sink=payload["sink"])


def _as_tensor(values: array, dtype: type[np.generic]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=dtype))  # copies through the buffer protocol


def _row_forms(row: ChatRow, tokenizer: ChatTokenizer, config: ChatDataConfig, forms: SampleForms | None,
               row_key: str) -> list[SampleForm]:
    if forms is None:
        return [SampleForm(*tokenize_chat(tokenizer, row.messages, row.tools, config.seq_length, row.blocks))]
    made = forms(row, tokenizer, row_key)
    if not made:
        raise ValueError(f"{row_key}: the sample forms {forms.identity} gave no sample for the row")
    for form in made:
        check_length(len(form.ids), config.seq_length, " in block form" if form.is_block_form else "")
    return made


def _read_and_tokenize(config: ChatDataConfig, tokenizer: ChatTokenizer, hf_cache_dir: str,
                       forms: SampleForms | None) -> ChatSamples:
    summary = DataSummary(files=list(config.paths), policy=config.policy, seq_length=config.seq_length)
    tokens, response = array("i"), array("B")
    offsets, source_file, source_row = array("q", [0]), array("i"), array("q")
    blocks = _BlockArrays() if forms is not None else None

    def bad(path: str, row: int | None, reason: str, detail: str) -> None:
        if config.policy == "error":
            raise BadSampleError(path, row, reason, detail)
        summary.record_skip(path, row, reason, detail)

    for file_index, path in enumerate(config.paths):
        is_parquet = _file_format(path) == "parquet"
        if os.path.getsize(path) == 0:
            bad(path, None, "empty_file", "the file is empty (0 bytes)")
            continue
        rows = (_parquet_rows(path, hf_cache_dir, config.messages_key) if is_parquet
                else _jsonl_rows(path, summary))
        rows_before = summary.rows
        for row, record in rows:
            summary.rows += 1
            try:
                if isinstance(record, BadSample):
                    raise record
                chat_row = read_chat_row(record, tokenizer, config, drop_nulls=is_parquet)
                made = _row_forms(chat_row, tokenizer, config, forms, f"{path}:{row}")
            except BadSample as rejected:
                bad(path, row, rejected.reason, rejected.detail)
                continue
            for form in made:
                tokens.extend(form.ids)
                response.extend(form.response)
                offsets.append(len(tokens))
                source_file.append(file_index)
                source_row.append(row)
                if blocks is not None:
                    blocks.add(form)
                summary.samples += 1
                summary.block_forms += form.is_block_form
                summary.response_tokens += sum(form.response)
                summary.max_length = max(summary.max_length, len(form.ids))
            summary.extra_forms += len(made) - 1
        if summary.rows == rows_before:
            bad(path, None, "empty_file", "the file has no rows")
    summary.tokens = len(tokens)
    if summary.samples == 0:
        raise ValueError(f"no usable chat samples in {', '.join(config.paths)}\n{summary.format()}")
    return ChatSamples(_as_tensor(tokens, np.int32), _as_tensor(response, np.uint8), _as_tensor(offsets, np.int64),
                       _as_tensor(source_file, np.int32), _as_tensor(source_row, np.int64), config.paths,
                       tokenizer.pad_id, tokenizer.vocab_size, summary, **(blocks.tensors() if blocks is not None else {}))


def load_chat_samples(config: ChatDataConfig, tokenizer: ChatTokenizer, *,
                      log: Callable[[str], None] | None = print, forms: SampleForms | None = None) -> ChatSamples:
    """Read, validate and tokenise the chat files of `config` (or load them from the cache);
    with `forms`, each row gives the samples `forms` makes of it (module doc).

    The DataSummary (rows, samples, skipped rows per reason) goes to `log` before returning.
    Directories in config.paths stand for their files (`data_files`); the samples' `files` list
    those, in that order.
    """
    config = dataclasses.replace(config, paths=tuple(file for path in config.paths for file in data_files(path)))
    cache = _cache_path(config, tokenizer, forms)
    samples = None
    if cache is not None and cache.is_file():
        try:
            samples = _load(cache)
        except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            if log is not None:
                log(f"chat data cache {cache} is unreadable ({type(error).__name__}: {error}); rebuilding")
    if samples is None:
        with contextlib.ExitStack() as stack:
            if config.cache_dir is not None:
                hf_cache_dir = os.path.join(config.cache_dir, "hf-datasets")
            else:
                hf_cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="focusft-hf-datasets-"))
            samples = _read_and_tokenize(config, tokenizer, hf_cache_dir, forms)
        if cache is not None:
            _save(samples, cache)
    if log is not None:
        origin = f"\n  read from cache {cache}" if samples.from_cache else ""
        log(samples.summary.format() + origin)
    return samples
