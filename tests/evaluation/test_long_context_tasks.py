"""The long-context task generators, the readers of official files and the scoring rules."""

from __future__ import annotations

import collections
import json
import re

import pytest

from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.evaluation.long_context_tasks import TASKS, generate_samples
from megatron_focusft.evaluation.samples import SampleFileError, read_babilong_jsonl, read_ruler_jsonl
from megatron_focusft.evaluation.scoring import mean_interval, score

TOKENIZER = ByteChatTokenizer()


def count(text: str) -> int:
    return len(TOKENIZER.encode(text))


@pytest.mark.parametrize("task", sorted(name for name, spec in TASKS.items() if spec.family != "rag"))
def test_samples_fit_their_length_and_hold_their_answers(task):  # block tasks: tests/evaluation/test_rag_eval.py
    for length in (1200, 2400):
        samples = generate_samples(task, length, 3, count, seed=4)
        for sample in samples:
            tokens = count(sample.prompt)
            # The largest haystack that fits: one more filler unit (<= ~120 bytes here) would not.
            assert length - 250 < tokens <= length, (task, length, tokens)
            for reference in sample.references:
                assert reference in sample.prompt, (task, reference)
        assert generate_samples(task, length, 3, count, seed=4) == samples  # reproducible
        assert [s.prompt for s in generate_samples(task, length, 3, count, seed=5)] != [s.prompt for s in samples]
        assert len({s.prompt for s in samples}) == 3


def test_extraction_answers_are_the_true_counts():
    for sample in generate_samples("cwe", 3000, 2, count) + generate_samples("fwe", 3000, 2, count):
        body = sample.prompt.split("\n\n")[1]
        ranked = collections.Counter(re.findall(r"[a-z]+", body)).most_common()
        k = len(sample.references)
        assert {w for w, _ in ranked[:k]} == set(sample.references)
        assert ranked[k - 1][1] > ranked[k][1]  # no tie at the cut


def test_variable_tracking_chain_resolves():
    sample = generate_samples("vt", 1500, 1, count)[0]
    value = re.search(r"assigned the value (\d+)", sample.prompt).group(1)
    assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample.prompt))
    resolve = lambda v: v if v.isdigit() else resolve(assignments[v.removeprefix("VAR ")])  # noqa: E731
    assert sorted(n for n, v in assignments.items() if resolve(v) == value) == sorted(sample.references)


def test_too_short_a_length_is_an_error():
    with pytest.raises(ValueError, match="even the shortest prompt"):
        generate_samples("cwe", 50, 1, count)
    with pytest.raises(ValueError, match="unknown task"):
        generate_samples("niah", 500, 1, count)


@pytest.mark.parametrize("metric, prediction, references, expected", [
    ("all", "The codes are 123 and 456.", ("123", "456"), 1.0),
    ("all", "only 123", ("123", "456", "789"), 1 / 3),
    ("all", "ABC", ("abc",), 1.0),
    ("part", "It is Lisbon, or maybe Oslo", ("Oslo", "Riga"), 1.0),
    ("part", "no idea", ("Oslo",), 0.0),
    ("babilong", "Kitchen.\nThe hallway is wrong", ("kitchen",), 1.0),
    ("babilong", "I think\nkitchen", ("kitchen",), 0.0),
])
def test_scoring_rules(metric, prediction, references, expected):
    assert score(metric, prediction, references) == pytest.approx(expected)


def test_bootstrap_interval():
    mean, low, high = mean_interval([0.0] * 50 + [1.0] * 50)
    assert mean == 0.5 and 0.38 < low < 0.45 and 0.55 < high < 0.62  # +-1.96 * 0.05
    assert mean_interval([1.0]) == (1.0, 1.0, 1.0)


def test_readers_of_official_files(tmp_path):
    ruler = tmp_path / "4096" / "niah_single_1" / "validation.jsonl"
    ruler.parent.mkdir(parents=True)
    ruler.write_text(json.dumps({"index": 3, "input": "text ... what is it?", "outputs": ["42"], "length": 4096,
                                 "answer_prefix": " The answer is"}) + "\n")
    (sample,) = read_ruler_jsonl(ruler)
    assert (sample.task, sample.length, sample.index, sample.references, sample.answer_prefix) == \
        ("niah_single_1", 4096, 3, ("42",), " The answer is")
    babilong = tmp_path / "qa1.jsonl"
    babilong.write_text(json.dumps({"input": "Mary went to the kitchen.", "question": "Where is Mary?",
                                    "target": "kitchen"}) + "\n" + json.dumps({"input": "x", "target": "y"}) + "\n")
    with pytest.raises(SampleFileError, match=r"qa1.jsonl:2: missing field 'question'"):
        read_babilong_jsonl(babilong, "qa1", 1000)
