"""GPTModel run in parts, so the layers below the fast weights run once per step.

`forward_layers(model, ..., layers)` runs a contiguous range of decoder layers; `embed` and
`lm_head_loss` are GPTModel's own pre- and post-processing. embed -> all layers -> lm_head_loss
is GPTModel.forward for the configurations we build (CP and SP included), which
tests/focusft/test_step.py checks bit for bit (tests/parallel/test_cp_model.py under CP,
tests/parallel/test_sequence_parallel.py under SP).

Pipeline parallelism: a stage's model holds its own layers only (`model.decoder.layers[i]` has
the global `layer_number`); `stage_input` is `embed` on the first stage and the activations the
schedule received from the previous stage (`model.set_input_tensor`) on the others;
`lm_head_loss` exists on the last stage only.

Sequence parallelism (SP, TP size P): hidden states between embed and lm_head_loss are this TP
rank's sequence shard [s/P, b, h] (positions [p s/P, (p+1) s/P) of every row), as inside
GPTModel; token-level inputs and outputs (tokens, labels, scored, the loss) stay [b, s] for the
whole sequence on every TP rank.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.fastweights.linear import FastWeightBinding, bind_fast_weights, bound_fast_weights
from megatron_focusft.masks import SegmentMask


def embed(model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, position_ids [b, s] -> (hidden [s, b, h], rotary embedding [s, 1, 1, d]).

    Under SP hidden is this rank's shard [s/P, b, h] (the embedding reduce-scatters, or, if it
    was built not to, it is scattered here as GPTModel._preprocess does); the rotary table covers
    the whole sequence. Under context parallelism s is this rank's share of S = s * cp tokens:
    the table is asked for S rows (the length GPTModel computes, by the same method) and
    RotaryEmbedding keeps this rank's rows, chunks r and 2cp-1-r, so every token is rotated by
    its global position.
    """
    hidden = model.embedding(input_ids=tokens, position_ids=position_ids)
    if model.config.sequence_parallel and not model.embedding.scatter_to_sequence_parallel:
        hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=model.pg_collection.tp)
    rotary_len = model.rotary_pos_emb.get_rotary_seq_len(None, model.decoder, hidden, model.config)
    rotary = model.rotary_pos_emb(rotary_len)
    return hidden, rotary


def stage_input(model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This pipeline stage's input (hidden [s, b', h], rotary embedding): `embed` on the first
    stage, else the tensor the schedule received (b' may exceed b when a stage sends more rows)."""
    if model.pre_process:
        return embed(model, tokens, position_ids)
    hidden = model.decoder.input_tensor
    rotary_len = model.rotary_pos_emb.get_rotary_seq_len(None, model.decoder, hidden, model.config)
    return hidden, model.rotary_pos_emb(rotary_len)


def forward_layers(
    model: GPTModel, hidden: torch.Tensor, mask: SegmentMask, rotary: torch.Tensor, layers: range
) -> torch.Tensor:
    """Decoder layers with 0-based indices `layers` (into this stage's layer list), [s, b, h] -> [s, b, h].

    With full activation recomputation configured and grad enabled, the layers run in the
    checkpointed groups of `recompute_groups`: a group keeps only its input and re-runs in the
    backward, with the fast weights that were bound in the forward bound again.
    """
    config = model.config
    if config.recompute_granularity != "full" or not torch.is_grad_enabled():
        return _run_layers(model, hidden, mask, rotary, layers)
    if config.hidden_dropout > 0 or config.attention_dropout > 0:
        raise NotImplementedError("activation recomputation in the FocuSFT step does not replay Megatron's "
                                  "tensor-parallel RNG streams: set dropout to 0 or turn recomputation off")
    binding = bound_fast_weights(model)
    for group, recompute in recompute_groups(config, layers):
        run = functools.partial(_run_layers, model, mask=mask, rotary=rotary, layers=group, binding=binding)
        # Non-reentrant: the inner loop differentiates with torch.autograd.grad.
        hidden = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False) if recompute else run(hidden)
    return hidden


