"""HFChatTokenizer on tiny tokenizers built here (no download): exact response flags for the
prefix method and the {% generation %} method, ids identical to apply_chat_template, tools,
and the errors for templates that fail or rewrite earlier turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_focusft.data.chat import ChatDataConfig, load_chat_samples
from megatron_focusft.data.tokenizer import (
    ChatTemplateError,
    ChatTokenizer,
    HFChatTokenizer,
    flatten_segments,
)
from tests.data.conftest import chat, write_jsonl

WORDS = "system user assistant tool be brief hello world good day the weather is sunny in Paris call get"
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]

# ChatML-like. HF renders with trim_blocks/lstrip_blocks, so no newline follows a block tag.
CHATML = (
    "{%- if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %} call {{ c['function']['name'] }}"
    "{%- endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{%- else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Keeps only the last assistant turn's text: rendering a prefix does not give a prefix.
REWRITES_HISTORY = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' and not loop.last %}hello{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT = ("{%- for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns here') }}"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """WordLevel over whitespace-split words: one token per word, so flags are easy to write."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([WORDS], trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("word_tokenizer")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte-level BPE: merges cross word boundaries, like real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([WORDS, "hello world, good day!\n", "the weather is sunny in Paris.\n"] * 3,
                                  trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("bpe_tokenizer")
    fast.save_pretrained(path)
    return str(path)


MULTI_TURN = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "good day"},
    {"role": "user", "content": "the weather"},
    {"role": "assistant", "content": "sunny"},
]
# Hand-written: (token, is_response) for MULTI_TURN under CHATML.
MULTI_TURN_EXPECTED = [
    ("<|im_start|>", 0), ("system", 0), ("be", 0), ("brief", 0), ("<|im_end|>", 0),
    ("<|im_start|>", 0), ("user", 0), ("hello", 0), ("world", 0), ("<|im_end|>", 0),
    ("<|im_start|>", 0), ("assistant", 0), ("good", 1), ("day", 1), ("<|im_end|>", 1),
    ("<|im_start|>", 0), ("user", 0), ("the", 0), ("weather", 0), ("<|im_end|>", 0),
    ("<|im_start|>", 0), ("assistant", 0), ("sunny", 1), ("<|im_end|>", 1),
]


def _tokens_and_flags(tok: HFChatTokenizer, messages, tools=None) -> list[tuple[str, int]]:
    ids, flags = flatten_segments(tok.render_chat(messages, tools))
    return list(zip(tok.hf_tokenizer.convert_ids_to_tokens(ids), flags))


def test_prefix_method_exact(word_dir: str) -> None:
    tok = HFChatTokenizer(word_dir)
    assert isinstance(tok, ChatTokenizer) and tok.method == "prefix"
    assert _tokens_and_flags(tok, MULTI_TURN) == MULTI_TURN_EXPECTED
    ids, _ = flatten_segments(tok.render_chat(MULTI_TURN))
    assert ids == list(tok.hf_tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=True)["input_ids"])
    assert tok.pad_id == tok.hf_tokenizer.convert_tokens_to_ids("<pad>")
    assert tok.eos_id == tok.hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tok.vocab_size == len(tok.hf_tokenizer)


def test_generation_method_exact(word_dir: str) -> None:
    tok = HFChatTokenizer(word_dir, chat_template=CHATML_GENERATION)
    assert tok.method == "generation"
    no_system = MULTI_TURN[1:]
    assert _tokens_and_flags(tok, no_system) == MULTI_TURN_EXPECTED[5:]
    prefix = HFChatTokenizer(word_dir, chat_template=CHATML_GENERATION, assistant_mask="prefix")
    assert prefix.render_chat(no_system) == tok.render_chat(no_system)
    assert prefix.identity != tok.identity
    with pytest.raises(ValueError, match="generation"):
        HFChatTokenizer(word_dir, assistant_mask="generation")


