"""Where a training run starts: resumed from `--load`, from a pretrained checkpoint's weights
(`--pretrained-checkpoint`, `--finetune`), or from scratch; and the model's shape for it.

Resume: `--load` holds a checkpoint (and `--finetune` does not ask for its weights alone).
Fine-tune: otherwise `--pretrained-checkpoint`'s weights, or with `--finetune` those of
`--load`; iteration 0, fresh optimizer and schedule. So one command starts a fine-tuning run
and, re-run after a stop, resumes it. `--ckpt-step N` picks the iteration of either. A
checkpoint's recorded shape is the model's shape: a shape flag that disagrees with it is an
error naming both values; RoPE, norm-epsilon and position-limit flags override it (they change
the arithmetic, not the weights); --seq-length must fit the position limit. The tokenizer is
--tokenizer-model, else the one the starting checkpoint carries in model_assets (an import's, or
a run's that had one), else the built-in byte tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron_focusft.engine.checkpoint import (
    ASSETS_DIR,
    CheckpointError,
    CheckpointInfo,
    latest_checkpoint,
    read_checkpoint_info,
)
from megatron_focusft.models.presets import Llama3RopeScaling, ModelPreset, get_preset

# flag dest -> ModelPreset field
WEIGHT_SHAPE_FLAGS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
                      "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
                      "vocab_size": "vocab_size", "kv_channels": "kv_channels", "add_qkv_bias": "add_qkv_bias",
                      "share_embeddings_and_output_weights": "share_embeddings_and_output_weights"}
ARITHMETIC_FLAGS = {"rotary_base": "rotary_base", "norm_epsilon": "norm_epsilon",
                    "max_position_embeddings": "max_position_embeddings"}
DEFAULT_PRESET = "tiny"


@dataclass(frozen=True)
class StartingPoint:
    shape: ModelPreset
    resume_from: str | None = None  # a --load directory to resume (full state)
    weights_from: str | None = None  # a checkpoint to take the model weights from
    notes: tuple[str, ...] = ()
    checkpoint: CheckpointInfo | None = None  # what the checkpoint started from says about itself
    tokenizer_dir: str | None = None  # tokenizer directory of the run (None: the byte tokenizer)


def _flag(dest: str) -> str:
    return "--" + {"share_embeddings_and_output_weights": "untie-embeddings-and-output-weights"}.get(
        dest, dest.replace("_", "-"))


def _rope_scaling(args: argparse.Namespace) -> Llama3RopeScaling | None:
    if not args.use_rope_scaling:
        return None
    return Llama3RopeScaling(factor=args.rope_scaling_factor if args.rope_scaling_factor is not None else 8.0)


def _with_flags(base: ModelPreset, args: argparse.Namespace) -> ModelPreset:
    overrides = {field: getattr(args, dest) for dest, field in {**WEIGHT_SHAPE_FLAGS, **ARITHMETIC_FLAGS}.items()
                 if getattr(args, dest) is not None}
    if overrides.get("kv_channels") == base.head_dim:
        del overrides["kv_channels"]  # the default head size, however the base spells it
    if args.use_rope_scaling:
        overrides["rope_scaling"] = _rope_scaling(args)
    return dataclasses.replace(base, **overrides)


def _checkpoint_shape(args: argparse.Namespace, path: str, shape: ModelPreset) -> tuple[ModelPreset, list[str]]:
    """The checkpoint's shape with the arithmetic flags applied; disagreeing shape flags raise."""
    problems = []
    if args.model_preset is not None:
        # Allowed when it names the checkpoint's shape, so a launcher re-run with the same flags resumes.
        preset = _with_flags(get_preset(args.model_preset), args).weight_shape()
        saved_shape = shape.weight_shape()
        problems += [f"--model-preset {args.model_preset} has {field} = {preset[field]} but the checkpoint has "
                     f"{saved_shape[field]}" for field in preset if preset[field] != saved_shape[field]]
    for dest, field in WEIGHT_SHAPE_FLAGS.items():
        value = getattr(args, dest)
        saved = shape.head_dim if field == "kv_channels" else getattr(shape, field)
        if value is not None and value != saved:
            problems.append(f"{_flag(dest)} {value} but the checkpoint has {field} = {saved}")
    if problems:
        raise ValueError(f"flags disagree with the model in {path}: " + "; ".join(problems))
    notes = [f"{_flag(dest)} {getattr(args, dest)} replaces the checkpoint's {getattr(shape, field)}"
             for dest, field in ARITHMETIC_FLAGS.items()
             if getattr(args, dest) is not None and getattr(args, dest) != getattr(shape, field)]
    if args.use_rope_scaling and _rope_scaling(args) != shape.rope_scaling:
        notes.append(f"--use-rope-scaling replaces the checkpoint's rope scaling {shape.rope_scaling}")
    return _with_flags(shape, args), notes


def starting_point(args: argparse.Namespace) -> StartingPoint:
    """Read-only (no collective): every rank computes the same answer from the same files.

    `--ckpt-step` names the iteration of the checkpoint the run starts from: --load's when it
    holds checkpoints, else the fine-tuning source's.
    """
    own = bool(args.load) and latest_checkpoint(args.load)[0] is not None
    resumable = read_checkpoint_info(args.load, args.ckpt_step) if own else None
    if resumable is not None and not (args.finetune and not args.pretrained_checkpoint):
        shape, notes = _checkpoint_shape(args, args.load, resumable.shape)
        return _fitting(StartingPoint(shape, resume_from=args.load, notes=tuple(notes), checkpoint=resumable), args)
    source = args.pretrained_checkpoint or (args.load if args.finetune else None)
    if source is None:
        if args.ckpt_step is not None:
            raise CheckpointError(f"--ckpt-step {args.ckpt_step}: --load {args.load} holds no checkpoint")
        return _fitting(StartingPoint(_with_flags(get_preset(args.model_preset or DEFAULT_PRESET), args)), args)
    info = read_checkpoint_info(source, args.ckpt_step)
    if info is None:
        raise CheckpointError(f"--pretrained-checkpoint {source} holds no complete checkpoint"
                              if source == args.pretrained_checkpoint else f"--load {source} holds no checkpoint")
    shape, notes = _checkpoint_shape(args, source, info.shape)
    return _fitting(StartingPoint(shape, weights_from=source, notes=tuple(notes), checkpoint=info), args)


def _fitting(start: StartingPoint, args: argparse.Namespace) -> StartingPoint:
    if args.seq_length > start.shape.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
                         f"{start.shape.max_position_embeddings} (set --max-position-embeddings to raise it)")
    return dataclasses.replace(start, tokenizer_dir=args.tokenizer_model or _carried_tokenizer(start))


def _carried_tokenizer(start: StartingPoint) -> str | None:
    """The starting checkpoint's model_assets folder when it holds a tokenizer."""
    source = start.resume_from or start.weights_from
    assets = Path(source) / ASSETS_DIR if source else None
    return str(assets) if assets is not None and (assets / "tokenizer.json").is_file() else None
