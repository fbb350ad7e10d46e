"""`--training-mode focusft`: the bilevel step, its `--focusft-*` flags (defaults from the configs)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.engine.method import MethodModel, MethodRun, StageBalance, TrainingMethod
from megatron_focusft.models.presets import ModelPreset
from megatron_focusft.fastweights import FastWeightConfig, fast_weight_layout
from megatron_focusft.fastweights.config import TARGETS
from megatron_focusft.focusft.config import INNER_OBJECTIVES, PIPELINE_SCHEDULES, FocusftConfig
from megatron_focusft.focusft.step import SeededFastWeights, make_focusft_forward_step

_STEP, _FAST = FocusftConfig(), FastWeightConfig()


def add_focusft_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--focusft-inner-steps", type=int, default=_STEP.inner_steps, help="inner SGD steps (>= 1)")
    group.add_argument("--focusft-inner-lr", type=float, default=_STEP.inner_lr, help="inner SGD step size (> 0)")
    group.add_argument("--focusft-inner-grad-clip", type=float, default=_STEP.inner_grad_clip,
                       help="per-sample, per-tensor clip of the inner gradients (<= 0: off)")
    group.add_argument("--focusft-max-update-norm", type=float, default=_STEP.max_update_norm,
                       help="a sample's inner steps stop, and it keeps its initial fast weights, once an update "
                            "would move them further than this (L2 over the sample's tensors; inf: no bound)")
    group.add_argument("--focusft-inner-objective", choices=INNER_OBJECTIVES, default=_STEP.inner_objective)
    group.add_argument("--focusft-pipeline-schedule", choices=PIPELINE_SCHEDULES, default=_STEP.pipeline_schedule,
                       help="with --pipeline-model-parallel-size > 1: interleaved = every micro-batch's inner "
                            "steps and outer pass as units of one 1F1B-style schedule; sequential = Megatron's "
                            "1F1B with the inner loop in the last stage's forward, or in a schedule call per "
                            "inner step when the adapted layers span stages")
    group.add_argument("--focusft-rank", type=int, default=_FAST.rank)
    group.add_argument("--focusft-alpha", type=float, default=_FAST.alpha)
    group.add_argument("--focusft-layer-fraction", type=float, default=_FAST.layer_fraction)
    group.add_argument("--focusft-targets", nargs="+", default=list(_FAST.targets), choices=TARGETS)


def focusft_config(flags: Mapping[str, Any]) -> FocusftConfig:
    """The FocusftConfig of `--focusft-*` flag values (keys as argparse names them: parsed
    arguments, or a checkpoint's run_config); the config's defaults fill missing ones."""
    def get(name: str, default: Any) -> Any:
        value = flags.get(f"focusft_{name}")
        return default if value is None else value

    fast = FastWeightConfig(rank=get("rank", _FAST.rank), alpha=get("alpha", _FAST.alpha),
                            layer_fraction=get("layer_fraction", _FAST.layer_fraction),
                            targets=tuple(get("targets", _FAST.targets)))
    return FocusftConfig(inner_steps=get("inner_steps", _STEP.inner_steps), inner_lr=get("inner_lr", _STEP.inner_lr),
                         inner_grad_clip=get("inner_grad_clip", _STEP.inner_grad_clip),
                         inner_objective=get("inner_objective", _STEP.inner_objective),
                         max_update_norm=get("max_update_norm", _STEP.max_update_norm),
                         pipeline_schedule=get("pipeline_schedule", _STEP.pipeline_schedule), fast_weights=fast)


def _validate(args: argparse.Namespace) -> None:
    """The `--focusft-*` values the bilevel step cannot run, by flag name."""
    if args.focusft_inner_steps < 1:
        raise ValueError(f"--focusft-inner-steps must be >= 1, got {args.focusft_inner_steps} (the plain SFT step "
                         f"under the FocuSFT mask is --training-mode sft --sft-mask focusft)")
    if not args.focusft_inner_lr > 0:
        raise ValueError(f"--focusft-inner-lr must be > 0, got {args.focusft_inner_lr}")
    if not args.focusft_max_update_norm > 0:
        raise ValueError(f"--focusft-max-update-norm must be > 0 (inf: no bound), got {args.focusft_max_update_norm}")
    if args.focusft_rank < 1:
        raise ValueError(f"--focusft-rank must be >= 1, got {args.focusft_rank}")
    if not 0 < args.focusft_layer_fraction <= 1:
        raise ValueError(f"--focusft-layer-fraction must be in (0, 1], got {args.focusft_layer_fraction}")
    if len(set(args.focusft_targets)) != len(args.focusft_targets):
        raise ValueError(f"--focusft-targets names a slot twice: {' '.join(args.focusft_targets)}")


def _model(args: argparse.Namespace) -> MethodModel:
    return MethodModel(mask_kind="focusft", fast_weights=focusft_config(vars(args)).fast_weights)


def _run(args: argparse.Namespace, model_config: TransformerConfig, dp_rank: int, shape: ModelPreset,
         balanced: StageBalance | None) -> MethodRun:
    config = focusft_config(vars(args))
    fast = config.fast_weights
    # Per-sample seeds differ across data-parallel ranks (their samples differ) and steps.
    dtype = model_config.params_dtype
    source = SeededFastWeights(fast_weight_layout(model_config, fast), fast.rank, args.seed * 1000 + dp_rank,
                               dtype=dtype)

    def resume(micro_batches_done: int) -> None:
        # One draw per micro-batch (on the stages holding adapted layers, which alone draw).
        source.micro_batches_seen = micro_batches_done

    return MethodRun(make_focusft_forward_step(config, source, balanced.measured_costs if balanced else None), resume)


def _balance(args: argparse.Namespace, model, micro_batch, num_micro_batches: int) -> StageBalance:
    """`--pipeline-balance auto`: layer costs measured on each stage (each model chunk with virtual
    stages), then the split whose simulated iteration is shortest (focusft/pipeline_cost.best_split;
    with V virtual stages per rank, virtual_balance's V x P chunk sizes); the interleaved schedule
    then plans its order from the same costs (the same on every rank: measure_layer_costs gathers them)."""
    from megatron_focusft.fastweights.config import adapted_layer_numbers
    from megatron_focusft.focusft.pipeline_cost import best_split, virtual_balance
    from megatron_focusft.focusft.pipeline_measure import measure_layer_costs

    config = focusft_config(vars(args))
    chunks = [chunk.module for chunk in (model if isinstance(model, list) else [model])]
    gpt_config = chunks[0].config
    layout = fast_weight_layout(gpt_config, config.fast_weights)
    initial = SeededFastWeights(layout, config.fast_weights.rank, args.seed, dtype=gpt_config.params_dtype)
    costs = measure_layer_costs(chunks, micro_batch, config, initial(micro_batch))
    num_layers, pp = gpt_config.num_layers, gpt_config.pipeline_model_parallel_size
    virtual = gpt_config.virtual_pipeline_model_parallel_size
    work = (adapted_layer_numbers(num_layers, config.fast_weights.layer_fraction)[0], config.inner_steps,
            config.inner_objective == "context", num_micro_batches, costs)
    chosen = virtual_balance(num_layers, pp, virtual, *work) if virtual else best_split(num_layers, pp, *work)
    return StageBalance(chosen.counts, chosen.describe(), costs)


FOCUSFT = TrainingMethod(
    "focusft", "FocuSFT bilevel step", add_focusft_arguments,
    ("focusft_inner_steps", "focusft_inner_lr", "focusft_inner_objective", "focusft_rank", "focusft_alpha",
     "focusft_layer_fraction", "focusft_targets"),
    _model, _run, _validate, _balance)
