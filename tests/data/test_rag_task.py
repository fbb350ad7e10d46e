"""The RAG-style block task (data/rag_task.py): seeded and deterministic; every sample's answer
in exactly one passage and nowhere else in the sample; sizes within the module's stated bound;
a shared pool reuses passages verbatim; `focusft data rag` writes the same rows; bad settings
are errors naming the flag."""

from __future__ import annotations

import json
import re

import pytest

from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.rag_task import (CODE_LENGTH, CODE_WORDS, ENTITIES, FILLER_SENTENCES, HEADER, RagTaskConfig,
                                            rag_samples)
from megatron_focusft.data.tokenizer import ByteChatTokenizer

TOKENIZER = ByteChatTokenizer()
FACT = re.compile(r"The code of the ([a-z ]+?) is (\d+)\.")
# The most byte tokens one more filler sentence adds to a passage: its bytes and the joining space.
S = max(len(TOKENIZER.encode(" " + s)) for s in FILLER_SENTENCES)


def count(text: str) -> int:
    return len(TOKENIZER.encode(text))


def size(sample) -> int:
    return sum(count(b) for b in sample.blocks) + count(sample.question)


@pytest.mark.parametrize("pool_size", [None, 12])
def test_the_answer_is_in_exactly_one_passage(pool_size):
    samples = rag_samples(RagTaskConfig(num_samples=20, passages=6, target_tokens=900, pool_size=pool_size, seed=3),
                          count)
    for sample in samples:
        assert sample.blocks[0] == HEADER and len(sample.blocks) == 7
        assert [i for i, block in enumerate(sample.blocks) if sample.answer in block] == [sample.answer_block]
        assert sample.answer not in sample.question
        facts = [FACT.findall(passage) for passage in sample.blocks[1:]]
        assert all(len(f) == 1 for f in facts), "one fact per passage"
        entities, values = zip(*(f[0] for f in facts))
        assert len(set(entities)) == len(values) == len(set(values)) == 6
        # Digits occur in the facts' values only, so no other number can pass for the answer.
        assert not any(re.search(r"\d", FACT.sub("", passage)) for passage in sample.blocks)
        entity, value = FACT.findall(sample.blocks[sample.answer_block])[0]
        assert value == sample.answer and len(value) == 6 and sample.question.endswith(f" the {entity}?")
        assert sample.messages() == [{"role": "user", "content": sample.question},
                                     {"role": "assistant", "content": sample.answer}]
    assert len({s.answer_block for s in samples}) > 2, "the answer moves between passages"


def test_seeded_and_deterministic():
    config = RagTaskConfig(num_samples=6, passages=4, target_tokens=700, seed=1)
    samples = rag_samples(config, count)
    assert rag_samples(config, count) == samples
    assert len({s.blocks for s in samples}) == 6
    other = rag_samples(RagTaskConfig(num_samples=6, passages=4, target_tokens=700, seed=2), count)
    assert all(a.blocks != b.blocks for a, b in zip(samples, other))
    # A sample depends on (seed, index) alone: a shorter run is a prefix of a longer one.
    assert rag_samples(RagTaskConfig(num_samples=3, passages=4, target_tokens=700, seed=1), count) == samples[:3]
    pooled = RagTaskConfig(num_samples=6, passages=4, target_tokens=700, pool_size=8, seed=1)
    assert rag_samples(pooled, count) == rag_samples(pooled, count)


@pytest.mark.parametrize("pool_size", [None, 16])
@pytest.mark.parametrize("target, passages", [(600, 4), (2500, 8)])
def test_sizes_are_within_the_stated_bound(target, passages, pool_size):
    samples = rag_samples(RagTaskConfig(num_samples=12, passages=passages, target_tokens=target,
                                        pool_size=pool_size), count)
    for sample in samples:
        asked = FACT.findall(sample.blocks[sample.answer_block])[0][0]
        # The largest question a pool can hold: this one with the longest entity name (byte tokens add up).
        largest_question = count(sample.question) - count(asked) + max(map(count, ENTITIES))
        slack = passages * (S + 1) + (0 if pool_size is None else largest_question - count(sample.question))
        assert target - slack < size(sample) <= target, (size(sample), target, slack)
        # One budget for every passage of a sample: each holds it to within one filler sentence.
        passage_sizes = [count(b) for b in sample.blocks[1:]]
        assert max(passage_sizes) - min(passage_sizes) < S


@pytest.mark.parametrize("pool_size", [None, 8])
def test_sentence_answers_repeat_the_fact_of_the_answer_passage(pool_size):
    config = RagTaskConfig(num_samples=8, passages=4, target_tokens=600, pool_size=pool_size, seed=5,
                           answer_form="sentence")
    for sample in rag_samples(config, count):
        (entity, code), = FACT.findall(sample.answer)
        assert sample.question == f"Repeat the sentence about the {entity}."
        assert sample.answer in sample.blocks[sample.answer_block]
        assert [i for i, block in enumerate(sample.blocks) if code in block] == [sample.answer_block]
        assert size(sample) <= 600
    with pytest.raises(ValueError, match="--answer-form must be one of"):
        RagTaskConfig(answer_form="essay")


