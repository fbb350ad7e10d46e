"""The copy tasks (data/copy_task.py): the reply repeats the prompt's words exactly, or continues
them after the key; rows are seeded per index; every word is one the RAG task's word-level tokenizer knows; bad settings are
errors naming the flag."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.copy_task import CopyTaskConfig, copy_rows, task_words
from megatron_focusft.data.rag_task import vocabulary_texts
from megatron_focusft.data.word_tokenizer import build_word_tokenizer


def test_rows_repeat_seeded_words_of_the_task_at_lengths_drawn_per_row():
    rows = copy_rows(CopyTaskConfig(num_samples=40, words=30, min_words=12, seed=3))
    assert copy_rows(CopyTaskConfig(num_samples=3, words=30, min_words=12, seed=3)) == rows[:3]
    assert copy_rows(CopyTaskConfig(num_samples=40, words=30, min_words=12, seed=4)) != rows
    tokenizer = build_word_tokenizer(vocabulary_texts())
    lengths = []
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and user["content"] == assistant["content"]
        words = user["content"].split(" ")
        assert 12 <= len(words) <= 30 and set(words) <= set(task_words())
        assert tokenizer.unk_token_id not in tokenizer.encode(user["content"])
        lengths.append(len(words))
    assert len(set(lengths)) > 8, "the length varies, so no fixed offset answers"
    assert len({r["messages"][0]["content"] for r in rows}) == 40
    fixed = copy_rows(CopyTaskConfig(num_samples=5, words=7, min_words=7))
    assert all(len(r["messages"][0]["content"].split(" ")) == 7 for r in fixed)
    with pytest.raises(ValueError, match="--min-words must be <= --words"):
        CopyTaskConfig(words=5, min_words=6)


def test_continue_rows_copy_the_span_after_the_key_of_distinct_words():
    rows = copy_rows(CopyTaskConfig(num_samples=40, words=30, min_words=8, span=4, seed=2, form="continue"))
    assert copy_rows(CopyTaskConfig(num_samples=3, words=30, min_words=8, span=4, seed=2, form="continue")) == rows[:3]
    lengths = set()
    for row in rows:
        user, assistant = row["messages"]
        sequence, key = user["content"].split(" ? ")
        words = sequence.split(" ")
        assert len(set(words)) == len(words) and 8 <= len(words) <= 30 and set(words) <= set(task_words())
        start = words.index(key)  # the key is a word of the sequence; the reply is what follows it
        assert assistant["content"] == "The " + " ".join(words[start:start + 4]) and start + 4 <= len(words)
        lengths.add(len(words))
    assert len(lengths) > 5, "the length varies, so no fixed offset answers"
    with pytest.raises(ValueError, match="--form continue needs --span <= --min-words <= --words"):
        CopyTaskConfig(form="continue", words=10, min_words=12)
    with pytest.raises(ValueError, match="--form must be one of"):
        CopyTaskConfig(form="shuffle")


def test_data_copy_command(tmp_path, capsys):
    out = tmp_path / "copy.jsonl"
    assert cli_main(["data", "copy", "--output", str(out), "--num-samples", "4", "--words", "5", "--min-words", "2",
                     "--seed", "1"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == copy_rows(
        CopyTaskConfig(num_samples=4, words=5, min_words=2, seed=1))
    with pytest.raises(SystemExit):
        cli_main(["data", "copy", "--output", str(out), "--words", "0"])
    assert "--words must be >= 1" in capsys.readouterr().err
    assert cli_main(["data", "copy", "--output", str(out), "--num-samples", "3", "--form", "continue",
                     "--words", "12", "--min-words", "6", "--span", "3"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == copy_rows(
        CopyTaskConfig(num_samples=3, words=12, min_words=6, span=3, form="continue"))
