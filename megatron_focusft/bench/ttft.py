"""`focusft bench ttft`: time to first token of a block prompt whose local blocks are cached
(generation/blocks.py: only the global block is prefilled, over the cached K/V) against a full
prefill of the same tokens (generation/decode.py, causal), same model.

A prompt of `total` tokens is `num_blocks` equal local blocks and a `global_tokens` question.
The cached case is timed after the blocks were encoded once (the reuse case); one token is
generated in both. CPU gives ratios; absolute times only mean something on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from megatron_focusft.runtime import device_name, median_ms


@dataclass(frozen=True)
class TtftBenchConfig:
    preset: str = "tiny"
    seq_lengths: tuple[int, ...] = (1024, 2048, 4096)
    num_blocks: int = 8
    global_tokens: int = 64
    attention_backend: str = "sdpa"
    iters: int = 3
    warmup: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.global_tokens < 1 or self.iters < 1:
            raise ValueError("num_blocks, global_tokens and iters must be >= 1")
        short = [n for n in self.seq_lengths if n < self.global_tokens + self.num_blocks]
        if not self.seq_lengths or short:
            raise ValueError(f"seq_lengths {short or '()'} leave no room for {self.num_blocks} blocks and "
                             f"{self.global_tokens} global tokens")


def run_bench_ttft(config: TtftBenchConfig, as_json: bool = False) -> list[dict[str, Any]]:
    """Needs Megatron's parallel state (megatron_session)."""
    from megatron_focusft.engine.setup import ModelSetup, build_gpt
    from megatron_focusft.generation.blocks import BlockKVCache, BlockPrompt, generate_with_blocks
    from megatron_focusft.generation.decode import GenerationConfig, Prompt, generate

    model, _ = build_gpt(ModelSetup(preset=config.preset, attention_backend=config.attention_backend))
    model.eval()
    device = next(model.parameters()).device
    vocab = model.vocab_size
    one_token = GenerationConfig(max_new_tokens=1)
    rows = []
    for total in config.seq_lengths:
        g = torch.Generator().manual_seed(config.seed)
        block_len = (total - config.global_tokens) // config.num_blocks
        blocks = tuple(tuple(torch.randint(8, vocab, (block_len,), generator=g).tolist())
                       for _ in range(config.num_blocks))
        question = tuple(torch.randint(8, vocab, (config.global_tokens,), generator=g).tolist())
        prompt = BlockPrompt(blocks, question)
        cache = BlockKVCache()
        cached_ms = median_ms(lambda: generate_with_blocks(model, prompt, one_token, cache), config.iters,
                              config.warmup, device)
        full_ms = median_ms(lambda: generate(model, [Prompt.of_tokens(prompt.tokens())], one_token), config.iters,
                            config.warmup, device)
        row = {"preset": config.preset, "prompt_tokens": len(prompt.tokens()), "num_blocks": config.num_blocks,
               "global_tokens": config.global_tokens, "full_prefill_ms": full_ms, "cached_blocks_ms": cached_ms,
               "ttft_ratio": cached_ms / full_ms, "device": device_name(device)}
        rows.append(row)
        if as_json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['prompt_tokens']:>6} tokens: full prefill {full_ms:9.1f} ms | cached blocks {cached_ms:8.1f} ms "
                  f"| ratio {row['ttft_ratio']:.3f} ({row['device']})", flush=True)
    return rows
