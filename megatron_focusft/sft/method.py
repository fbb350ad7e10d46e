"""`--training-mode sft`: plain SFT, the baseline, under the FocuSFT or a causal mask."""

from __future__ import annotations

import argparse

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.engine.method import MethodModel, MethodRun, StageBalance, TrainingMethod
from megatron_focusft.models.presets import ModelPreset
from megatron_focusft.sft.step import sft_forward_step

SFT_MASKS: tuple[str, ...] = ("causal", "focusft")


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sft-mask", choices=SFT_MASKS, default="causal",
                       help="attention mask of --training-mode sft: causal (the usual SFT baseline) or focusft "
                            "(FocuSFT's mask without the bilevel step); FocuSFT always uses its own")


def _model(args: argparse.Namespace) -> MethodModel:
    return MethodModel(mask_kind=args.sft_mask, fast_weights=None)


def _run(args: argparse.Namespace, model_config: TransformerConfig, dp_rank: int, shape: ModelPreset,
         balanced: StageBalance | None) -> MethodRun:
    return MethodRun(sft_forward_step)


SFT = TrainingMethod("sft", "plain SFT (baseline)", _add_arguments, ("sft_mask",), _model, _run)
