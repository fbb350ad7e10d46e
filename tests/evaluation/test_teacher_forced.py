"""Teacher-forced evaluation (megatron_focusft.evaluation.teacher_forced) against an independent count."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_focusft.data.long_context_task import SYMBOLS, DemoTaskConfig, load_eval_samples, write_chats
from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.evaluation import context_free_guess, evaluate, probe_batch
from tests.helpers.long_context import baseline_by_hand

TOK = ByteChatTokenizer()
ASSISTANT_ID = ByteChatTokenizer.ROLE_IDS["assistant"]


def test_context_free_guess_is_the_successor_rule():
    ids = [ByteChatTokenizer.FIRST_BYTE_ID + ord(c) for c in SYMBOLS]
    assert context_free_guess([]) == ids[0]
    assert context_free_guess([ids[0], ids[3]]) == ids[4]
    assert context_free_guess([ids[-1]]) == ids[-1]


class _Oracle(torch.nn.Module):
    """Logits [b, s, vocab] whose argmax at t is a wrong token everywhere except where t predicts an
    answer symbol: there it is the symbol, unless `wrong` (a set of (first token of the row's
    answer, symbol index)) marks it. Answers are found from the <assistant> token, not from the
    response flags the evaluation uses."""

    def __init__(self, wrong: set[tuple[int, int]], num_symbols: int) -> None:
        super().__init__()
        self.wrong, self.k = wrong, num_symbols

    def forward(self, tokens, position_ids, attention):
        b, s = tokens.shape
        target = torch.full((b, s), TOK.FIRST_BYTE_ID + ord("z"))  # never a symbol
        for row in range(b):
            at = tokens[row].tolist().index(ASSISTANT_ID)  # the logit at `at + j` predicts symbol j
            for j in range(self.k):
                right = int(tokens[row, at + 1 + j])
                target[row, at + j] = right + 1 if (int(tokens[row, at + 1]), j) in self.wrong else right
        return torch.nn.functional.one_hot(target, TOK.vocab_size).float() * 5.0


class _Uniform(torch.nn.Module):
    def forward(self, tokens, position_ids, attention):
        return torch.zeros(*tokens.shape, TOK.vocab_size)


def _eval_set(tmp_path, task, length=96, count=12):
    path = write_chats(tmp_path / "eval.jsonl", task, [length] * count, seed=3)
    chats = [json.loads(line) for line in path.read_text().splitlines()]
    return load_eval_samples(path, length), chats


@pytest.mark.parametrize("rows_per_batch", [1, 5])
def test_accuracy_equals_an_independent_count(tmp_path, rows_per_batch):
    task = DemoTaskConfig(num_symbols=3)
    samples, chats = _eval_set(tmp_path, task)
    first = [TOK.FIRST_BYTE_ID + ord(c["answer"][0]) for c in chats]
    distinct = sorted(set(first))
    assert len(distinct) >= 4
    # Answers starting with an even-ranked symbol get one wrong token; one odd-ranked gets two.
    wrong = {(f, i % 3) for i, f in enumerate(distinct) if i % 2 == 0} | {(distinct[1], 1), (distinct[1], 2)}
    # Independent count in character space.
    marks = [[(f, j) in wrong for j in range(3)] for f in first]
    expected_exact = sum(not any(m) for m in marks) / len(chats)
    expected_tokens = sum(3 - sum(m) for m in marks) / (3 * len(chats))
    assert 0 < expected_exact < 1
    result = evaluate(_Oracle(wrong, 3), samples, rows_per_batch=rows_per_batch)
    assert result["answers"] == len(chats)
    assert result["accuracy"] == pytest.approx(expected_exact)
    assert result["token_accuracy"] == pytest.approx(expected_tokens)
    perfect = evaluate(_Oracle(set(), 3), samples, rows_per_batch=rows_per_batch)
    assert perfect["accuracy"] == perfect["token_accuracy"] == 1.0


def test_uniform_model_has_loss_log_vocab_and_the_baseline_is_counted_by_hand(tmp_path):
    task = DemoTaskConfig(num_symbols=1)  # the baseline is right when the symbol is "!"
    samples, chats = _eval_set(tmp_path, task, count=40)
    result = evaluate(_Uniform(), samples, rows_per_batch=7)
    assert result["response_loss"] == pytest.approx(math.log(TOK.vocab_size), rel=1e-6)
    assert result["accuracy"] == 0.0  # argmax of equal logits is id 0 (padding), never a symbol
    hand = [baseline_by_hand(c["answer"]) for c in chats]
    assert 0 < sum(map(all, hand)) < len(chats)
    assert result["baseline_accuracy"] == pytest.approx(sum(map(all, hand)) / len(chats))


def test_evaluate_refuses_samples_without_an_answer():
    class NoAnswers:
        def __len__(self):
            return 1

        def sample(self, i):
            return torch.arange(8, 16), torch.zeros(8, dtype=torch.uint8)

    with pytest.raises(ValueError, match="no answer"):
        evaluate(_Uniform(), NoAnswers())


def test_probe_batch_is_the_first_samples_under_the_focusft_mask(tmp_path):
    samples, _ = _eval_set(tmp_path, DemoTaskConfig(num_symbols=3), count=3)
    batch = probe_batch(samples, 2)
    assert batch.tokens.shape == (2, 96)
    assert torch.equal(batch.tokens[1], samples.sample(1)[0].long())
    assert probe_batch(samples, 10).tokens.shape == (3, 96)  # at most every sample
