"""The block-attention forward steps: block fine-tuning (cross-entropy under the batch's block
mask) and block distillation (KL to a frozen full-attention teacher).

Legend: ``b`` rows, ``S`` the micro-batch's global length, ``s`` this rank's tokens (S / cp
under context parallelism), ``s'`` this rank's sequence shard under SP (s / tp), ``V`` the
vocabulary, ``h`` hidden. `batch.attention` is global [b, S] (data/cp_split.py); per-token
facts of this rank are read from it at `batch.global_positions`.

Block distillation, per micro-batch (ours, block_attention.md):
1. `prepare` (before the schedule) applies block dropout to every micro-batch's mask (seeded,
   the same on every rank) and runs the teacher over all of them in Megatron's forward-only
   schedule (pipelined like the student), keeping its logits [s, b, V/tp] on the last stage;
2. the student runs under the block mask, its sink embeddings in the sink slots;
3. loss on the distilled tokens (those whose block sees its prefix: the global block, the
   response and promoted blocks; never a sink; only where the next token is in the same
   document): T^2 KL(teacher || student) at temperature T, times the token weights when
   enabled, plus `ce_weight` x the response cross-entropy; the token mean is over distilled
   tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_focusft.blockattn.distill_loss import divergence_token_weights, vocab_parallel_kl
from megatron_focusft.blockattn.dropout import promote_blocks
from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.engine.loss import masked_token_loss
from megatron_focusft.engine.split_model import forward_layers, lm_head_loss, output_logits, stage_input
from megatron_focusft.engine.train_step import ForwardStep, chunk_data_iterators
from megatron_focusft.masks import SegmentMask
from megatron_focusft.models.block_sinks import block_sinks_of, sink_slots
from megatron_focusft.parallel.context import ParallelContext


def _unwrap(model: torch.nn.Module) -> GPTModel:
    return model.module if hasattr(model, "module") else model


def local_rows(batch: SegmentBatch, tensor: torch.Tensor) -> torch.Tensor:
    """A global per-token tensor [b, S] at this rank's tokens: [b, s]."""
    return tensor[:, batch.global_positions]


def stage_hidden(gpt: GPTModel, batch: SegmentBatch, attention: SegmentMask) -> torch.Tensor:
    """This stage's layers over its input under `attention`, the sink embeddings written into
    the sink slots on the first stage: hidden [s', b, h] (pre final norm)."""
    hidden, rotary = stage_input(gpt, batch.tokens, batch.position_ids)
    sinks = block_sinks_of(gpt)
    if gpt.pre_process and sinks is not None:
        slots = local_rows(batch, sink_slots(attention.private)).t()  # [s, b]
        if gpt.config.sequence_parallel:
            rank = gpt.pg_collection.tp.rank()
            slots = slots[rank * hidden.shape[0]:(rank + 1) * hidden.shape[0]]
        hidden = sinks(hidden, slots)
    return forward_layers(gpt, hidden, attention, rotary, range(len(gpt.decoder.layers)))


def distilled_tokens(batch: SegmentBatch, attention: SegmentMask) -> torch.Tensor:
    """[b, s] bool: the positions whose next-token distributions are distilled (module doc)."""
    sees_prefix = local_rows(batch, attention.sees_prefix & ~attention.private)
    return sees_prefix & batch.next_in_document


def teacher_view(attention: SegmentMask) -> SegmentMask:
    """Full causal attention over each document with the sink slots hidden: every sink run is a
    block of its own whose keys are private, so no other token sees a sink."""
    padding = attention.doc_ids < 0
    changes = torch.ones_like(padding)
    changes[:, 1:] = ((attention.doc_ids[:, 1:] != attention.doc_ids[:, :-1])
                      | (attention.block_index[:, 1:] != attention.block_index[:, :-1])
                      | (attention.private[:, 1:] != attention.private[:, :-1]))
    block_index = (changes.long().cumsum(dim=1) - 1).masked_fill(padding, -1)
    return SegmentMask(doc_ids=attention.doc_ids, block_index=block_index, causal=~padding,
                       sees_prefix=~padding, private=attention.private)


