"""Megatron's weighted blend for chat data: the syntax, and each epoch's draw by weight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_focusft.data.blend import DataBlend
from megatron_focusft.data.chat import ChatDataConfig, load_chat_samples
from megatron_focusft.data.tokenizer import ByteChatTokenizer
from tests.data.conftest import chat, write_parquet


def test_parse_paths_or_weighted_pairs():
    assert DataBlend.parse(["a.jsonl", "b.parquet"]) == DataBlend(("a.jsonl", "b.parquet"))
    blend = DataBlend.parse(["0.5", "a.jsonl", "1.5", "b.parquet"])
    assert blend.paths == ("a.jsonl", "b.parquet") and blend.weights == (0.25, 0.75)
    for items, message in ((["0.5", "a.jsonl", "b.parquet"], "expected `WEIGHT PATH WEIGHT PATH ...`"),
                           (["a.jsonl", "0.5", "b.parquet"], "mixes paths and weights"),
                           (["0", "a.jsonl", "1", "b.parquet"], "must be positive numbers"),
                           (["-1", "a.jsonl"], "must be positive numbers")):
        with pytest.raises(ValueError, match=message):
            DataBlend.parse(items)


def _samples(tmp_path: Path, sizes: tuple[int, int]):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(chat(("user", f"a{i}"), ("assistant", "x"))) + "\n" for i in range(sizes[0])))
    b = write_parquet(tmp_path / "b.parquet", [chat(("user", f"b{i}"), ("assistant", "y")) for i in range(sizes[1])])
    return str(a), b, load_chat_samples(ChatDataConfig((str(a), b), 32), ByteChatTokenizer(), log=None)


def test_each_epoch_draws_by_weight_with_a_fixed_seed(tmp_path: Path):
    a, b, samples = _samples(tmp_path, (30, 10))
    blend = DataBlend.parse(["0.5", a, "0.5", b])
    groups = blend.sample_groups(samples)
    assert groups.tolist() == [0] * 30 + [1] * 10
    draw = blend.epoch_indices(groups, seed=3, epoch=0)
    # 40 draws, half from each: b's 10 samples each come twice, 20 of a's 30 come once.
    assert draw.size == 40 and (groups[draw] == 1).sum() == 20
    assert np.bincount(draw[groups[draw] == 1], minlength=40)[30:].tolist() == [2] * 10
    assert np.unique(draw[groups[draw] == 0]).size == 20
    assert np.array_equal(draw, blend.epoch_indices(groups, seed=3, epoch=0))  # same seed and epoch
    assert not np.array_equal(draw, blend.epoch_indices(groups, seed=3, epoch=1))
    assert DataBlend.parse([a, b]).epoch_indices(groups, seed=3, epoch=0) is None  # no weights: all, once


def test_a_weighted_path_without_usable_samples_is_an_error(tmp_path: Path):
    a, b, samples = _samples(tmp_path, (3, 2))
    with pytest.raises(ValueError, match="the blend's paths hold 3"):
        DataBlend.parse(["1", a, "1", b, "1", b]).sample_groups(samples)
