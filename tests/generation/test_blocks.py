"""Block-attention inference with KV reuse: the logits of a prompt assembled from cached blocks
equal a full forward of the same tokens under the block mask, at every decoding step, for
several layouts and RoPE variants (llama3 scaling included), also for a cached block reused at
another offset; greedy tokens equal; blocks beyond the cap fold into the global block.
Tolerance TOL as in test_decode.py (fp32, different operation orders)."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.generation.blocks import BlockKVCache, BlockPrompt, block_mask, generate_with_blocks
from megatron_focusft.generation.decode import GenerationConfig
from tests.generation.test_decode import STEPS, TOL, _hf_model
from tests.helpers.hf_models import VOCAB


def _full_logits(model, prompt: BlockPrompt, generated: list[int]) -> torch.Tensor:
    """[steps, vocab]: a full forward under the block mask (reply = global block) per step."""
    out = []
    for step in range(len(generated)):
        tokens = prompt.tokens() + generated[:step]
        ids = prompt.block_ids() + [len(prompt.blocks)] * step
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None], block_mask(ids, "cpu"))
        out.append(logits[0, -1].float())
    return torch.stack(out)


def _blocks(seed: int, lengths) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in lengths]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_assembled_prompt_equals_full_forward_under_the_block_mask(single_rank, tmp_path, family):
    _, model = _hf_model(tmp_path, family)
    cache = BlockKVCache()
    config = GenerationConfig(max_new_tokens=STEPS, keep_logits=True)
    a, b, c, question = _blocks(1, (9, 14, 5, 6))
    for layout in ((a, b, c), (b,), (c, a), ()):
        prompt = BlockPrompt(layout, question)
        result = generate_with_blocks(model, prompt, config, cache)
        torch.testing.assert_close(result.logits, _full_logits(model, prompt, result.token_ids), atol=TOL, rtol=0)
    # a, b and c were encoded once each; every later use (c and a at new offsets) was a hit.
    assert (cache.misses, cache.hits) == (3, 3)
    # Without the block mask (a causal full forward) the answer differs: blocks really are local.
    prompt = BlockPrompt((a, b), question)
    result = generate_with_blocks(model, prompt, config, cache)
    with torch.no_grad():
        causal = model(torch.tensor([prompt.tokens()]), torch.arange(len(prompt.tokens()))[None], None)[0, -1]
    assert (causal - result.logits[0]).abs().max() > 1e-2


def test_greedy_tokens_and_block_cap(single_rank, tmp_path):
    from megatron_focusft.generation.decode import Prompt, generate

    _, model = _hf_model(tmp_path)
    a, b, question = _blocks(2, (8, 8, 5))
    config = GenerationConfig(max_new_tokens=STEPS)
    # With no local blocks, block generation is plain causal generation of the global block.
    alone = generate_with_blocks(model, BlockPrompt((), a + b + question), config, BlockKVCache())
    plain = generate(model, [Prompt.of_tokens(a + b + question)], config)[0]
    assert alone.token_ids == plain.token_ids
    capped = BlockPrompt((a, b), question).folded(1)
    assert capped.blocks == (a,) and capped.global_block == b + question
    with pytest.raises(ValueError, match="non-empty global block"):
        BlockPrompt((a,), ())


def test_generate_cli_with_blocks(single_rank, tmp_path, capsys):
    import json

    from megatron_focusft.cli import main as cli_main
    from megatron_focusft.runtime import release_model_parallel

    _hf_model(tmp_path)
    release_model_parallel()
    a, b, question = _blocks(3, (7, 6, 4))
    rows = [{"blocks": [list(a), list(b)], "global": list(question)}, {"blocks": [list(b)], "global": list(question)},
            {"blocks": [list(b), list(a)], "global": list(question)}]
    path = tmp_path / "blocks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["generate", "--hf-path", str(tmp_path / "llama"), "--input", str(path), "--blocks",
                     "--max-new-tokens", "3", "--max-blocks", "1"]) == 0
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [r["prompt_tokens"] for r in out] == [17, 10, 17] and all(len(r["output_ids"]) == 3 for r in out)
    # --max-blocks 1 keeps the first block local; b is the first block of row 2 and a of row 3.
    assert "block cache: 1 hits, 2 blocks encoded" in captured.err
    path.write_text(json.dumps({"blocks": [[5]], "global": []}) + "\n")
    from megatron_focusft.generation.prompts import PromptError

    with pytest.raises(PromptError, match=r"blocks.jsonl:1 global block: expected a non-empty text"):
        cli_main(["generate", "--hf-path", str(tmp_path / "llama"), "--input", str(path), "--blocks"])


@pytest.mark.parametrize("lengths", [(7, 9), (38, 36, 40, 35, 37, 39, 36, 38)], ids=["two-blocks", "eight-long-blocks"])
def test_sink_tokens_are_private_to_their_block_and_reused_with_it(single_rank, tmp_path, lengths):
    """A model with 2 sink tokens: the assembled prompt (sinks + block per local block, cached,
    reused at another offset) equals a full forward whose embeddings hold the sink vectors at
    the sink slots, under the block mask with the sinks private; the sinks change the answer.
    Also with eight blocks of 35-40 tokens (a 320-token prompt with its sinks), the size of the
    block evidence's longer prompts (README), where the sink-trained models fall."""
    from megatron_focusft.models.block_sinks import add_block_sinks

    _, model = _hf_model(tmp_path)
    add_block_sinks(model, 2)
    with torch.no_grad():
        model.block_sinks.weight.normal_(generator=torch.Generator().manual_seed(4))
    cache = BlockKVCache()
    config = GenerationConfig(max_new_tokens=STEPS, keep_logits=True)
    *blocks, question = _blocks(5, (*lengths, 5))
    for layout in (tuple(blocks), tuple(reversed(blocks))):
        prompt = BlockPrompt(layout, question)
        result = generate_with_blocks(model, prompt, config, cache)
        expected = []
        for step in range(len(result.token_ids)):
            tokens = prompt.tokens(2) + result.token_ids[:step]
            ids = prompt.block_ids(2) + [len(layout)] * step
            flags = prompt.sink_flags(2) + [0] * step
            positions = torch.arange(len(tokens))[None]
            with torch.no_grad():
                hidden = model.embedding(input_ids=torch.tensor([tokens]), position_ids=positions).clone()
                slot = 0
                for p, flag in enumerate(flags):
                    slot = slot + 1 if flag and p > 0 and flags[p - 1] else 0
                    if flag:
                        hidden[p, 0] = model.block_sinks.weight[slot]
                logits = model(torch.tensor([tokens]), positions, block_mask(ids, "cpu", flags), decoder_input=hidden)
            expected.append(logits[0, -1].float())
        torch.testing.assert_close(result.logits, torch.stack(expected), atol=TOL, rtol=0)
    assert (cache.misses, cache.hits) == (len(blocks), len(blocks))
    with torch.no_grad():
        model.block_sinks.weight.zero_()
    zeroed = generate_with_blocks(model, BlockPrompt(tuple(reversed(blocks)), question), config, BlockKVCache())
    assert (zeroed.logits[0] - result.logits[0]).abs().max() > 1e-3  # the blocks' keys saw their sinks
