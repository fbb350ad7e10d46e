"""Candidates, token offsets, decoding to a budget, and the three baselines on small known inputs."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.segment.baselines import (
    DelimiterSegmenter,
    FixedSegmenter,
    TextTilingSegmenter,
    delimiter_chunks,
    depth_scores,
)
from megatron_focusft.segment.candidates import candidate_cuts, compile_separator
from megatron_focusft.segment.decode import decode, split_to_budget
from megatron_focusft.segment.tokens import chars_to_tokens, token_starts, tokens_to_chars

BYTES = ByteChatTokenizer()


def test_candidates_follow_each_separator_match():
    text = "a\nb\n\n\nc\n"
    assert candidate_cuts(text).tolist() == [0, 2, 6]  # <cut 0>, after "\n", after "\n\n\n"; none at the end
    assert candidate_cuts("no separator").tolist() == [0]
    assert candidate_cuts("x. y. z", r"\. ").tolist() == [0, 3, 6]
    with pytest.raises(ValueError, match="matches the empty string"):
        compile_separator(r"\n*")
    with pytest.raises(ValueError, match="bad separator"):
        compile_separator("(")


def test_byte_token_offsets_of_multibyte_text():
    text = "aé€b"  # 1 + 2 + 3 + 1 bytes
    starts = token_starts(BYTES, text)
    assert starts.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert len(starts) == len(BYTES.encode(text))
    assert chars_to_tokens(starts, [1, 2, 3]) == [1, 3, 6]
    assert tokens_to_chars(starts, [1, 2, 3, 6]) == [1, 2, 3]  # tokens inside "é" fall back to its start


def test_fixed_blocks_count_tokens():
    seg = FixedSegmenter(4, BYTES)
    assert seg.segment(["abcdefghij"]) == [[4, 8]]
    assert seg.segment(["abc"]) == [[]]
    # "€" is 3 byte tokens: a cut inside a character moves to its start (the "€" block has 3 tokens).
    assert FixedSegmenter(2, BYTES).segment(["a€b"]) == [[1, 2]]
    with pytest.raises(ValueError, match="at least one token"):
        FixedSegmenter(0, BYTES)


def test_delimiter_uses_only_the_first_delimiter_present():
    text = "one\ntwo\n\nthree---four"
    assert delimiter_chunks(text) == [9]  # the blank line wins; "\n" and "---" are not used
    assert delimiter_chunks("one---two") == [3, 6]  # a "---" run is a chunk of its own
    assert delimiter_chunks("a\n-----\nb") == [2, 7]
    assert delimiter_chunks("a===b\n\tc") == [1, 4]
    assert delimiter_chunks("a\n\tb\n\tc") == [1, 3, 4, 6]
    assert delimiter_chunks("line one\nline two") == [9]
    assert delimiter_chunks("plain text") == []


def test_delimiter_merges_the_shortest_adjacent_pair_until_few_enough():
    text = "\n\n".join(["a" * 10, "b", "c", "d" * 10])  # chunks of 12, 3, 3, 10 characters
    assert delimiter_chunks(text) == [12, 15, 18]
    assert DelimiterSegmenter(max_blocks=3).segment([text]) == [[12, 18]]  # "b" + "c" merged
    assert DelimiterSegmenter(max_blocks=2).segment([text]) == [[12]]  # then 6 + 10 < 12 + 6
    assert DelimiterSegmenter().segment([text]) == [[12, 15, 18]]
    many = "\n\n".join(str(i) for i in range(40))
    assert len(DelimiterSegmenter().segment([many])[0]) == 13  # fewer than 15 blocks: 14


def test_depth_scores_of_a_valley():
    curve = np.array([1.0, 0.8, 0.6, 0.1, 0.5, 0.7, 0.65, 0.7])
    depth = depth_scores(curve)
    assert depth[3] == pytest.approx((0.8 - 0.1) + (0.7 - 0.1))  # climbs to 0.8 left, 0.7 right
    assert depth[6] == pytest.approx(0.05 + 0.05)
    assert np.count_nonzero(depth) == 2 and depth[0] == 0


def test_texttiling_finds_a_topic_change_that_blank_lines_do_not_reveal():
    rng = random.Random(0)
    bees = "bee hive honey nectar pollen queen comb colony".split()
    rails = "train rail station platform carriage signal track freight".split()

    def paragraph(words):
        return " ".join(f"the {rng.choice(words)} and {rng.choice(words)} near {rng.choice(words)}." for _ in range(4))

    parts = [paragraph(bees) for _ in range(3)] + [paragraph(rails) for _ in range(3)]
    text = "\n\n".join(parts)
    change = sum(len(p) + 2 for p in parts[:3])
    assert TextTilingSegmenter(window_words=12).segment([text]) == [[change]]
    assert len(delimiter_chunks(text)) == 5  # the delimiter rules cut every paragraph


def test_decode_threshold_and_budget():
    text = "aaaa\nbbbb\ncccc\ndddddddddddd"
    cuts = candidate_cuts(text)
    assert cuts.tolist() == [0, 5, 10, 15]
    scores = np.array([1.0, 0.2, 0.9, 0.4])
    starts = token_starts(BYTES, text)
    assert decode(cuts, scores, 0.5, starts, None) == [10]
    assert decode(cuts, scores, 0.3, starts, None) == [10, 15]
    assert decode(cuts, scores, 0.95, starts, None) == []
    # Budget 10: [0, 10) is 10 tokens; [10, 27) splits at its best candidate 15, then [15, 27) is
    # 12 tokens without a candidate inside: fixed runs of 10.
    assert decode(cuts, scores, 0.5, starts, 10) == [10, 15, 25]


def test_budget_splitting_keeps_every_block_under_budget():
    rng = random.Random(3)
    for _ in range(50):
        text = "".join(rng.choice("ab \n") for _ in range(rng.randint(1, 200)))
        cuts, starts = candidate_cuts(text), token_starts(BYTES, text)
        scores = np.asarray([1.0] + [rng.random() for _ in cuts[1:]])
        budget = rng.randint(1, 40)
        out = split_to_budget([], cuts, scores, starts, budget)
        edges = [0, *out, len(text)]
        assert out == sorted(set(out)) and all(0 < b < len(text) for b in out)
        assert max(b - a for a, b in itertools.pairwise(edges)) <= budget
