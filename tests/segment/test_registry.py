"""The segmenter registry: every method by name, settings each accepts, identities for cache keys."""

from __future__ import annotations

import itertools

import pytest

from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.segment import SegmenterSettings, build_segmenter, segmenter_method, segmenter_names
from megatron_focusft.segment.registry import SegmenterMethod, register_segmenter

BYTES = ByteChatTokenizer()
TEXT = "A first paragraph about bees and honey.\n\nA second one, about trains and rails.\nIts last line."


def test_every_method_is_registered_once_and_builds_by_name():
    assert segmenter_names() == ("fixed", "delimiter", "texttiling", "learned")
    with pytest.raises(ValueError, match="registered already"):
        register_segmenter(segmenter_method("fixed"))
    with pytest.raises(ValueError, match=r"unknown segmenter 'nope'; expected one of \('fixed'"):
        build_segmenter("nope", SegmenterSettings(), BYTES)
    with pytest.raises(ValueError, match="unknown settings"):
        register_segmenter(SegmenterMethod("other", "x:y", frozenset({"speed"}), help=""))
    out = {name: build_segmenter(name, SegmenterSettings(max_block_tokens=30), BYTES).segment([TEXT])[0]
           for name in ("fixed", "texttiling")}
    assert out["fixed"] == [30, 60, 90]
    edges = [0, *out["texttiling"], len(TEXT)]
    assert max(b - a for a, b in itertools.pairwise(edges)) <= 30
    assert build_segmenter("delimiter", SegmenterSettings(), BYTES).segment([TEXT]) == [[41]]


def test_settings_a_method_does_not_take_are_errors():
    with pytest.raises(ValueError, match="method 'delimiter' does not take max_block_tokens"):
        build_segmenter("delimiter", SegmenterSettings(max_block_tokens=8), BYTES)
    with pytest.raises(ValueError, match="method 'fixed' does not take threshold, level; it takes max_block_tokens"):
        build_segmenter("fixed", SegmenterSettings(max_block_tokens=8, threshold=0.3, level=1), BYTES)
    with pytest.raises(ValueError, match="needs max_block_tokens"):
        build_segmenter("fixed", SegmenterSettings(), BYTES)
    with pytest.raises(ValueError, match="needs a model directory"):
        build_segmenter("learned", SegmenterSettings(), BYTES)


@pytest.mark.parametrize("budget", [0, -4])
def test_a_block_budget_below_one_token_is_an_error(budget: int):
    with pytest.raises(ValueError, match=f"at least one token, got max_block_tokens={budget}"):
        SegmenterSettings(max_block_tokens=budget)


def test_identities_differ_by_method_and_setting():
    identities = {build_segmenter("fixed", SegmenterSettings(max_block_tokens=n), BYTES).identity for n in (8, 9)}
    identities |= {build_segmenter("texttiling", SegmenterSettings(threshold=t), BYTES).identity for t in (None, 0.2)}
    identities.add(build_segmenter("delimiter", SegmenterSettings(), BYTES).identity)
    assert len(identities) == 5
    assert all(BYTES.identity in i for i in identities if not i.startswith("delimiter"))
