"""Block rows in the `messages` form (the RAG task's rows): read back as the BlockPrompt the row
format implies (each block encoded alone, the global block the chat template's prompt of the
conversation without its final answer), with the byte and a Hugging Face tokenizer; the
`global` form still reads; bad rows are errors naming file, line and part."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.data.rag_task import RagTaskConfig, rag_samples, write_rag_jsonl
from megatron_focusft.data.tokenizer import ByteChatTokenizer, flatten_segments, load_chat_tokenizer
from megatron_focusft.generation.prompts import PromptError, read_prompts


@pytest.fixture(params=["byte", "hf"])
def tokenizer(request, tmp_path):
    if request.param == "byte":
        return ByteChatTokenizer()
    from tests.helpers.hf_models import save_tokenizer

    save_tokenizer(tmp_path / "tok")
    return load_chat_tokenizer(str(tmp_path / "tok"))


def test_rag_rows_read_back_as_the_block_prompts_they_imply(tmp_path, tokenizer):
    samples = rag_samples(RagTaskConfig(num_samples=3, passages=4, target_tokens=500, pool_size=6), len)
    path = tmp_path / "rag.jsonl"
    write_rag_jsonl(path, samples)
    prompts = read_prompts(path, tokenizer, 300, blocks=True)
    for sample, prompt in zip(samples, prompts, strict=True):
        assert prompt.blocks == tuple(tuple(tokenizer.encode(b)) for b in sample.blocks)
        question, _ = flatten_segments(tokenizer.render_prompt([{"role": "user", "content": sample.question}]))
        assert prompt.global_block == tuple(question)
        # The training view of the same row: its rendered chat is the global block, then the response.
        ids, response = flatten_segments(tokenizer.render_chat(sample.messages()))
        start = response.index(1)
        assert tuple(ids[:start]) == prompt.global_block and all(response[start:])
    answerless = tmp_path / "answerless.jsonl"
    answerless.write_text("".join(json.dumps({"blocks": s.row()["blocks"], "messages": s.messages()[:1]}) + "\n"
                                  for s in samples))
    assert read_prompts(answerless, tokenizer, 300, blocks=True) == prompts


def test_the_global_form_still_reads(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"blocks": ["ab", [20, 21]], "global": [30, 31]}) + "\n")
    (prompt,) = read_prompts(path, ByteChatTokenizer(), 300, blocks=True)
    assert prompt.blocks == ((8 + ord("a"), 8 + ord("b")), (20, 21)) and prompt.global_block == (30, 31)


@pytest.mark.parametrize("row, message", [
    ({"blocks": ["a passage"]}, r"rows.jsonl:2: a block row needs 'blocks' and exactly one of 'global'"),
    ({"blocks": ["a"], "global": "q", "messages": [{"role": "user", "content": "q"}]},
     r"rows.jsonl:2: a block row needs .* got \['blocks', 'global', 'messages'\]"),
    ({"blocks": ["a", ""], "messages": [{"role": "user", "content": "q"}]},
     r"rows.jsonl:2 block 2: expected a non-empty text"),
    ({"blocks": "a", "messages": [{"role": "user", "content": "q"}]}, r"rows.jsonl:2: 'blocks' must be a list"),
    ({"blocks": ["a"], "messages": []}, r"rows.jsonl:2 messages: 'messages' is empty"),
    ({"blocks": ["a"], "messages": [{"role": "assistant", "content": "42"}]},
     r"rows.jsonl:2 messages: 'messages' holds only the answer"),
    ({"blocks": ["a"], "messages": [{"role": "robot", "content": "q"}]}, r"rows.jsonl:2 messages: message 1 has role"),
    ({"blocks": [[5, 999]], "messages": [{"role": "user", "content": "q"}]},
     r"rows.jsonl:2 block 1: token id 999 is outside the model's vocabulary \[0, 300\)"),
])
def test_bad_block_rows_name_the_row(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    good = {"blocks": ["a"], "messages": [{"role": "user", "content": "q"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PromptError, match=message):
        read_prompts(path, ByteChatTokenizer(), 300, blocks=True)
