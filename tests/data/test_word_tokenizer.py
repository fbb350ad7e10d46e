"""The word-level tokenizer (data/word_tokenizer.py): lossless on every text of its corpus; a
digit is one token; a RAG sample built from the task's vocabulary has no unknown word; the chat
rendering equals the tokens assembled by hand (special ids and each content encoded alone) with
exactly the reply and its end-of-turn flagged; `focusft data tokenizer` writes a directory the
trainer's loader reads; bad input names the file and line."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.rag_task import RagTaskConfig, rag_samples, vocabulary_texts
from megatron_focusft.data.tokenizer import load_chat_tokenizer
from megatron_focusft.data.word_tokenizer import SPECIAL_TOKENS, build_word_tokenizer, save_word_tokenizer


@pytest.fixture(scope="module")
def rag_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_word_tokenizer(path, [], vocabulary_texts())
    return load_chat_tokenizer(path)


def test_rag_samples_round_trip_without_unknown_words(rag_tokenizer):
    unk = rag_tokenizer.hf_tokenizer.unk_token_id
    samples = rag_samples(RagTaskConfig(num_samples=30, passages=5, target_tokens=200, seed=4),
                          lambda text: len(rag_tokenizer.encode(text)))
    for sample in samples:
        for text in (*sample.blocks, sample.question, sample.answer):
            ids = rag_tokenizer.encode(text)
            assert unk not in ids, text
            assert rag_tokenizer.decode(ids) == text
        assert len(rag_tokenizer.encode(sample.answer)) == len(sample.answer) == 6  # one token per digit


def test_chat_rendering_is_the_hand_assembled_tokens(rag_tokenizer):
    hf = rag_tokenizer.hf_tokenizer
    start, sep, end = (hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    question, answer = "What is the code of the amber owl vault?", "104729"
    segments = rag_tokenizer.render_chat([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}])
    context = [start, *rag_tokenizer.encode("user"), sep, *rag_tokenizer.encode(question), end,
               start, *rag_tokenizer.encode("assistant"), sep]
    assert segments == [(context, False), ([*rag_tokenizer.encode(answer), end], True)]
    assert rag_tokenizer.eos_id == end and rag_tokenizer.pad_id == hf.convert_tokens_to_ids("<pad>")
    prompt = rag_tokenizer.render_prompt([{"role": "user", "content": question}])
    assert [i for ids, _ in prompt for i in ids] == context


def test_words_of_the_corpus_and_specials_come_first():
    tokenizer = build_word_tokenizer(["Alpha beta, 12.", "beta\ngamma"])
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert tokenizer.tokenize("Alpha beta, 12.") == ["Alpha", "▁beta", ",", "▁", "1", "2", "."]
    for text in ("Alpha beta, 12.", "beta\ngamma", "gamma  beta"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_tokens_to_ids("delta") == tokenizer.unk_token_id


def test_data_tokenizer_command(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"blocks": ["Quartz lies north."], "global": "Where",
                                "messages": [{"role": "user", "content": "Where is quartz?"},
                                             {"role": "assistant", "content": "north"}]}) + "\n")
    assert cli_main(["data", "tokenizer", "--output", str(tmp_path / "tok"), "--input", str(rows)]) == 0
    tokenizer = load_chat_tokenizer(tmp_path / "tok")
    for text in ("Quartz lies north.", "Where is quartz?", "north"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.hf_tokenizer.unk_token_id not in tokenizer.encode(text)
    assert "word-level tokenizer of" in capsys.readouterr().err


def test_bad_input_names_file_and_line(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(SystemExit):
        cli_main(["data", "tokenizer", "--output", str(tmp_path / "tok"), "--input", str(rows)])
    assert f"{rows} line 2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists(), "nothing is written for bad input"
    with pytest.raises(SystemExit):
        cli_main(["data", "tokenizer", "--output", str(tmp_path / "tok")])
    assert "no words" in capsys.readouterr().err
