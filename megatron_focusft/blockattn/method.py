"""`--training-mode block-sft` (block fine-tuning) and `--training-mode block-distill` (block
distillation): their flags, data and steps. Both read chat data (`--data-path`) in the forms of
blockattn/sample_forms.py under the block mask, with every parallelism of the engine."""

from __future__ import annotations

import argparse

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.blockattn.sample_forms import BlockFormConfig, BlockSampleForms
from megatron_focusft.blockattn.step import BlockDistillForwardStep, BlockSftForwardStep, DistillConfig
from megatron_focusft.blockattn.teacher import load_teacher
from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.engine.method import MethodModel, MethodRun, StageBalance, TrainingMethod
from megatron_focusft.engine.setup import model_setup_from_args
from megatron_focusft.models.presets import ModelPreset
from megatron_focusft.segment.registry import SegmenterSettings, build_segmenter, segmenter_method, segmenter_names

_FORMS, _DISTILL = BlockFormConfig(), DistillConfig()


def _add_block_data_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--block-segmenter", choices=segmenter_names(), default="delimiter",
                       help="how chat messages are split into blocks (block-sft, block-distill; rows with "
                            "'blocks' keep theirs): a method of `focusft segment apply`")
    group.add_argument("--block-segmenter-max-tokens", type=int, default=None,
                       help="block budget of the segmenter (fixed: the block length)")
    group.add_argument("--block-segmenter-model", default=None, help="directory of a learned segmenter")
    group.add_argument("--block-ratio", type=float, default=_FORMS.block_ratio,
                       help="block-sft: probability that an eligible sample is added once more in block form")
    group.add_argument("--block-sink-tokens", type=int, default=_FORMS.sink_tokens,
                       help="k learned sink tokens at the start of every local block (0: none)")


def _add_distill_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--teacher-checkpoint", default=None,
                       help="the frozen full-attention teacher (default: --pretrained-checkpoint)")
    group.add_argument("--distill-temperature", type=float, default=_DISTILL.temperature)
    group.add_argument("--distill-ce-weight", type=float, default=_DISTILL.ce_weight,
                       help="weight of the response cross-entropy added to the KL (0: KL only)")
    group.add_argument("--block-dropout", type=float, default=_DISTILL.block_dropout,
                       help="per step, probability that a local block is promoted to global and distilled")
    group.add_argument("--distill-token-weighting", action="store_true",
                       help="weight tokens by their teacher-student divergence (normalised per sample, clipped)")
    group.add_argument("--distill-weight-clip", type=float, default=_DISTILL.weight_clip)


def _forms(args: argparse.Namespace, full_form: bool):
    config = BlockFormConfig(full_form=full_form, block_ratio=args.block_ratio, sink_tokens=args.block_sink_tokens,
                             seed=args.seed)
    settings = _segmenter_settings(args)

    def make(tokenizer: ChatTokenizer, seq_length: int) -> BlockSampleForms:
        return BlockSampleForms(config, build_segmenter(args.block_segmenter, settings, tokenizer), seq_length)

    return make


# The segmenter settings the block flags set (segment/registry.SegmenterSettings fields).
_SEGMENTER_FLAGS = {"max_block_tokens": "--block-segmenter-max-tokens", "model": "--block-segmenter-model"}


def _segmenter_settings(args: argparse.Namespace) -> SegmenterSettings:
    return SegmenterSettings(max_block_tokens=args.block_segmenter_max_tokens, model=args.block_segmenter_model)


def _validate(args: argparse.Namespace) -> None:
    if args.mock_data:
        raise ValueError(f"--training-mode {args.training_mode} reads chat data (--data-path): the mock task has "
                         f"no blocks")
    BlockFormConfig(block_ratio=args.block_ratio, sink_tokens=args.block_sink_tokens)
    ignored = segmenter_method(args.block_segmenter).unaccepted(_segmenter_settings(args))
    if ignored:
        raise ValueError(f"--block-segmenter {args.block_segmenter} does not take "
                         f"{', '.join(_SEGMENTER_FLAGS[name] for name in ignored)}")


def _validate_distill(args: argparse.Namespace) -> None:
    _validate(args)
    _distill_config(args)
    if args.teacher_checkpoint is None and args.pretrained_checkpoint is None:
        raise ValueError("--training-mode block-distill needs a teacher: --teacher-checkpoint DIR (or "
                         "--pretrained-checkpoint, whose model then teaches)")


def _distill_config(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(temperature=args.distill_temperature, ce_weight=args.distill_ce_weight,
                         block_dropout=args.block_dropout, token_weighting=args.distill_token_weighting,
                         weight_clip=args.distill_weight_clip, seed=args.seed)


def _sft_model(args: argparse.Namespace) -> MethodModel:
    return MethodModel(mask_kind="block", fast_weights=None, sample_forms=_forms(args, full_form=True),
                       block_sink_tokens=args.block_sink_tokens)


def _distill_model(args: argparse.Namespace) -> MethodModel:
    return MethodModel(mask_kind="block", fast_weights=None, sample_forms=_forms(args, full_form=False),
                       block_sink_tokens=args.block_sink_tokens)


def _sft_run(args: argparse.Namespace, model_config: TransformerConfig, dp_rank: int, shape: ModelPreset,
             balanced: StageBalance | None) -> MethodRun:
    return MethodRun(BlockSftForwardStep())


def _distill_run(args: argparse.Namespace, model_config: TransformerConfig, dp_rank: int,
                 shape: ModelPreset, balanced: StageBalance | None) -> MethodRun:
    teacher_dir = args.teacher_checkpoint or args.pretrained_checkpoint
    teacher = load_teacher(teacher_dir, shape, args.tokenizer_model or args.pretrained_checkpoint,
                           model_setup_from_args(args, shape))
    step = BlockDistillForwardStep(_distill_config(args), teacher)

    def resume(micro_batches_done: int) -> None:
        step.micro_batches_seen = micro_batches_done

    return MethodRun(step, resume)


_DATA_KEYS = ("block_segmenter", "block_segmenter_max_tokens", "block_segmenter_model", "block_ratio",
              "block_sink_tokens")

BLOCK_SFT = TrainingMethod(
    "block-sft", "block fine-tuning: every sample in full form, eligible ones also in block form",
    _add_block_data_arguments, _DATA_KEYS, _sft_model, _sft_run, _validate)

BLOCK_DISTILL = TrainingMethod(
    "block-distill", "block distillation: a block-attention student, a frozen full-attention teacher",
    _add_distill_arguments, (*_DATA_KEYS, "distill_temperature", "distill_ce_weight", "block_dropout",
                             "distill_token_weighting", "distill_weight_clip"),
    _distill_model, _distill_run, _validate_distill)
