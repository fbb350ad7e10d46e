"""Building a Megatron model, its DDP wrapper and optimizer from our small configs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.engine.pipeline import (
    layout_stage_counts,
    layout_virtual_stages,
    num_pipeline_stages,
    stage_of_chunk,
)
from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.models.gpt import build_gpt_model
from megatron_focusft.models.presets import ModelPreset, get_preset, transformer_config
from megatron_focusft.models.spec import get_segment_attention_layer_spec


@dataclass(frozen=True)
class ModelSetup:
    """What the model is and how it is parallelised."""

    preset: str | ModelPreset = "tiny"  # a preset name, or a shape
    attention_backend: str = "sdpa"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Uneven pipeline stages (Megatron's --decoder-first/last-pipeline-num-layers); None: even.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    # Any layer count per stage: Megatron's --pipeline-model-parallel-layout ("Et*5|t*3L"; V x P
    # stages for V virtual stages per rank, which virtual_pipeline_model_parallel_size must then say); None: the above.
    pipeline_model_parallel_layout: str | None = None
    # Model chunks per rank (Megatron's virtual pipeline stages): stage s = chunk x P + rank, run
    # by FocuSFT's interleaved schedule only (focusft/interleaved.py); even chunks unless a layout
    # sizes them; None: one stage per rank.
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # Megatron's activation recomputation: granularity None | "full" | "selective"; method
    # "uniform" | "block" and num_layers as Megatron's --recompute-method / --recompute-num-layers.
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    bf16: bool = False
    fast_weights: FastWeightConfig | None = None  # FocuSFT adapters in the top layers


def virtual_stages_per_rank(args: argparse.Namespace, num_layers: int) -> int | None:
    """V from the virtual-stage flags for a model of `num_layers` layers (even chunks), or from a
    layout of V x P stages; None without either."""
    pp = args.pipeline_model_parallel_size
    if args.pipeline_model_parallel_layout is not None:
        return layout_virtual_stages(args.pipeline_model_parallel_layout, pp)
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers_per_virtual_pipeline_stage
        if num_layers % (pp * per_stage):
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {per_stage}: {num_layers} layers do not "
                             f"split into PP {pp} x chunks of that many")
        return num_layers // (pp * per_stage)
    virtual = args.num_virtual_stages_per_pipeline_rank
    if virtual is not None and num_layers % (pp * virtual):
        raise ValueError(f"--num-virtual-stages-per-pipeline-rank {virtual}: {num_layers} layers do not split into "
                         f"PP {pp} x {virtual} even chunks")
    return virtual


def model_setup_from_args(args: argparse.Namespace, preset: ModelPreset,
                          fast_weights: FastWeightConfig | None = None) -> ModelSetup:
    """The ModelSetup that the training flags (Megatron's names) describe, for shape `preset`."""
    return ModelSetup(
        preset=preset, attention_backend=args.attention_backend,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        virtual_pipeline_model_parallel_size=virtual_stages_per_rank(args, preset.num_layers),
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, bf16=args.bf16, fast_weights=fast_weights)


@dataclass(frozen=True)
class OptimizerSetup:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0


def check_parallel_fit(shape: ModelPreset, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
    """A ValueError naming the sizes when the model cannot be split this way (before Megatron's asserts)."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    for what, count in (("attention heads", shape.num_attention_heads), ("query groups", shape.num_query_groups),
                        ("vocabulary entries", shape.vocab_size), ("FFN hidden units", shape.ffn_hidden_size)):
        if count % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the model's {count} {what}")
    if shape.num_layers < pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} exceeds the model's {shape.num_layers} layers")


def resolve_shape(setup: ModelSetup) -> ModelPreset:
    return setup.preset if isinstance(setup.preset, ModelPreset) else get_preset(setup.preset)


def build_gpt(setup: ModelSetup, vp_stage: int | None = None) -> tuple[GPTModel, TransformerConfig]:
    """This pipeline stage's GPTModel with segment-mask attention, not wrapped (conversion,
    generation); with virtual stages, this rank's model chunk `vp_stage`. Parallel state must be
    initialised.

    Weights are initialised from the global torch seed as one master tensor split across TP
    ranks, so any TP size starts from the same model; a pipeline stage builds (and draws the
    initial values of) its own layers only.
    """
    if setup.recompute_granularity not in (None, "full"):
        raise ValueError(f"recompute_granularity {setup.recompute_granularity!r} is not supported: Megatron's "
                         "selective recomputation checkpoints core attention with save_for_backward, which "
                         "cannot hold a SegmentMask; use 'full'")
    preset = resolve_shape(setup)
    check_parallel_fit(preset, setup.tensor_model_parallel_size, setup.pipeline_model_parallel_size)
    virtual, layout = setup.virtual_pipeline_model_parallel_size, setup.pipeline_model_parallel_layout
    if layout is None and virtual is not None and preset.num_layers % (virtual * setup.pipeline_model_parallel_size):
        raise ValueError(f"{virtual} virtual pipeline stages per rank x PP {setup.pipeline_model_parallel_size}: the "
                         f"model's {preset.num_layers} layers do not split into that many even chunks")
    if layout is not None:
        placed = sum(layout_stage_counts(layout, setup.pipeline_model_parallel_size))
        if placed != preset.num_layers:
            raise ValueError(f"--pipeline-model-parallel-layout {layout!r} places {placed} decoder layers; the model "
                             f"has {preset.num_layers}")
        implied = layout_virtual_stages(layout, setup.pipeline_model_parallel_size)
        if implied != virtual:
            raise ValueError(f"--pipeline-model-parallel-layout {layout!r} gives {implied} virtual stages per rank, "
                             f"the setup {virtual}")
        # Megatron numbers a layout's layers for chunk 0 unless the global virtual size is set.
        if virtual is not None and parallel_state.get_virtual_pipeline_model_parallel_world_size() != virtual:
            raise ValueError(f"a layout of virtual stages needs parallel state's virtual pipeline world size "
                             f"{virtual} (megatron_session sets it), got "
                             f"{parallel_state.get_virtual_pipeline_model_parallel_world_size()}")
    config = transformer_config(
        preset,
        tensor_model_parallel_size=setup.tensor_model_parallel_size,
        pipeline_model_parallel_size=setup.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=setup.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=setup.num_layers_in_last_pipeline_stage,
        pipeline_model_parallel_layout=layout,
        virtual_pipeline_model_parallel_size=setup.virtual_pipeline_model_parallel_size,
        # Stages exchange activation shapes: FocuSFT's context objective sends [s, 2b, h] through
        # Megatron's 1F1B. (The config refuses that with the MoE "allgather" dispatcher, which a
        # dense model never uses.) Not with virtual stages: FocuSFT's interleaved schedule plans its
        # own messages, SFT's are all [s, b, h]. Megatron's interleaved 1F1B sends to the previous
        # and next rank at once, the same peer at PP = 2; its shape exchange and its batched p2p
        # ops post them in an order that pairs one direction's message with the other's receive
        # (seen on gloo: a hang, and swapped tensors from the third micro-batch on), so virtual
        # stages use the per-op path, which orders them by rank parity.
        variable_seq_lengths=setup.pipeline_model_parallel_size > 1 and setup.virtual_pipeline_model_parallel_size is None,
        batch_p2p_comm=setup.virtual_pipeline_model_parallel_size is None,
        moe_token_dispatcher_type="alltoall",
        pipeline_dtype=torch.bfloat16 if setup.bf16 else torch.float32,
        context_parallel_size=setup.context_parallel_size,
        sequence_parallel=setup.sequence_parallel,
        recompute_granularity=setup.recompute_granularity,
        recompute_method=setup.recompute_method,
        recompute_num_layers=setup.recompute_num_layers,
        bf16=setup.bf16,
        params_dtype=torch.bfloat16 if setup.bf16 else torch.float32,
        calculate_per_token_loss=True,
    )
    if (setup.virtual_pipeline_model_parallel_size is None) != (vp_stage is None):
        raise ValueError(f"vp_stage {vp_stage} with virtual_pipeline_model_parallel_size "
                         f"{setup.virtual_pipeline_model_parallel_size}: give both or neither")
    stage = stage_of_chunk(config, parallel_state.get_pipeline_model_parallel_rank(), vp_stage)
    layer_spec = get_segment_attention_layer_spec(setup.attention_backend)
    model = build_gpt_model(config, preset, layer_spec, setup.fast_weights, pre_process=stage == 0,
                            post_process=stage == num_pipeline_stages(config) - 1, vp_stage=vp_stage)
    return model, config


def build_model(setup: ModelSetup, vp_stage: int | None = None) -> tuple[DistributedDataParallel, TransformerConfig]:
    """`build_gpt` wrapped in Megatron's DDP (per-token loss averaging), for training."""
    model, config = build_gpt(setup, vp_stage)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False), model
    )
    # The schedule calls this after the last micro-batch: reduces grads across DP and divides
    # them by the number of loss tokens (calculate_per_token_loss).
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, config


def build_model_chunks(setup: ModelSetup) -> tuple[DistributedDataParallel | list[DistributedDataParallel],
                                                   TransformerConfig]:
    """`build_model`, or with virtual pipeline stages this rank's model chunks in order (Megatron's
    model-chunk list); the config is the first chunk's (the schedules' timers go there)."""
    if setup.virtual_pipeline_model_parallel_size is None:
        return build_model(setup)
    built = [build_model(setup, vp_stage=v) for v in range(setup.virtual_pipeline_model_parallel_size)]
    return [model for model, _ in built], built[0][1]


def build_optimizer(model: DistributedDataParallel | list[DistributedDataParallel], setup: OptimizerSetup,
                    bf16: bool = False) -> MegatronOptimizer:
    """Megatron's Adam over the model (or its model chunks, virtual pipeline stages)."""
    config = OptimizerConfig(
        optimizer="adam", lr=setup.lr, min_lr=setup.min_lr, weight_decay=setup.weight_decay,
        adam_beta1=setup.adam_beta1, adam_beta2=setup.adam_beta2, clip_grad=setup.clip_grad,
        bf16=bf16, fp16=False,
    )
    return get_megatron_optimizer(config, model if isinstance(model, list) else [model])
