"""`focusft bench step`: a FocuSFT training step against a plain SFT step, same model and batch.

Both are full optimizer steps through Megatron's schedule (forward, backward, grad reduction,
optimizer). The SFT step uses the same model with its fast-weight linears unbound, i.e. the
plain base layers, under the same FocuSFT mask. Two SFT baselines are timed: Megatron's
standard forward (logits at every position: `ratio`), and one whose LM head runs on the scored
positions only, as the FocuSFT step's does (`ratio_vs_scored_head_sft`, the method's own cost).
On a GPU each step's peak allocated memory is recorded too; `recompute_num_layers` > 0 turns on
full activation recomputation (uniform groups of that many layers) for every step.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch
from megatron_focusft.data.synthetic import benchmark_layout
from megatron_focusft.engine.loss import masked_token_loss
from megatron_focusft.engine.split_model import embed, forward_layers, lm_head_loss
from megatron_focusft.engine.train_step import ForwardStep
from megatron_focusft.runtime import device_name, median_ms


@dataclass(frozen=True)
class StepBenchConfig:
    preset: str = "tiny"
    seq_lengths: tuple[int, ...] = (1024,)
    micro_batch_size: int = 1
    attention_backend: str = "sdpa"
    inner_steps: int = 2
    bf16: bool = False
    recompute_num_layers: int = 0  # 0: no activation recomputation
    iters: int = 5
    warmup: int = 2
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.recompute_num_layers < 0:
            raise ValueError(f"recompute_num_layers must be >= 0, got {self.recompute_num_layers}")
        if not self.seq_lengths or min(self.seq_lengths) < 16:
            raise ValueError(f"seq_lengths must be >= 16, got {self.seq_lengths}")


def _batch(seq_length: int, micro_batch_size: int, vocab_size: int, device: torch.device, seed: int) -> SegmentBatch:
    layout = benchmark_layout("focusft", seq_length, micro_batch_size)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length), generator=g)
    batch = make_batch(tokens, layout["doc_ids"], layout["loss_mask"], mask_kind="focusft")
    return batch if device.type == "cpu" else batch.to(device)


class _ScoredHeadSftStep(ForwardStep):
    """SFT forward step whose LM head runs on loss positions only (same loss as the standard one)."""

    def __call__(self, data_iterator, model):
        batch = next(data_iterator)
        gpt = model.module
        hidden, rotary = embed(gpt, batch.tokens, batch.position_ids)
        hidden = forward_layers(gpt, hidden, batch.attention, rotary, range(len(gpt.decoder.layers)))
        loss = lm_head_loss(gpt, hidden, batch.labels, batch.loss_mask.bool())
        return loss, functools.partial(masked_token_loss, loss_mask=batch.loss_mask)


def run_bench_step(config: StepBenchConfig, as_json: bool) -> list[dict[str, Any]]:
    """One JSON-able record per sequence length; parallel state must be initialised."""
    from megatron_focusft.engine.setup import ModelSetup, OptimizerSetup, build_model, build_optimizer
    from megatron_focusft.engine.train_step import train_step
    from megatron_focusft.fastweights.config import FastWeightConfig
    from megatron_focusft.fastweights.linear import fast_weight_layout
    from megatron_focusft.focusft import FocusftConfig, SeededFastWeights, make_focusft_forward_step
    from megatron_focusft.models.presets import get_preset
    from megatron_focusft.sft import sft_forward_step

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(config.seed)
    fast = FastWeightConfig()
    recompute = config.recompute_num_layers
    model, model_config = build_model(ModelSetup(
        preset=config.preset, attention_backend=config.attention_backend, bf16=config.bf16, fast_weights=fast,
        recompute_granularity="full" if recompute else None, recompute_method="uniform" if recompute else None,
        recompute_num_layers=recompute or None))
    optimizer = build_optimizer(model, OptimizerSetup(), bf16=config.bf16)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    focusft = FocusftConfig(inner_steps=config.inner_steps, fast_weights=fast)
    fast_weights = SeededFastWeights(fast_weight_layout(model_config, fast), fast.rank, config.seed, dtype=dtype)
    focusft_step = make_focusft_forward_step(focusft, fast_weights)
    records = []
    for seq_length in config.seq_lengths:
        batch = _batch(seq_length, config.micro_batch_size, get_preset(config.preset).vocab_size, device, config.seed)
        sft_ms, sft_gib = _timed(lambda: train_step(model, optimizer, [batch], sft_forward_step), config, device)
        scored_ms, scored_gib = _timed(lambda: train_step(model, optimizer, [batch], forward_step=_ScoredHeadSftStep()),
                                       config, device)
        focusft_ms, focusft_gib = _timed(lambda: train_step(model, optimizer, [batch], forward_step=focusft_step),
                                         config, device)
        record = {
            "model": config.preset, "seq_length": seq_length, "micro_batch_size": config.micro_batch_size,
            "attention_backend": config.attention_backend, "dtype": "bf16" if config.bf16 else "fp32",
            "inner_steps": config.inner_steps, "layer_fraction": fast.layer_fraction,
            "adapted_layers": len(fast_weight_layout(model_config, fast)) // 3,
            "sft_step_s": sft_ms / 1e3, "focusft_step_s": focusft_ms / 1e3, "ratio": focusft_ms / sft_ms,
            "scored_head_sft_step_s": scored_ms / 1e3, "ratio_vs_scored_head_sft": focusft_ms / scored_ms,
            "focusft_tokens_per_s": config.micro_batch_size * seq_length / (focusft_ms / 1e3),
            "recompute_num_layers": recompute, "sft_peak_gib": sft_gib, "scored_head_sft_peak_gib": scored_gib,
            "focusft_peak_gib": focusft_gib,
            "device": device_name(device), "torch": torch.__version__, "iters": config.iters,
        }
        records.append(record)
        if as_json:
            print(json.dumps(record), flush=True)
        else:
            print(f"{config.preset} s={seq_length}: sft {record['sft_step_s']:.3f} s, focusft "
                  f"{record['focusft_step_s']:.3f} s, ratio {record['ratio']:.2f}x (vs scored-head SFT "
                  f"{record['ratio_vs_scored_head_sft']:.2f}x), {record['focusft_tokens_per_s']:,.0f} tok/s"
                  f"{'' if focusft_gib is None else f', peak {focusft_gib:.1f} GiB'} ({record['device']})", flush=True)
    return records


def _timed(step, config: StepBenchConfig, device: torch.device) -> tuple[float, float | None]:
    """(median ms of `step`, peak GiB allocated during its runs on a GPU, else None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, config.iters, config.warmup, device)
    return ms, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
