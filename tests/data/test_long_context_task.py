"""The long-context chat task (megatron_focusft.data.long_context_task): exact lengths, answers, haystack."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_focusft.data.long_context_task import SYMBOLS, DemoTaskConfig, make_chat
from megatron_focusft.data.tokenizer import ByteChatTokenizer, flatten_segments
from megatron_focusft.evaluation import answer_spans

TOK = ByteChatTokenizer()
ASSISTANT_ID = ByteChatTokenizer.ROLE_IDS["assistant"]


@pytest.mark.parametrize("num_symbols", [1, 3, len(SYMBOLS)])
@pytest.mark.parametrize("length", [None, 300, 1024])
def test_chat_has_exact_length_and_its_answer_follows_from_the_context(num_symbols, length):
    task = DemoTaskConfig(num_symbols=num_symbols)
    length = length or task.min_length()
    rng = random.Random(0)
    for _ in range(5):
        chat = make_chat(task, length, rng)
        ids, response = flatten_segments(TOK.render_chat(chat["messages"]))
        assert len(ids) == length
        system, user, assistant = chat["messages"]
        assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
        document = system["content"]
        assert set(document) <= set(" abcdefghijklmnopqrstuvwxyz" + SYMBOLS)
        present = [c for c in document if c in SYMBOLS]
        assert len(present) == len(set(present)) == num_symbols
        assert user["content"] == "?"
        assert assistant["content"] == chat["answer"] == "".join(sorted(present))
        # The one scored span is the answer; the response run ends with the end-of-turn token.
        (start, end), = answer_spans(torch.tensor(response))
        assert TOK.decode(ids[start:end]) == chat["answer"] and ids[end] == TOK.END_ID
        assert ids[start - 1] == ASSISTANT_ID and sum(response) == num_symbols + 1


def test_haystack_spreads_the_symbols():
    rng = random.Random(0)
    positions = []
    for _ in range(40):
        document = make_chat(DemoTaskConfig(num_symbols=3), 1000, rng)["messages"][0]["content"]
        positions += [i / len(document) for i, c in enumerate(document) if c in SYMBOLS]
    assert min(positions) < 0.1 and max(positions) > 0.9  # anywhere in the haystack


def test_chat_rejects_a_length_below_the_minimum():
    task = DemoTaskConfig(num_symbols=4)
    with pytest.raises(ValueError, match="without filler"):
        make_chat(task, task.min_length() - 1, random.Random(0))


def test_context_free_loss():
    assert DemoTaskConfig(num_symbols=1).context_free_loss() == pytest.approx(math.log(len(SYMBOLS)) / 2)
    assert DemoTaskConfig(num_symbols=2).context_free_loss() == pytest.approx(math.log(19 * 18 / 2) / 3)
    assert DemoTaskConfig(num_symbols=len(SYMBOLS)).context_free_loss() == 0.0
