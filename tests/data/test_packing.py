"""Packing: first-fit against a plain implementation, no sample split, contiguous doc ids,
determinism by seed, the efficiency value, data-parallel micro-batches, and the batches' loss."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_focusft.data.chat import ChatDataConfig, ChatSamples, load_chat_samples
from megatron_focusft.data.packing import (
    PackingConfig,
    first_fit,
    micro_batches,
    pack_chats,
)
from megatron_focusft.data.tokenizer import ByteChatTokenizer
from tests.data.conftest import chat, write_jsonl
from tests.helpers.packing import epoch_micro_batches

PAD = 0


def plain_first_fit(lengths, capacity, order):
    bins, free = [], []
    for item in order:
        for i, room in enumerate(free):
            if room >= lengths[item]:
                bins[i].append(item)
                free[i] -= lengths[item]
                break
        else:
            bins.append([item])
            free.append(capacity - lengths[item])
    return bins


def random_samples(n: int, max_length: int, seed: int) -> ChatSamples:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        length = rng.randint(1, max_length)
        ids = [rng.randrange(1, 100) for _ in range(length)]
        flags = [int(rng.random() < 0.3) for _ in range(length)]
        pairs.append((ids, flags))
    return ChatSamples.from_lists(pairs, pad_id=PAD, vocab_size=100)


def test_first_fit_small_case() -> None:
    lengths = [5, 4, 3, 2, 1]
    assert first_fit(lengths, 6, [0, 1, 2, 3, 4]) == [[0, 4], [1, 3], [2]]
    assert first_fit(lengths, 6, [4, 3, 2, 1, 0]) == [[4, 3, 2], [1], [0]]
    assert first_fit([], 6, []) == []
    with pytest.raises(ValueError, match="outside"):
        first_fit([7], 6, [0])


def test_first_fit_matches_plain_implementation() -> None:
    rng = random.Random(0)
    for n in (1, 2, 7, 100, 333):
        lengths = [rng.randint(1, 50) for _ in range(n)]
        order = list(range(n))
        rng.shuffle(order)
        assert first_fit(lengths, 64, order) == plain_first_fit(lengths, 64, order)


def test_efficiency_hand_computed() -> None:
    samples = ChatSamples.from_lists([([1] * n, [1] * n) for n in (10, 6, 6, 4)], pad_id=PAD, vocab_size=8)
    packed = pack_chats(samples, PackingConfig(16, seed=3))
    # Decreasing: 10 -> row A, 6 -> A (full), 6 -> row B, 4 -> B: 26 tokens in 2 x 16 slots.
    assert sorted(sorted(samples.lengths[row].tolist()) for row in packed.rows) == [[4, 6], [6, 10]]
    assert packed.efficiency == pytest.approx(26 / 32)
    assert "efficiency 81.2%" in packed.describe()


@pytest.mark.parametrize("algorithm", ["first_fit_decreasing", "first_fit"])
def test_rows_hold_whole_samples(algorithm: str) -> None:
    samples = random_samples(120, 40, seed=1)
    config = PackingConfig(64, micro_batch_size=4, seed=7, algorithm=algorithm)
    packed = pack_chats(samples, config)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(samples)))
    tokens, doc_ids, response = packed.row_tensors(range(packed.num_rows))
    for r, row in enumerate(packed.rows):
        pos = 0
        for doc, index in enumerate(row):
            ids, flags = samples.sample(index)
            n = ids.numel()
            assert torch.equal(tokens[r, pos:pos + n], ids.long())
            assert torch.equal(response[r, pos:pos + n], flags.long())
            assert (doc_ids[r, pos:pos + n] == doc).all()
            pos += n
        assert (doc_ids[r, pos:] == -1).all() and (tokens[r, pos:] == PAD).all() and (response[r, pos:] == 0).all()
    used = int((doc_ids >= 0).sum())
    assert used == packed.num_tokens and packed.efficiency == pytest.approx(used / doc_ids.numel())


def test_deterministic_by_seed_and_epoch() -> None:
    samples = random_samples(80, 30, seed=2)
    config = PackingConfig(48, seed=11)
    assert pack_chats(samples, config).rows == pack_chats(samples, config).rows
    assert pack_chats(samples, config, epoch=1).rows != pack_chats(samples, config).rows
    assert pack_chats(samples, PackingConfig(48, seed=12)).rows != pack_chats(samples, config).rows


def test_first_fit_decreasing_is_denser() -> None:
    samples = random_samples(200, 50, seed=3)
    ffd = pack_chats(samples, PackingConfig(64, seed=0)).efficiency
    ff = pack_chats(samples, PackingConfig(64, seed=0, algorithm="first_fit")).efficiency
    assert ffd >= ff and ffd > 0.9


def test_micro_batches_split_ranks_and_drop_nothing() -> None:
    samples = random_samples(50, 30, seed=4)
    config = PackingConfig(40, micro_batch_size=3, seed=5)
    packed = pack_chats(samples, config)
    per_rank = [list(micro_batches(packed, config, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == -(-packed.num_rows // 6)
    all_tokens, _, _ = packed.row_tensors(range(packed.num_rows))
    seen = []
    for step in range(len(per_rank[0])):
        for rank in range(2):
            batch = per_rank[rank][step]
            assert batch.tokens.shape == (3, 40)
            for row in range(3):
                global_row = step * 6 + rank * 3 + row
                if global_row < packed.num_rows:
                    assert torch.equal(batch.tokens[row], all_tokens[global_row])
                    seen.append(global_row)
                else:  # filler row: all padding, nothing scored
                    assert (batch.doc_ids[row] == -1).all() and batch.loss_mask[row].sum() == 0
    assert seen == list(range(packed.num_rows))


def test_batches_score_response_tokens_of_the_same_document() -> None:
    tok = ByteChatTokenizer()
    samples = ChatSamples.from_lists([([1, 4, 50, 2, 5, 60, 2], [0, 0, 0, 0, 0, 1, 1]),
                                      ([1, 4, 51, 2, 5, 61, 2], [0, 0, 0, 0, 0, 1, 1])],
                                     pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    config = PackingConfig(16, seed=0)
    (batch,) = list(micro_batches(pack_chats(samples, config), config))
    # Two documents of 7 tokens, 2 padding tokens; logits at t = 4, 5 (and 11, 12) are scored.
    assert batch.doc_ids.tolist() == [[0] * 7 + [1] * 7 + [-1] * 2]
    assert batch.loss_mask.nonzero()[:, 1].tolist() == [4, 5, 11, 12]
    assert torch.equal(batch.response, batch.response.new_tensor([[0, 0, 0, 0, 0, 1, 1] * 2 + [0, 0]]))


def test_end_to_end_from_file(tmp_path) -> None:
    rows = [chat(("user", "q" * (i % 7)), ("assistant", "a" * (1 + i % 5))) for i in range(30)]
    samples = load_chat_samples(ChatDataConfig(write_jsonl(tmp_path / "d.jsonl", rows), 64), ByteChatTokenizer(),
                                log=None)
    config = PackingConfig(64, micro_batch_size=2, seed=0)
    stream = epoch_micro_batches(samples, config)
    epochs = {}
    for _ in range(12):
        epoch, batch = next(stream)
        epochs.setdefault(epoch, 0)
        epochs[epoch] += int(batch.loss_mask.sum())
    # Every response token is scored once per epoch (none is the first token of its sample).
    assert len(epochs) >= 2 and epochs[0] == int(samples.response.sum())


def test_rejects_samples_longer_than_rows() -> None:
    samples = ChatSamples.from_lists([([1] * 10, [1] * 10)], pad_id=PAD, vocab_size=8)
    with pytest.raises(ValueError, match="longer than seq_length 8.*row 1 \\(10 tokens\\)"):
        pack_chats(samples, PackingConfig(8))
    with pytest.raises(ValueError, match="mask_kind 'block' needs samples with block ids"):
        pack_chats(ChatSamples.from_lists([([1] * 4, [1] * 4)], pad_id=PAD, vocab_size=8),
                   PackingConfig(8, mask_kind="block"))
