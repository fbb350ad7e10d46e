"""Block sink tokens: k learned embeddings that open every local block under block attention.

The data reserves k sink slots at the start of each local block (blockattn/sample_forms.py);
the mask keeps them private to their block (`SegmentMask.private`). The model writes its sink
embeddings into those slots after the word embedding, so slot j of every block holds the same
learned vector `weight[j]`. They live on the first pipeline stage, next to the embedding
(`GPTModel.block_sinks`), are saved with the model and exported beside the HF weights.

Gradients: under TP without SP every rank holds the same hidden states, so the gradients agree;
under SP each rank holds a sequence shard, so the weight is marked `sequence_parallel` and
Megatron's finalize_model_grads sums its gradient over the TP group, as for the norms.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

ATTRIBUTE = "block_sinks"
STATE_PREFIX = f"{ATTRIBUTE}."
SEED_OFFSET = 7_777


class BlockSinks(torch.nn.Module):
    """weight [k, h]: the sink embeddings, one per slot."""

    def __init__(self, num_tokens: int, hidden_size: int, init_std: float, sequence_parallel: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"block sinks need at least one token, got {num_tokens}")
        # Drawn from a generator of their own (seeded by the run's torch seed), so the values do
        # not depend on how many layers this pipeline stage built before them.
        generator = torch.Generator().manual_seed(torch.initial_seed() + SEED_OFFSET)
        values = torch.randn(num_tokens, hidden_size, generator=generator) * init_std
        self.weight = torch.nn.Parameter(values.to(dtype))
        self.weight.sequence_parallel = sequence_parallel

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] with slots [s, b] long (the sink slot of each position, -1 = none):
        the hidden states with each sink position replaced by its slot's embedding."""
        if slots.shape != hidden.shape[:2]:
            raise ValueError(f"sink slots {tuple(slots.shape)} do not match hidden states {tuple(hidden.shape)}")
        if slots.numel() and int(slots.max()) >= self.num_tokens:
            raise ValueError(f"a block has more sink slots than the model's {self.num_tokens} sink tokens")
        is_sink = (slots >= 0).unsqueeze(-1)
        sinks = self.weight.to(hidden.dtype)[slots.clamp(min=0)]
        # where() keeps the strides of the embedding's transposed output; the residual stream
        # inherits them, and a pipeline stage can only send a contiguous tensor.
        return torch.where(is_sink, sinks, hidden).contiguous()


def add_block_sinks(model: GPTModel, num_tokens: int) -> None:
    """Give a first-stage GPTModel its sink embeddings (no-op for 0 tokens or a later stage)."""
    if num_tokens == 0 or not model.pre_process:
        return
    config = model.config
    setattr(model, ATTRIBUTE, BlockSinks(num_tokens, config.hidden_size, config.init_method_std,
                                         config.sequence_parallel, config.params_dtype))


def block_sinks_of(model: torch.nn.Module) -> BlockSinks | None:
    gpt = model.module if hasattr(model, "module") else model
    return getattr(gpt, ATTRIBUTE, None)


def sink_slots(private: torch.Tensor) -> torch.Tensor:
    """Slot index [b, s] long of each sink position (0.. inside each run of sinks), -1 elsewhere,
    from the sink flags [b, s] (runs of sinks open the blocks, so slot j is the run's j-th)."""
    b, s = private.shape
    pos = torch.arange(s, device=private.device).expand(b, s)
    last_other = torch.where(private, torch.full_like(pos, -1), pos).cummax(dim=1).values
    return torch.where(private, pos - last_other - 1, torch.full_like(pos, -1))