@pytest.mark.parametrize("pool_size", [None, 12])
def test_label_answers_are_codes_of_words_each_once_in_the_sample_right_after_the_entity(pool_size):
    config = RagTaskConfig(num_samples=10, passages=6, target_tokens=700, pool_size=pool_size, seed=4,
                           answer_form="label")
    code_word = "(?:%s)" % "|".join(CODE_WORDS)
    label = re.compile(r"The ([a-z]+ [a-z]+ [a-z]+) (%s(?: %s){%d})\." % (code_word, code_word, CODE_LENGTH - 1))
    for sample in rag_samples(config, count):
        entity = sample.question.removeprefix("What is the code of the ").removesuffix("?")
        assert entity in ENTITIES and sample.answer.startswith(f"The {entity} ")
        assert [i for i, block in enumerate(sample.blocks) if sample.answer in block] == [sample.answer_block]
        words = re.findall(r"[a-z]+", " ".join(sample.blocks).lower())
        codes = [label.search(passage).group(2).split() for passage in sample.blocks[1:]]
        # Every code word of the sample occurs exactly once in its text, so the token after the
        # entity's last word and after each code word names the next answer token.
        assert all(words.count(word) == 1 for code in codes for word in code)
        assert size(sample) <= 700
    with pytest.raises(ValueError, match="--answer-form label: 13 codes of 4 distinct code words need 52"):
        RagTaskConfig(passages=13, answer_form="label")


def test_several_questions_ask_about_distinct_passages_in_turn():
    one = rag_samples(RagTaskConfig(num_samples=6, passages=5, target_tokens=500, seed=7), count)
    many = rag_samples(RagTaskConfig(num_samples=6, passages=5, target_tokens=500, seed=7, questions=3), count)
    for sample, single in zip(many, one):
        messages = sample.messages()
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        assert messages[-2:] == [{"role": "user", "content": sample.question},
                                 {"role": "assistant", "content": sample.answer}]
        asked = [FACT.search(next(b for b in sample.blocks if m["content"] in b)).group(1)
                 for m in messages[1::2]]
        assert len(set(asked)) == 3, "distinct passages"
        assert [m["content"] for m in messages[0::2]] == [f"What is the code of the {e}?" for e in asked]
        assert len(sample.blocks) == len(single.blocks) == 6 and size(sample) <= 500
    with pytest.raises(ValueError, match=r"--questions must be in \[1, --passages 5\]"):
        RagTaskConfig(passages=5, questions=6)


def test_distinct_words_share_no_word_within_a_sample():
    samples = rag_samples(RagTaskConfig(num_samples=20, passages=8, target_tokens=900, seed=2, distinct_words=True),
                          count)
    for sample in samples:
        entities = [FACT.findall(passage)[0][0] for passage in sample.blocks[1:]]
        words = [w for e in entities for w in e.split()]
        assert len(entities) == 8 and len(set(words)) == len(words) == 24
    with pytest.raises(ValueError, match="--distinct-words needs no --pool-size and at most 8 passages"):
        RagTaskConfig(passages=9, distinct_words=True)
    with pytest.raises(ValueError, match="--distinct-words needs no --pool-size"):
        RagTaskConfig(passages=4, pool_size=8, distinct_words=True)


def test_a_pool_reuses_passages_verbatim():
    samples = rag_samples(RagTaskConfig(num_samples=10, passages=4, target_tokens=800, pool_size=6, header=False),
                          count)
    texts = [b for s in samples for b in s.blocks]
    assert len(texts) == 40 and len(set(texts)) == 6  # no header: every block is a passage of the pool
    by_entity = {}
    for text in texts:
        by_entity.setdefault(FACT.findall(text)[0][0], set()).add(text)
    assert all(len(v) == 1 for v in by_entity.values()), "an entity's passage is one fixed text"


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match=r"leaves \d+ tokens per passage, too few: a passage.s fact alone needs \d+"):
        rag_samples(RagTaskConfig(passages=8, target_tokens=300), count)
    with pytest.raises(ValueError, match=r"--pool-size must be in \[--passages 8"):
        RagTaskConfig(passages=8, pool_size=4)
    with pytest.raises(ValueError, match="--num-samples must be >= 1"):
        RagTaskConfig(num_samples=0)


def test_data_rag_command(tmp_path, capsys):
    from tests.helpers.hf_models import save_tokenizer

    out = tmp_path / "rag.jsonl"
    assert cli_main(["data", "rag", "--output", str(out), "--num-samples", "4", "--passages", "3",
                     "--target-tokens", "500", "--pool-size", "5", "--seed", "2", "--no-header"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    config = RagTaskConfig(num_samples=4, passages=3, target_tokens=500, pool_size=5, header=False, seed=2)
    assert rows == [s.row() for s in rag_samples(config, count)]
    assert set(rows[0]) == {"blocks", "messages", "meta"} and len(rows[0]["blocks"]) == 3
    assert rows[1]["meta"] == {"index": 1, "answer_block": rows[1]["meta"]["answer_block"], "target_tokens": 500}
    # Sized in the tokens of the tokenizer given (a word-level one: one token per word here).
    save_tokenizer(tmp_path / "tok")
    assert cli_main(["data", "rag", "--output", str(out), "--num-samples", "3", "--passages", "4",
                     "--target-tokens", "120", "--tokenizer", str(tmp_path / "tok")]) == 0
    from megatron_focusft.data.tokenizer import load_chat_tokenizer

    words = load_chat_tokenizer(str(tmp_path / "tok"))
    for row in map(json.loads, out.read_text().splitlines()):
        tokens = sum(len(words.encode(b)) for b in row["blocks"]) + len(words.encode(row["messages"][0]["content"]))
        assert 60 < tokens <= 120 < sum(count(b) for b in row["blocks"])
    with pytest.raises(SystemExit) as exc:
        cli_main(["data", "rag", "--output", str(out), "--passages", "3", "--pool-size", "2"])
    assert exc.value.code == 2 and "--pool-size must be in [--passages 3" in capsys.readouterr().err