class BlockSftForwardStep(ForwardStep):
    """Cross-entropy on response tokens under the batch's mask (full or block form), with sinks."""

    def __call__(self, data_iterator: Iterator[SegmentBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        gpt = _unwrap(model)
        hidden = stage_hidden(gpt, batch, batch.attention)
        per_token_loss = lm_head_loss(gpt, hidden, batch.labels) if gpt.post_process else hidden
        return per_token_loss, functools.partial(masked_token_loss, loss_mask=batch.loss_mask)


@dataclass(frozen=True)
class DistillConfig:
    """temperature T (> 0); ce_weight: weight of the response cross-entropy added to the KL;
    block_dropout: probability that a local block is promoted (sees its prefix, is distilled);
    token_weighting with weight_clip: weights from the teacher-student divergence; seed: of the
    dropout draws."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    block_dropout: float = 0.0
    token_weighting: bool = False
    weight_clip: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"--distill-temperature must be > 0, got {self.temperature}")
        if self.ce_weight < 0:
            raise ValueError(f"--distill-ce-weight must be >= 0, got {self.ce_weight}")
        if not 0 <= self.block_dropout <= 1:
            raise ValueError(f"--block-dropout must be in [0, 1], got {self.block_dropout}")
        if not self.weight_clip > 0:
            raise ValueError(f"--distill-weight-clip must be > 0, got {self.weight_clip}")


class BlockDistillForwardStep(ForwardStep):
    """Block distillation (module doc); `teacher`: this rank's frozen GPTModels, one per model
    chunk of the student (one without virtual pipeline stages)."""

    def __init__(self, config: DistillConfig, teacher: list[GPTModel]) -> None:
        self.config, self.teacher = config, teacher
        self.micro_batches_seen = 0
        self._teacher_logits: list[torch.Tensor] = []

    def prepare(self, model: torch.nn.Module, micro_batches: list[SegmentBatch]) -> None:
        for index, batch in enumerate(micro_batches):
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.micro_batches_seen + index)
            attention = promote_blocks(batch.attention, self.config.block_dropout, generator)
            micro_batches[index] = dataclasses.replace(batch, attention=attention)
        self.micro_batches_seen += len(micro_batches)
        self._teacher_logits = self._run_teacher(micro_batches)

    @torch.no_grad()
    def _run_teacher(self, micro_batches: list[SegmentBatch]) -> list[torch.Tensor]:
        kept: list[torch.Tensor] = []

        def teacher_step(data_iterator: Iterator[SegmentBatch], teacher: GPTModel):
            batch = next(data_iterator)
            hidden = stage_hidden(teacher, batch, teacher_view(batch.attention))
            if not teacher.post_process:
                return hidden, None
            kept.append(output_logits(teacher, teacher.decoder.final_layernorm(hidden)).float())
            zero = hidden.new_zeros(())
            return zero, lambda output: (output, torch.ones((), dtype=torch.int), {})

        b, s = micro_batches[0].tokens.shape[0], micro_batches[0].attention.shape[1]
        get_forward_backward_func()(forward_step_func=teacher_step,
                                    data_iterator=chunk_data_iterators(micro_batches, len(self.teacher)),
                                    model=self.teacher, num_microbatches=len(micro_batches), seq_length=s,
                                    micro_batch_size=b, forward_only=True)
        return kept

    def __call__(self, data_iterator: Iterator[SegmentBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        gpt = _unwrap(model)
        hidden = stage_hidden(gpt, batch, batch.attention)
        if not gpt.post_process:
            return hidden, None
        teacher_logits = self._teacher_logits.pop(0)
        student_logits = output_logits(gpt, gpt.decoder.final_layernorm(hidden))
        parallel = ParallelContext.of(gpt)
        kl = vocab_parallel_kl(student_logits, teacher_logits, temperature=self.config.temperature,
                               tp_group=parallel.tp)  # [b, s]
        distilled = distilled_tokens(batch, batch.attention)
        per_token = kl
        if self.config.token_weighting:
            per_token = kl * divergence_token_weights(kl.detach(), distilled, batch.sample_index, batch.num_samples,
                                                      clip=self.config.weight_clip, cp_group=parallel.cp)
        per_token = per_token * distilled
        count = distilled.sum().float()
        logs = {"kd loss": torch.stack([(kl.detach() * distilled).sum(), count])}
        if self.config.ce_weight > 0:
            # Megatron's vocab-parallel CE works in place on its input: give it a copy.
            ce = gpt.compute_language_model_loss(batch.labels, student_logits.clone())  # [b, s]
            per_token = per_token + self.config.ce_weight * ce * batch.loss_mask
            logs["ce loss"] = torch.stack([(ce.detach() * batch.loss_mask).sum(), batch.loss_mask.sum()])
        return per_token, functools.partial(_distill_loss, distilled=distilled, logs=logs)


def _distill_loss(per_token: torch.Tensor, *, distilled: torch.Tensor, logs: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, distilled-token count, logs) in Megatron's per-token-loss form; "lm loss"
    is the optimised loss (the token mean over distilled tokens)."""
    loss_sum = per_token.float().sum()
    count = distilled.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()]), **logs}