def recompute_groups(config: TransformerConfig, layers: range) -> list[tuple[range, bool]]:
    """Megatron's recompute methods on stage-local layer indices -> (consecutive layers, checkpointed).

    uniform: chunks of `recompute_num_layers` layers (chunk k = indices [kN, (k+1)N) of the
    stage), each checkpointed as a whole. block: the stage's first `recompute_num_layers` layers
    checkpointed one by one, the others not.
    """
    n = config.recompute_num_layers
    if config.recompute_method == "uniform":
        key = lambda index: (index // n, True)  # noqa: E731
    elif config.recompute_method == "block":
        key = lambda index: (index, True) if index < n else (-1, False)  # noqa: E731
    else:
        raise ValueError(f"unknown recompute_method {config.recompute_method!r}; expected 'uniform' or 'block'")
    groups: list[tuple[range, bool]] = []
    for k, indices in itertools.groupby(layers, key):
        indices = list(indices)
        groups.append((range(indices[0], indices[-1] + 1), k[1]))
    return groups


def _run_layers(
    model: GPTModel, hidden: torch.Tensor, mask: SegmentMask, rotary: torch.Tensor, layers: range,
    binding: FastWeightBinding | None = None,
) -> torch.Tensor:
    """The layers in order. `binding` is bound for the call unless fast weights are bound already
    (the backward's recomputation of a checkpointed group runs after the forward's `with` ended)."""
    rebind = binding is not None and bound_fast_weights(model) is None
    # Like TransformerBlock.forward: under SP, dropout on sequence shards draws from the
    # tensor-parallel RNG stream.
    rng = tensor_parallel.get_cuda_rng_tracker().fork() if model.config.sequence_parallel else contextlib.nullcontext()
    with rng, (bind_fast_weights(model, binding) if rebind else contextlib.nullcontext()):
        for index in layers:
            hidden, _ = model.decoder.layers[index](hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
    return hidden


def output_logits(model: GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on normed hidden [s, b, h] -> logits [s, b, vocab/tp]; a tied model
    multiplies by the word embeddings (the last stage's copy under PP), as GPTModel does."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits


def lm_head_loss(
    model: GPTModel, hidden: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """Final norm, output layer and vocab-parallel CE: hidden [s, b, h], labels [b, s] -> loss [b, s] fp32.

    With `scored` [b, s] bool, only those positions go through the head (the vocabulary
    projection dominates the head's cost); the loss elsewhere is 0. Every op is row-wise, so the
    scored entries equal the full computation's. Under SP hidden is this rank's sequence shard
    and the loss is still the whole sequence's, the same on every TP rank.
    """
    if scored is None or not bool(scored.any()):
        logits = output_logits(model, model.decoder.final_layernorm(hidden))
        loss = model.compute_language_model_loss(labels, logits)
        return loss if scored is None else loss * 0.0
    if model.output_layer.sequence_parallel:
        return _scored_loss_sequence_parallel(model, hidden, labels, scored)
    scored_sb = scored.t()
    picked = model.decoder.final_layernorm(hidden[scored_sb].unsqueeze(1))  # [T, 1, h]
    logits = output_logits(model, picked)
    picked_loss = model.compute_language_model_loss(labels.t()[scored_sb].unsqueeze(0), logits)  # [1, T]
    loss_sb = torch.zeros(scored_sb.shape, dtype=picked_loss.dtype, device=picked_loss.device)
    return loss_sb.masked_scatter(scored_sb, picked_loss.squeeze(0)).t()


def _scored_loss_sequence_parallel(
    model: GPTModel, hidden: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """lm_head_loss's scored path under SP: hidden [s/P, b, h] is this rank's sequence shard.

    The output layer all-gathers its sequence-split input along dim 0, so each rank hands it its
    own scored tokens, padded to the largest count of any rank (every rank knows every rank's
    count from the global `scored`, so no collective is needed): the gather then yields all
    scored tokens, rank by rank, in [s, b] order, plus padding rows whose loss is dropped. The
    norm runs on this rank's tokens only (its weight gradient is summed over TP by
    finalize_model_grads, as for the decoder's own norms).
    """
    group = model.output_layer.tp_group
    rank = group.rank()
    scored_shards = scored.t().split(hidden.shape[0])  # P x [s/P, b]
    label_shards = labels.t().split(hidden.shape[0])
    counts = [int(shard.sum()) for shard in scored_shards]
    width = max(counts)
    picked = model.decoder.final_layernorm(hidden[scored_shards[rank]])  # [count_p, h]
    picked = torch.cat([picked, picked.new_zeros(width - counts[rank], picked.shape[1])])
    logits = output_logits(model, picked.unsqueeze(1))  # [P * width, 1, vocab / P]
    padded_labels = torch.cat([torch.cat([lab[shard], lab.new_zeros(width - count)])
                               for lab, shard, count in zip(label_shards, scored_shards, counts)])
    loss = model.compute_language_model_loss(padded_labels.unsqueeze(0), logits).squeeze(0)  # [P * width]
    real = torch.cat([torch.arange(width, device=loss.device) < count for count in counts])
    loss_sb = torch.zeros(scored.t().shape, dtype=loss.dtype, device=loss.device)
    return loss_sb.masked_scatter(scored.t(), loss[real]).t()
