"""The synthetic source: deterministic, two levels of gold boundaries, every boundary a candidate,
and boundaries that delimiters alone do not reveal."""

from __future__ import annotations

import pytest

from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.segment.baselines import DelimiterSegmenter, delimiter_chunks
from megatron_focusft.segment.candidates import candidate_cuts
from megatron_focusft.segment.corpus import check_document
from megatron_focusft.segment.evaluate import score_documents
from megatron_focusft.segment.synthetic import SyntheticConfig, synthetic_documents


@pytest.fixture(scope="module")
def documents():
    return synthetic_documents(SyntheticConfig(documents=60, seed=3))


def test_deterministic_and_seeded(documents):
    assert synthetic_documents(SyntheticConfig(documents=60, seed=3)) == documents
    assert synthetic_documents(SyntheticConfig(documents=60, seed=4)) != documents


def test_gold_boundaries_are_valid_candidates_with_two_levels(documents):
    for d in documents:
        assert check_document(d.text, list(d.boundaries), list(d.levels)) is None
        assert set(d.boundaries) <= set(candidate_cuts(d.text).tolist())
        assert set(d.levels) <= {1, 2} and set(d.at_level(1)) <= set(d.at_level(2))
        assert d.text[d.boundaries[0] - 1] == "\n"
    sections = [len(d.at_level(1)) + 1 for d in documents]
    passages = [len(d.at_level(2)) + 1 for d in documents]
    assert min(sections) >= 3 and max(sections) <= 5
    assert all(p >= s for p, s in zip(passages, sections)) and sum(passages) > 1.5 * sum(sections)


def test_delimiters_do_not_reveal_the_boundaries(documents):
    joined_by_newline = sum(d.text[b - 2] != "\n" for d in documents for b in d.boundaries)
    blank_lines = sum(len(delimiter_chunks(d.text)) for d in documents)
    gold = sum(len(d.boundaries) for d in documents)
    assert joined_by_newline > 0.15 * gold  # a blank line does not mark every boundary ...
    assert blank_lines > 1.4 * gold  # ... and most blank lines are no boundary
    predicted = DelimiterSegmenter().segment([d.text for d in documents])
    assert score_documents(documents, predicted, ByteChatTokenizer(), level=2).f1 < 0.65


def test_bad_configs():
    with pytest.raises(ValueError, match="passages"):
        SyntheticConfig(passages=(1, 6))
    with pytest.raises(ValueError, match="sections"):
        SyntheticConfig(sections=(2, 1))
    with pytest.raises(ValueError, match="probability"):
        SyntheticConfig(newline_join=1.5)
