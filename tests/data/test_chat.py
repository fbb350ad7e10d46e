"""Chat files -> samples: every bad-input case (error names file, row, reason; skip counts it),
JSONL and Parquet alike, values kept as written, the summary, and the tokenised-set cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_focusft.data.chat import BadSampleError, ChatDataConfig, ChatSamples, load_chat_samples
from megatron_focusft.data.tokenizer import ByteChatTokenizer, flatten_segments
from tests.data.conftest import chat, write_parquet

TOK = ByteChatTokenizer()
GOOD = chat(("user", "hi"), ("assistant", "ok"))  # 9 tokens: bos <user> h i <end> <assistant> o k <end>

# (row, expected reason, expected words in the message) for the JSONL cases, one per row.
BAD_JSONL_ROWS = [
    ("{not json", "malformed", "not valid JSON"),
    ("[1, 2]", "malformed", "must be a JSON object, got list"),
    (json.dumps({"text": "x"}), "malformed", "no 'messages' field"),
    (json.dumps({"messages": "hello"}), "malformed", "'messages' is a string that is not JSON"),
    (json.dumps({"messages": {"role": "user"}}), "malformed", "must be a list of messages, got object"),
    (json.dumps({"messages": []}), "malformed", "'messages' is empty"),
    (json.dumps({"messages": ["hi"]}), "malformed", "message 1 must be an object, got string"),
    (json.dumps({"messages": [{"content": "x"}]}), "malformed", "message 1 has no 'role'"),
    (json.dumps(chat(("user", "x")) | {"messages": [{"role": "user", "content": 5}]}), "malformed",
     "message 1 (user) has content of type int"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}), "malformed",
     "message 2 (assistant) has no 'content'"),
    (json.dumps(GOOD | {"tools": {"name": "f"}}), "malformed", "'tools' must be a list of objects"),
    (json.dumps(chat(("user", "x"), ("bot", "y"))), "unknown_role", "message 2 has role 'bot'"),
    (json.dumps(chat(("system", "s"), ("user", "x"))), "no_assistant_tokens", "no assistant message"),
    (json.dumps(chat(("user", "x" * 40), ("assistant", "y"))), "too_long", "46 tokens > seq_length 32"),
]


def config(paths, policy="error", seq_length=32, **kw) -> ChatDataConfig:
    return ChatDataConfig(paths, seq_length, policy=policy, **kw)


@pytest.mark.parametrize("case", range(len(BAD_JSONL_ROWS)))
def test_bad_row_errors_name_file_row_reason(jsonl, case: int) -> None:
    line, reason, words = BAD_JSONL_ROWS[case]
    path = jsonl([GOOD, "", line, GOOD])  # the bad row is line 3 (blank lines count in line numbers)
    with pytest.raises(BadSampleError) as info:
        load_chat_samples(config(path), TOK, log=None)
    message = str(info.value)
    assert f"{path}, row 3: {reason}: " in message and words in message, message
    assert (info.value.path, info.value.row, info.value.reason) == (path, 3, reason)


def test_skip_policy_counts_every_reason(jsonl, capsys: pytest.CaptureFixture[str]) -> None:
    path = jsonl([GOOD] + [line for line, _, _ in BAD_JSONL_ROWS] + ["", GOOD])
    samples = load_chat_samples(config(path, "skip"), TOK)
    expected = {}
    for _, reason, _ in BAD_JSONL_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    summary = samples.summary
    assert summary.skipped == expected
    assert (summary.rows, summary.samples, summary.blank_lines) == (len(BAD_JSONL_ROWS) + 2, 2, 1)
    assert summary.rows == summary.samples + summary.num_skipped
    assert summary.first_skipped["malformed"] == f"{path}, row 2: not valid JSON: " \
                                                 f"Expecting property name enclosed in double quotes (column 2)"
    assert [samples.source(i) for i in range(len(samples))] == [(path, 1), (path, len(BAD_JSONL_ROWS) + 3)]
    printed = capsys.readouterr().out
    assert "2 sample(s)" in printed and f"skipped: {len(BAD_JSONL_ROWS)}" in printed
    for reason in expected:
        assert f"{reason}: {expected[reason]} (first: {path}, row" in printed


def test_empty_files(tmp_path: Path, jsonl) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = jsonl(["", "  "], name="blank.jsonl")
    empty_parquet = tmp_path / "empty.parquet"
    empty_parquet.write_bytes(b"")
    import pyarrow as pa
    import pyarrow.parquet as pq

    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"messages": pa.array([], type=pa.list_(pa.struct([("role", pa.string()),
                                                                              ("content", pa.string())])))}), no_rows)
    for path, detail in [(empty, "0 bytes"), (blank, "no rows"), (empty_parquet, "0 bytes"), (no_rows, "no rows")]:
        with pytest.raises(BadSampleError, match=rf"^{path}: empty_file: .*{detail}"):
            load_chat_samples(config(str(path)), TOK, log=None)
    good = jsonl([GOOD])
    samples = load_chat_samples(config([str(empty), blank, good, str(no_rows)], "skip"), TOK, log=None)
    assert len(samples) == 1 and samples.summary.skipped == {"empty_file": 3}
    with pytest.raises(ValueError, match="no usable chat samples"):
        load_chat_samples(config([str(empty), blank], "skip"), TOK, log=None)


def test_file_level_errors(tmp_path: Path, jsonl) -> None:
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_chat_samples(config(str(tmp_path / "absent.jsonl")), TOK, log=None)
    with pytest.raises(ValueError, match="unknown data file type '.csv'"):
        config(str(tmp_path / "data.csv"))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"definitely not parquet")
    with pytest.raises(ValueError, match=rf"{junk}: not a readable Parquet file"):
        load_chat_samples(config(str(junk), "skip"), TOK, log=None)
    other = write_parquet(tmp_path / "other.parquet", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"no 'messages' column \(columns: text\)"):
        load_chat_samples(config(other, "skip"), TOK, log=None)
    with pytest.raises(ValueError, match="policy must be one of"):
        config(jsonl([GOOD]), policy="truncate")


TOOL_ROWS = [
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": "{\"c\": 1}"}}]},
                  {"role": "tool", "content": "sunny", "tool_call_id": "0"},
                  {"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "get", "description": "weather"}}]},
    chat(("user", "42"), ("assistant", "[1, 2]")),
    chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
]


def test_jsonl_and_parquet_give_the_same_samples(jsonl, parquet) -> None:
    a = load_chat_samples(config(jsonl(TOOL_ROWS), seq_length=512), TOK, log=None)
    b = load_chat_samples(config(parquet(TOOL_ROWS), seq_length=512), TOK, log=None)
    assert len(a) == len(b) == 3
    for name in ("tokens", "response", "offsets", "source_row"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # Arrow fills absent keys (tool_calls, tool_call_id, ...) with null; they must not reach the template.
    expected = flatten_segments(TOK.render_chat(
        [{k: v for k, v in m.items() if v is not None} for m in TOOL_ROWS[0]["messages"]], TOOL_ROWS[0]["tools"]))
    assert [t.tolist() for t in b.sample(0)] == [expected[0], expected[1]]
    assert TOK.decode(b.sample(1)[0].tolist()) == "<bos><user>42<end><assistant>[1, 2]<end>"


def test_one_bad_row_does_not_change_the_others(jsonl) -> None:
    # A non-string content in one row must not make "42" a number in another (joint Arrow schemas do).
    rows = [chat(("user", "42"), ("assistant", "{}")), {"messages": [{"role": "user", "content": 5}]}]
    samples = load_chat_samples(config(jsonl(rows), "skip"), TOK, log=None)
    assert samples.summary.skipped == {"malformed": 1}
    assert TOK.decode(samples.sample(0)[0].tolist()) == "<bos><user>42<end><assistant>{}<end>"


def test_bytes_that_are_not_utf8_are_a_bad_row_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    # "café" in Latin-1: the é is the single byte 0xe9, not UTF-8's c3 a9.
    bad = json.dumps(chat(("user", "caf\u00e9"), ("assistant", "ok")), ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), bad, json.dumps(GOOD).encode()]) + b"\n")
    with pytest.raises(BadSampleError, match=rf"{path}, row 2: malformed: not UTF-8 text: byte 0xe9 at byte "
                                             rf"{bad.index(b'\xe9') + 1} of the line"):
        load_chat_samples(config(str(path)), TOK, log=None)
    samples = load_chat_samples(config(str(path), "skip"), TOK, log=None)
    assert len(samples) == 2 and samples.summary.skipped == {"malformed": 1}
    assert samples.summary.first_skipped["malformed"].startswith(f"{path}, row 2: not UTF-8 text")


def test_a_directory_is_its_data_files_and_a_file_needs_a_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "chats"
    folder.mkdir()
    write_parquet(folder / "b.parquet", [GOOD])
    (folder / "a.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (folder / "notes.txt").write_text("not data")
    samples = load_chat_samples(config(str(folder)), TOK, log=None)
    assert samples.files == (str(folder / "a.jsonl"), str(folder / "b.parquet")) and len(samples) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"directory {empty} holds no chat data files \(.jsonl, .ndjson, .json, "
                                         rf".parquet\)"):
        load_chat_samples(config(str(empty)), TOK, log=None)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'chats_export'}: a data file without a suffix; name it for "
                                         rf"its format, JSON Lines \(.jsonl, .ndjson, .json\) or Parquet \(.parquet\)"):
        config(str(tmp_path / "chats_export"))


def test_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    assert len(load_chat_samples(config(str(path)), TOK, log=None)) == 2


class CountingTokenizer(ByteChatTokenizer):
    def __init__(self) -> None:
        self.calls = 0

    def render_chat(self, messages, tools=None):
        self.calls += 1
        return super().render_chat(messages, tools)


def test_cache_hit_does_not_retokenise(tmp_path: Path, jsonl, capsys: pytest.CaptureFixture[str]) -> None:
    path = jsonl([GOOD, chat(("user", "x" * 40), ("assistant", "y")), TOOL_ROWS[2]])
    cache = str(tmp_path / "cache")
    tok = CountingTokenizer()
    first = load_chat_samples(config(path, "skip", cache_dir=cache), tok)
    assert tok.calls == 3 and not first.from_cache
    second = load_chat_samples(config(path, "skip", cache_dir=cache), tok)
    assert tok.calls == 3 and second.from_cache
    for name in ("tokens", "response", "offsets", "source_file", "source_row"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert second.summary == first.summary and second.files == first.files
    printed = capsys.readouterr().out
    assert printed.count("skipped: 1") == 2 and "read from cache" in printed  # summary printed both times

    # Anything the set depends on changes the key: seq_length, policy, the file.
    load_chat_samples(config(path, "skip", seq_length=64, cache_dir=cache), tok, log=None)
    assert tok.calls == 6
    with pytest.raises(BadSampleError, match="too_long"):
        load_chat_samples(config(path, "error", cache_dir=cache), tok, log=None)
    os.utime(path, ns=(0, 12345))
    third = load_chat_samples(config(path, "skip", cache_dir=cache), tok, log=None)
    assert not third.from_cache and tok.calls == 11

    # A damaged cache file is rebuilt, with a note.
    for file in Path(cache).glob("chat-*.pt"):
        file.write_bytes(b"garbage")
    notes: list[str] = []
    again = load_chat_samples(config(path, "skip", cache_dir=cache), tok, log=notes.append)
    assert not again.from_cache and "unreadable" in notes[0]


def test_from_lists() -> None:
    samples = ChatSamples.from_lists([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0, vocab_size=16)
    assert len(samples) == 2 and samples.lengths.tolist() == [3, 1]
    assert [t.tolist() for t in samples.sample(0)] == [[5, 6, 7], [0, 1, 1]]
    with pytest.raises(ValueError, match="sample 0"):
        ChatSamples.from_lists([([5], [0, 1])], pad_id=0, vocab_size=16)