def test_tools_and_tool_turns(word_dir: str) -> None:
    tok = HFChatTokenizer(word_dir)
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "weather in Paris"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                     "function": {"name": "get", "arguments": "{}"}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "sunny"}]
    expected = [
        ("<|im_start|>", 0), ("system", 0), ("<unk>", 0), ("<unk>", 0), ("get", 0), ("<|im_end|>", 0),  # "tools", ":"
        ("<|im_start|>", 0), ("user", 0), ("weather", 0), ("in", 0), ("Paris", 0), ("<|im_end|>", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("call", 1), ("get", 1), ("<|im_end|>", 1),
        ("<|im_start|>", 0), ("tool", 0), ("sunny", 0), ("<|im_end|>", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("sunny", 1), ("<|im_end|>", 1),
    ]
    assert _tokens_and_flags(tok, messages, tools) == expected


def test_bpe_response_text_is_content_plus_end(bpe_dir: str) -> None:
    tok = HFChatTokenizer(bpe_dir)
    messages = [{"role": "user", "content": "hello world, good day!"},
                {"role": "assistant", "content": "the weather is sunny in Paris."},
                {"role": "user", "content": "good"},
                {"role": "assistant", "content": "hello\nworld"}]
    segments = tok.render_chat(messages)
    responses = [tok.decode(ids) for ids, is_response in segments if is_response]
    assert responses == ["the weather is sunny in Paris.<|im_end|>", "hello\nworld<|im_end|>"]
    ids, _ = flatten_segments(segments)
    assert ids == list(tok.hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    assert tok.decode(ids) == tok.hf_tokenizer.apply_chat_template(messages, tokenize=False)


def test_template_errors(word_dir: str) -> None:
    two_answers = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good day"},
                   {"role": "user", "content": "the"}, {"role": "assistant", "content": "sunny"}]
    with pytest.raises(ChatTemplateError, match="not prefix-stable at message 2"):
        HFChatTokenizer(word_dir, chat_template=REWRITES_HISTORY).render_chat(two_answers)
    with pytest.raises(ChatTemplateError, match="no tool turns here"):
        HFChatTokenizer(word_dir, chat_template=STRICT).render_chat([{"role": "tool", "content": "x"}])


def test_missing_directory_and_template(tmp_path: Path, word_dir: str) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        HFChatTokenizer(tmp_path / "absent")
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(word_dir)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        HFChatTokenizer(tmp_path / "plain")


def test_loading_with_hf_tokenizer(tmp_path: Path, word_dir: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": MULTI_TURN},
        chat(("user", "hello"), ("assistant", "good day"), ("tool", "sunny")),  # STRICT rejects it
        chat(("user", "hello"), ("assistant", "good day")),
    ])
    tok = HFChatTokenizer(word_dir, chat_template=STRICT)
    samples = load_chat_samples(ChatDataConfig(path, 64, policy="skip"), tok, log=None)
    assert len(samples) == 2 and samples.summary.skipped == {"template_error": 1}
    assert "row 2: chat template failed" in samples.summary.first_skipped["template_error"]
    samples = load_chat_samples(ChatDataConfig(path, 64), HFChatTokenizer(word_dir), log=None)
    ids, flags = samples.sample(0)
    assert [f for _, f in MULTI_TURN_EXPECTED] == flags.tolist()


def test_assistant_first(word_dir: str) -> None:
    # An empty conversation cannot be rendered with a generation prompt; the content is located instead.
    tok = HFChatTokenizer(word_dir)
    messages = [{"role": "assistant", "content": "good day"}, {"role": "user", "content": "hello"}]
    assert _tokens_and_flags(tok, messages) == [
        ("<|im_start|>", 0), ("assistant", 0), ("good", 1), ("day", 1), ("<|im_end|>", 1),
        ("<|im_start|>", 0), ("user", 0), ("hello", 0), ("<|im_end|>", 0)]
