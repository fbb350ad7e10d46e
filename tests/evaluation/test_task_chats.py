"""Training chats from the task generators (evaluation/task_chats.py) and the word-task vocabulary."""

from __future__ import annotations

import re

import pytest

from megatron_focusft.data.word_tokenizer import build_word_tokenizer
from megatron_focusft.evaluation.long_context_tasks import TASKS, VALUE_WORDS, WORD_TASKS, WORDS, vocabulary_texts
from megatron_focusft.evaluation.scoring import score
from megatron_focusft.evaluation.task_chats import (
    COPY_PROMPT, CORPUS_PROMPT, copy_chats, corpus_chats, shortest_prompt, task_chats)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(vocabulary_texts())


def _count(tokenizer):
    return lambda text: len(tokenizer.encode(text))


def test_word_tasks_exclude_the_tasks_that_make_up_strings():
    assert "vt" not in WORD_TASKS and "fwe" not in WORD_TASKS
    assert {"niah_single_essay_word", "niah_multivalue_essay_word", "babilong_qa1", "cwe"} <= set(WORD_TASKS)
    assert all(TASKS[name].family != "rag" for name in WORD_TASKS)


def test_the_vocabulary_encodes_every_word_task_without_unknown_words(tokenizer):
    from megatron_focusft.evaluation.long_context_tasks import generate_samples

    count = _count(tokenizer)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    for task in WORD_TASKS:
        for length, seed in ((300, 11), (1200, 12)):
            for sample in generate_samples(task, length, 4, count, seed=seed):
                for text in (sample.prompt, ", ".join(sample.references)):
                    ids = tokenizer.encode(text)
                    assert unk not in ids, (task, [t for t, i in zip(tokenizer.tokenize(text), ids) if i == unk])
                    assert tokenizer.decode(ids) == text  # lossless, so the answer text scores as generated


def test_word_values_occur_only_in_their_needles():
    from megatron_focusft.evaluation.long_context_tasks import generate_samples
    from megatron_focusft.data.tokenizer import ByteChatTokenizer

    count = lambda text: len(ByteChatTokenizer().encode(text))  # noqa: E731
    for task, expected in (("niah_single_essay_word", 1), ("niah_multivalue_essay_word", 4),
                           ("niah_multikey_essay_word", 1)):
        for sample in generate_samples(task, 1500, 3, count, seed=2):
            assert len(sample.references) == expected
            assert all(ref in VALUE_WORDS for ref in sample.references)
            words = re.findall(r"[a-z]+", sample.prompt)
            # each value word in the prompt is the last word of a needle "... is <value>."
            needles = re.findall(r"The secret code for [a-z]+-[a-z]+ is ([a-z]+)\.", sample.prompt)
            assert sorted(w for w in words if w in VALUE_WORDS) == sorted(needles)
            assert set(sample.references) <= set(needles)


def test_task_chats_fit_score_fully_and_refuse_the_eval_stream(tokenizer):
    count = _count(tokenizer)
    tasks = ("niah_single_essay_word", "babilong_qa1")
    chats = task_chats(tasks, 6, 200, count, stream=3, min_tokens=120)
    assert len(chats) == 12
    for i, row in enumerate(chats):
        task = tasks[i // 6]
        user, assistant = (m["content"] for m in row["messages"])
        assert 120 - 120 // 4 <= count(user) <= 200  # the largest haystack under the drawn length
        references = tuple(assistant.split(", "))
        assert all(ref in user for ref in references)
        assert score(TASKS[task].metric, assistant, references) == 1.0
    assert task_chats(tasks, 6, 200, count, stream=3, min_tokens=120) == chats  # reproducible
    assert task_chats(tasks, 6, 200, count, stream=4, min_tokens=120) != chats
    with pytest.raises(ValueError, match="stream must be >= 1"):
        task_chats(tasks, 1, 200, count, stream=0)
    with pytest.raises(ValueError, match="niah_multikey_essay_word: its shortest prompt"):
        task_chats(("niah_multikey_essay_word",), 1, shortest_prompt("niah_multikey_essay_word", count) - 1, count, 1)


def test_copy_and_corpus_chats(tokenizer):
    count = _count(tokenizer)
    known = set(WORDS) | set(VALUE_WORDS)
    for row in copy_chats(20, 40, count, seed=1):
        user, assistant = (m["content"] for m in row["messages"])
        assert user == f"{COPY_PROMPT}\n\n{assistant}"
        assert count(assistant) <= 40 and set(assistant.split()) <= known
    for row in corpus_chats(10, 60, count, seed=1):
        user, assistant = (m["content"] for m in row["messages"])
        assert user == CORPUS_PROMPT and 0 < count(assistant) <= 60 and assistant.endswith(".")
