"""The built-in byte chat tokenizer: exact ids and response flags, tools, and the protocol."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.data.tokenizer import (
    ByteChatTokenizer,
    ChatTemplateError,
    ChatTokenizer,
    flatten_segments,
    load_chat_tokenizer,
    segments_from_flags,
)

TOK = ByteChatTokenizer()


def b(text: str) -> list[int]:
    """Byte ids, written out independently of the tokenizer."""
    return [8 + byte for byte in text.encode("utf-8")]


def test_protocol_and_ids() -> None:
    assert isinstance(TOK, ChatTokenizer)
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.vocab_size) == (0, 1, 2, 264)
    assert TOK.encode("hi") == [112, 113]
    assert TOK.encode("é") == [8 + 0xC3, 8 + 0xA9]
    # Text that looks like a special token stays bytes.
    assert all(i >= 8 for i in TOK.encode("<assistant><end>"))
    assert TOK.decode([1, 5, 112, 113, 2]) == "<bos><assistant>hi<end>"


def test_single_turn_mask_is_exact() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"}]
    ids, response = flatten_segments(TOK.render_chat(messages))
    # bos <system> S <end> <user> h i <end> <assistant> | o k <end> |
    assert ids == [1, 3, 91, 2, 4, 112, 113, 2, 5, 119, 115, 2]
    assert response == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_multi_turn_with_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "r", "tool_call_id": "1"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "z"}]
    segments = TOK.render_chat(messages, tools)
    expected = [
        ([1, 7, *b(json.dumps(tools)), 2, 4, *b("q"), 2, 5], False),
        ([*b(json.dumps(calls)), 2], True),
        ([6, *b("r"), 2, 5], False),
        ([*b("a"), 2], True),
        ([4, *b("z"), 2], False),
    ]
    assert segments == expected
    with_text = TOK.render_chat([{"role": "assistant", "content": "x", "tool_calls": calls}])
    assert with_text[1] == ([*b("x\n" + json.dumps(calls)), 2], True)


def test_unknown_role_raises() -> None:
    with pytest.raises(ChatTemplateError, match="role 'bot'"):
        TOK.render_chat([{"role": "bot", "content": "x"}])


def test_segments_helpers() -> None:
    assert segments_from_flags([5, 6, 7, 8], [0, 1, 1, 0]) == [([5], False), ([6, 7], True), ([8], False)]
    assert flatten_segments([([5], False), ([6, 7], True)]) == ([5, 6, 7], [0, 1, 1])
    with pytest.raises(ValueError, match="3 token ids but 2 flags"):
        segments_from_flags([1, 2, 3], [0, 1])


def test_load_chat_tokenizer_default_and_missing_directory(tmp_path) -> None:
    assert isinstance(load_chat_tokenizer(None), ByteChatTokenizer)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_chat_tokenizer(tmp_path / "absent")


def test_span_overlap_rule() -> None:
    from megatron_focusft.data.tokenizer import _overlaps

    spans = [(10, 20), (30, 35)]
    starts = [10, 30]
    flag = lambda a, b: _overlaps(a, b, starts, spans)  # noqa: E731
    assert [flag(0, 10), flag(8, 12), flag(10, 12), flag(19, 25), flag(20, 30), flag(25, 31), flag(35, 40)] == \
           [False, True, True, True, False, True, False]
    # Zero-width tokens count only inside a span.
    assert [flag(10, 10), flag(19, 19), flag(20, 20), flag(5, 5)] == [True, True, False, False]
