"""Block-attention sample forms: the reference's chat rules on hand-worked chats, the RAG layout
with sink slots, and block samples through the cache and packing (mask = the dense reference of
each sample alone)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_focusft.blockattn.sample_forms import BlockFormConfig, BlockSampleForms, with_sinks
from megatron_focusft.data.chat import ChatDataConfig, ChatRow, load_chat_samples
from megatron_focusft.data.packing import PackingConfig, micro_batches, pack_chats
from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.masks import dense_mask
from megatron_focusft.segment.registry import SegmenterSettings, build_segmenter

TOKENIZER = ByteChatTokenizer()


def forms(config: BlockFormConfig = BlockFormConfig(), segmenter: str = "delimiter", **settings) -> BlockSampleForms:
    return BlockSampleForms(config, build_segmenter(segmenter, SegmenterSettings(**settings), TOKENIZER), 4096)


def blocks_of(form) -> list[str]:
    """Each block's text, sinks written as '#'."""
    out: dict[int, list[int]] = {}
    for token, block, sink in zip(form.ids, form.block_ids, form.sink):
        out.setdefault(block, []).append(-1 if sink else token)
    return ["".join("#" if t < 0 else TOKENIZER.decode([t]) for t in ids) for ids in out.values()]


def test_single_turn_chat_splits_the_user_message_and_keeps_the_tokens() -> None:
    row = ChatRow([{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Doc one.\n\nDoc two.\n\nWhat is it?"},
                   {"role": "assistant", "content": "Two."}], None)
    full, block = forms()(row, TOKENIZER, "f:1")
    assert full.block_ids == [0] * len(full.ids) and not full.is_block_form
    assert block.ids == full.ids and block.response == full.response
    assert blocks_of(block) == ["<bos><system>Be brief.<end>", "<user>Doc one.\n\n", "Doc two.\n\n",
                                "What is it?<end><assistant>Two.<end>"]


def test_multi_turn_chat_global_block_is_the_last_user_message_and_only_the_final_reply_is_scored() -> None:
    row = ChatRow([{"role": "user", "content": "A\nB"}, {"role": "assistant", "content": "ok"},
                   {"role": "user", "content": "Q1\n\nQ2"}, {"role": "assistant", "content": "R"}], None)
    full, block = forms()(row, TOKENIZER, "f:1")
    assert blocks_of(block) == ["<bos><user>A\n", "B<end>", "<assistant>ok<end>", "<user>Q1\n\nQ2<end><assistant>R<end>"]
    scored = TOKENIZER.decode([t for t, r in zip(block.ids, block.response) if r])
    assert scored == "R<end>" and TOKENIZER.decode([t for t, r in zip(full.ids, full.response) if r]) == "ok<end>R<end>"


def test_many_messages_are_one_block_each_and_many_chunks_merge_below_fifteen() -> None:
    turns = [{"role": r, "content": f"m{i}\n\nx"} for i, r in enumerate(["user", "assistant"] * 6)]
    row = ChatRow([*turns, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None)
    _, block = forms()(row, TOKENIZER, "f:1")
    assert len(set(block.block_ids)) == 13  # 12 earlier messages + the global block, none split
    long = ChatRow([{"role": "user", "content": "\n\n".join(f"p{i}" for i in range(40)) + "\n\nq"},
                    {"role": "assistant", "content": "a"}], None)
    full, block = forms()(long, TOKENIZER, "f:1")
    assert len(set(block.block_ids)) == 14 and block.ids == full.ids


def test_chats_without_a_block_form_and_the_ratio() -> None:
    code = ChatRow([{"role": "user", "content": "x\n\n```py\npass\n```\n\ny"}, {"role": "assistant", "content": "a"}], None)
    one_chunk = ChatRow([{"role": "user", "content": "just one"}, {"role": "assistant", "content": "a"}], None)
    for row in (code, one_chunk):
        assert len(forms()(row, TOKENIZER, "f:1")) == 1
    row = ChatRow([{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}], None)
    kept = [len(forms(BlockFormConfig(block_ratio=0.3, seed=5))(row, TOKENIZER, f"f:{i}")) == 2 for i in range(400)]
    assert 0.22 < sum(kept) / len(kept) < 0.38  # binomial(400, 0.3): 4 standard deviations is 0.09
    only_block = forms(BlockFormConfig(full_form=False))(row, TOKENIZER, "f:1")
    assert len(only_block) == 1 and only_block[0].is_block_form


def test_rag_rows_one_block_per_passage_with_private_sink_slots() -> None:
    row = ChatRow([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}], None,
                  blocks=(tuple(TOKENIZER.encode("P1")), tuple(TOKENIZER.encode("P22"))))
    full, block = forms(BlockFormConfig(sink_tokens=2))(row, TOKENIZER, "f:1")
    assert blocks_of(block) == ["##P1", "##P22", "<bos><user>Q?<end><assistant>A<end>"]
    assert full.ids == [t for t, s in zip(block.ids, block.sink) if not s] and full.sink == [0] * len(full.ids)
    with pytest.raises(ValueError, match="must rise from 0"):
        with_sinks([1, 2, 3], [0, 0, 1], [0, 3], 0)


def test_block_samples_through_cache_and_packing(tmp_path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"d{i}\n\ne{i}\n\nq{i}"}, {"role": "assistant", "content": "r"}]}
            for i in range(5)]
    rows.append({"blocks": ["P one", "P two"], "messages": [{"role": "user", "content": "Q"},
                                                             {"role": "assistant", "content": "A"}]})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ChatDataConfig((str(path),), 256, cache_dir=str(tmp_path / "cache"))
    block_forms = forms(BlockFormConfig(sink_tokens=1))
    samples = load_chat_samples(config, TOKENIZER, log=None, forms=block_forms)
    assert len(samples) == 12 and samples.summary.block_forms == 6 and samples.summary.extra_forms == 6
    again = load_chat_samples(config, TOKENIZER, log=None, forms=block_forms)
    assert again.from_cache and torch.equal(again.block_ids, samples.block_ids) and torch.equal(again.sink, samples.sink)
    other = load_chat_samples(config, TOKENIZER, log=None, forms=forms(segmenter="fixed", max_block_tokens=3))
    assert not other.from_cache  # the segmenter's identity keys the cache
    packing = PackingConfig(seq_length=256, micro_batch_size=2, mask_kind="block")
    packed = pack_chats(samples, packing)
    seen = 0
    for batch_index, batch in enumerate(micro_batches(packed, packing)):
        dense = batch.attention.to_dense()
        for r in range(batch.tokens.shape[0]):
            row_index = batch_index * 2 + r
            if row_index >= packed.num_rows:
                continue
            pos = 0
            for index in packed.rows[row_index]:
                lo, hi = int(samples.offsets[index]), int(samples.offsets[index + 1])
                n = hi - lo
                alone = dense_mask("block", doc_ids=torch.zeros(1, n, dtype=torch.long),
                                   block_ids=samples.block_ids[lo:hi].long()[None],
                                   sink_mask=samples.sink[lo:hi].long()[None])[0]
                assert torch.equal(dense[r, pos:pos + n, pos:pos + n], alone)
                assert not dense[r, pos:pos + n, :pos].any()
                pos += n
                seen += 1
    assert seen == len(samples)


def test_bad_block_rows_name_the_row(tmp_path) -> None:
    from megatron_focusft.data.chat import BadSampleError

    def load(row: dict, seq_length: int = 256):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(row) + "\n")
        return load_chat_samples(ChatDataConfig((str(path),), seq_length), TOKENIZER, log=None,
                                 forms=forms(BlockFormConfig(sink_tokens=4)))

    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(BadSampleError, match="row 1: malformed: no 'messages' field"):
        load({"blocks": ["passage"]})  # no global block
    with pytest.raises(BadSampleError, match="row 1: malformed: block 2 must be a non-empty text"):
        load({"blocks": ["passage", ""], "messages": chat})
    with pytest.raises(BadSampleError, match="token id 999 is outside"):
        load({"blocks": [[999]], "messages": chat})
    # 2 x 8 block tokens + 7 of the chat fit 24 in full form; with 2 x 4 sink slots they do not.
    with pytest.raises(BadSampleError, match=r"row 1: too_long: 31 tokens in block form > seq_length 24"):
        load({"blocks": ["12345678", "abcdefgh"], "messages": chat}, seq_length=24)
