"""Command-line flags of `pretrain_focusft.py` / `focusft train`: Megatron's names where Megatron has one.

Model shape: `--model-preset` (megatron_focusft.models.presets) with Megatron's shape flags as
overrides. Parallelism, batch, optimizer, schedule, checkpoint and logging flags are Megatron's.
`--training-mode` picks a training method (training/methods.py); each method adds its own
flags (`--focusft-*` for FocuSFT, `--sft-mask` for the plain-SFT baselines).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from megatron_focusft.attention.backends import attention_backend, attention_backend_names, context_parallel_backend_names
from megatron_focusft.data.blend import DataBlend
from megatron_focusft.data.chat import data_files
from megatron_focusft.engine.pipeline import layout_stage_counts, layout_virtual_stages
from megatron_focusft.engine.setup import OptimizerSetup
from megatron_focusft.models.presets import PRESETS, get_preset
from megatron_focusft.training.lr_schedule import OVERRIDE_FLAG, USE_CHECKPOINT_FLAG, LrSchedule
from megatron_focusft.training.methods import METHODS
from megatron_focusft.training.starting_point import DEFAULT_PRESET

_OPT = OptimizerSetup()  # the optimizer flags' defaults


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    model = parser.add_argument_group("model")
    model.add_argument("--model-preset", default=None, choices=sorted(PRESETS),
                       help="model shape preset (default: the loaded checkpoint's shape, else tiny)")
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--num-query-groups", "--max-position-embeddings", "--vocab-size", "--kv-channels"):
        model.add_argument(flag, type=int, default=None, help="overrides the preset")
    model.add_argument("--rotary-base", type=float, default=None, help="RoPE theta (overrides the preset)")
    model.add_argument("--norm-epsilon", type=float, default=None, help="RMSNorm epsilon (overrides the preset)")
    model.add_argument("--add-qkv-bias", action="store_const", const=True, default=None,
                       help="biases on the q/k/v projections (Qwen2)")
    model.add_argument("--untie-embeddings-and-output-weights", dest="share_embeddings_and_output_weights",
                       action="store_const", const=False, default=None,
                       help="a separate output layer (the presets have one; a tied checkpoint keeps its tying)")
    model.add_argument("--use-rope-scaling", action="store_const", const=True, default=None,
                       help="Llama 3.1 RoPE scaling (low/high frequency factors 1 / 4, original length 8192)")
    model.add_argument("--rope-scaling-factor", type=float, default=None, help="with --use-rope-scaling (default 8)")
    model.add_argument("--attention-backend", choices=attention_backend_names(), default="sdpa",
                       help="segment-mask attention backend")
    model.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (fp32 grads)")
    model.add_argument("--recompute-granularity", choices=("full",), default=None,
                       help="activation recomputation of whole layers (Megatron's 'selective' cannot carry "
                            "segment masks)")
    model.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                       help="full recomputation: groups of --recompute-num-layers layers (uniform), or only "
                            "the first --recompute-num-layers layers of each stage (block)")
    model.add_argument("--recompute-num-layers", type=int, default=None)

    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="pipeline stages (Megatron's 1F1B schedule; FocuSFT: --focusft-pipeline-schedule)")
    par.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                     help="layers on the first pipeline stage (default: an even split)")
    par.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                     help="layers on the last pipeline stage, which also runs the FocuSFT inner loop "
                          "(fewer layers there rebalance the stages; default: an even split)")
    par.add_argument("--pipeline-model-parallel-layout", default=None, metavar="LAYOUT",
                     help="any layer count per stage, Megatron's layout string: E the embedding, t a decoder "
                          "layer, L the loss, | between stages, t*n repeats (e.g. 'Et*10|t*6L'); instead of "
                          "--decoder-first/last-pipeline-num-layers. V x PP stages: V virtual stages per rank of "
                          "these sizes, stage s on rank s mod PP (e.g. 'Et*5|t*3|t*5|t*3L' at PP 2)")
    par.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None, metavar="V",
                     help="virtual pipeline stages: V model chunks per rank, stage s on rank s mod PP, even "
                          "chunks (FocuSFT's interleaved schedule); or give --num-layers-per-virtual-pipeline-stage")
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N",
                     help="virtual pipeline stages of N layers each (V = layers / (PP x N))")
    par.add_argument("--pipeline-balance", choices=("manual", "auto"), default="manual",
                     help="manual: stages as --decoder-first/last-pipeline-num-layers or "
                          "--pipeline-model-parallel-layout say (even without them); auto: measure each layer "
                          "kind's cost on the even split, then use the split whose simulated iteration is "
                          "shortest, among those the first/last-stage flags express and the min-max split of "
                          "the layers' loads (printed, with the predicted per-stage load and the flags that "
                          "give it); with virtual stages, the chunk sizes (a layout of V x PP stages)")
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true",
                     help="split activations outside the tensor-parallel regions along the sequence (needs TP > 1)")

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="*", default=[],
                      help="chat JSONL / Parquet files with `messages`, or directories of them; Megatron's blend "
                           "`W1 PATH1 W2 PATH2 ...` samples each epoch from the paths by weight (seeded)")
    data.add_argument("--mock-data", action="store_true",
                      help="synthetic packed key-value retrieval chats instead of --data-path")
    data.add_argument("--tokenizer-model", default=None,
                      help="local Hugging Face tokenizer directory (chat template); default: built-in byte tokenizer")
    data.add_argument("--bad-sample-policy", choices=("error", "skip"), default="error",
                      help="error on a bad row, or skip it and count it in the summary")
    data.add_argument("--data-cache-dir", default=None, help="cache of the tokenised data set")
    data.add_argument("--seq-length", type=int, default=512)
    data.add_argument("--micro-batch-size", type=int, default=1)
    data.add_argument("--global-batch-size", type=int, default=None,
                      help="rows per optimizer step over all data-parallel ranks (default: micro x DP)")

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--train-iters", type=int, required=True)
    opt.add_argument("--lr", type=float, default=_OPT.lr)
    opt.add_argument("--min-lr", type=float, default=_OPT.min_lr)
    opt.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    opt.add_argument("--lr-decay-iters", type=int, default=None,
                     help="iterations to decay over (default: --train-iters)")
    opt.add_argument("--lr-warmup-fraction", type=float, default=None,
                     help="warmup as a fraction of the decay iterations")
    opt.add_argument("--lr-warmup-iters", type=int, default=0)
    opt.add_argument(OVERRIDE_FLAG, dest="override_opt_param_scheduler", action="store_true",
                     help="on resume, follow the LR schedule flags from the checkpoint's iteration on")
    opt.add_argument(USE_CHECKPOINT_FLAG, dest="use_checkpoint_opt_param_scheduler", action="store_true",
                     help="on resume, keep the checkpoint's LR schedule and ignore the schedule flags")
    opt.add_argument("--weight-decay", type=float, default=_OPT.weight_decay)
    opt.add_argument("--clip-grad", type=float, default=_OPT.clip_grad)
    opt.add_argument("--adam-beta1", type=float, default=_OPT.adam_beta1)
    opt.add_argument("--adam-beta2", type=float, default=_OPT.adam_beta2)
    opt.add_argument("--seed", type=int, default=1234)

    method = parser.add_argument_group("method")
    method.add_argument("--training-mode", choices=list(METHODS), default="focusft",
                        help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    for training_method in METHODS.values():
        training_method.add_arguments(parser.add_argument_group(f"method {training_method.name}"))

    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument("--save", default=None, help="checkpoint directory")
    ckpt.add_argument("--load", default=None,
                      help="resume from the latest complete checkpoint here (one that fails to load is skipped, "
                           "with a warning, for the one before it)")
    ckpt.add_argument("--ckpt-step", type=int, default=None,
                      help="the iteration to start from (of --load, else of --pretrained-checkpoint; default: latest)")
    ckpt.add_argument("--pretrained-checkpoint", default=None,
                      help="start from this checkpoint's model weights (e.g. one made by `focusft convert "
                           "import-hf`) when --load holds no checkpoint: fresh optimizer and schedule, iteration "
                           "0, any TP / PP / CP; the model's shape comes from it")
    ckpt.add_argument("--finetune", action="store_true",
                      help="load model weights only (from --pretrained-checkpoint, else from --load) and start "
                           "at iteration 0")
    ckpt.add_argument("--save-interval", type=int, default=None)
    ckpt.add_argument("--exit-interval", type=int, default=None,
                      help="stop after an iteration that is a multiple of this (saving first when --save is set)")
    ckpt.add_argument("--exit-signal-handler", action="store_true",
                      help="on SIGTERM, finish the iteration, save a checkpoint (with --save) and exit; without it "
                           "SIGINT and SIGTERM stop at once, keeping the last complete checkpoint")

    log = parser.add_argument_group("logging")
    log.add_argument("--log-interval", type=int, default=1)
    log.add_argument("--tensorboard-dir", default=None)
    log.add_argument("--attention-metrics-interval", type=int, default=0,
                     help="every N steps, sink mass and context engagement on a fixed probe batch (0: off)")
    return parser


def parse_training_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = add_training_arguments(argparse.ArgumentParser(
        prog="pretrain_focusft.py", description="FocuSFT / SFT training on Megatron-Core",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    try:
        validate_training_args(args)
    except (ValueError, OSError) as exc:  # OSError: a --data-path that does not exist
        parser.error(str(exc))
    return args


def _check_virtual_stages(args: argparse.Namespace, uneven: list[str]) -> None:
    """Virtual pipeline stages (from their flags, or a layout of V x P stages): what they need and
    exclude (the layer count is checked against the model shape later, by build_gpt)."""
    if not _has_virtual_stages(args):
        return
    given = [flag for flag in ("num_virtual_stages_per_pipeline_rank", "num_layers_per_virtual_pipeline_stage")
             if getattr(args, flag) is not None]
    layout = args.pipeline_model_parallel_layout
    name = f"--{given[0].replace('_', '-')}" if given else f"--pipeline-model-parallel-layout {layout!r}"
    if len(given) > 1:
        raise ValueError("give --num-virtual-stages-per-pipeline-rank or --num-layers-per-virtual-pipeline-stage, "
                         "not both")
    if given and getattr(args, given[0]) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(args, given[0])}")
    if args.pipeline_model_parallel_size == 1:
        raise ValueError(f"{name} needs --pipeline-model-parallel-size > 1")
    if given and layout is not None:
        raise ValueError(f"{name} splits the layers into even chunks; a layout of V x P stages sizes each chunk "
                         f"itself: drop one of them")
    if given and uneven:
        raise ValueError(f"{name} splits the layers into even chunks: drop --{uneven[0].replace('_', '-')}")
    if args.training_mode == "focusft" and args.focusft_pipeline_schedule != "interleaved":
        raise ValueError(f"{name}: FocuSFT runs virtual pipeline stages with its interleaved schedule "
                         f"(--focusft-pipeline-schedule interleaved) only")


def validate_training_args(args: argparse.Namespace) -> None:
    """Reject settings this build cannot run, before any process group, model or data exists.

    Reads only the flags, the environment (torchrun's WORLD_SIZE: the data-parallel size follows
    from it) and whether CUDA is present; a checkpoint's shape is checked later (starting_point).
    """
    if args.pipeline_model_parallel_size < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {args.pipeline_model_parallel_size}")
    uneven = [flag for flag in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                                "pipeline_model_parallel_layout") if getattr(args, flag) is not None]
    if uneven and args.pipeline_model_parallel_size == 1:
        raise ValueError(f"--{uneven[0].replace('_', '-')} needs --pipeline-model-parallel-size > 1")
    if args.pipeline_model_parallel_layout is not None:
        if len(uneven) > 1:
            raise ValueError("--pipeline-model-parallel-layout places every stage's layers: drop "
                             f"--{uneven[0].replace('_', '-')}")
        layout_stage_counts(args.pipeline_model_parallel_layout, args.pipeline_model_parallel_size)
    _check_virtual_stages(args, uneven)
    if args.pipeline_balance == "auto":
        if args.pipeline_model_parallel_size == 1:
            raise ValueError("--pipeline-balance auto needs --pipeline-model-parallel-size > 1")
        if uneven:
            raise ValueError(f"--pipeline-balance auto chooses the stage sizes itself: drop "
                             f"--{uneven[0].replace('_', '-')}")
        if METHODS[args.training_mode].balance is None:
            raise ValueError(f"--pipeline-balance auto has no cost model for --training-mode {args.training_mode}")
    if args.sequence_parallel and args.tensor_model_parallel_size < 2:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence "
                         "over the tensor-parallel group)")
    if args.sequence_parallel and args.context_parallel_size == 1 and args.seq_length % args.tensor_model_parallel_size:
        raise ValueError(f"--sequence-parallel: --seq-length {args.seq_length} must be a multiple of "
                         f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    backend = attention_backend(args.attention_backend)
    if args.context_parallel_size > 1 and backend.cp_path is None:
        capable = " or ".join(context_parallel_backend_names())
        raise ValueError(f"--context-parallel-size > 1 needs --attention-backend {capable} "
                         f"({args.attention_backend} has no CP path for segment masks)")
    if not backend.cpu_backward and not torch.cuda.is_available():
        raise ValueError(f"--attention-backend {args.attention_backend} has no backward pass on the CPU and no CUDA "
                         f"device is present: train on the CPU with --attention-backend sdpa")
    if args.context_parallel_size > 1 and args.attention_metrics_interval:
        raise ValueError("--attention-metrics-interval is not supported with --context-parallel-size > 1 yet")
    if args.recompute_granularity == "full" and (args.recompute_method is None or not args.recompute_num_layers):
        raise ValueError("--recompute-granularity full needs --recompute-method uniform|block and "
                         "--recompute-num-layers N >= 1")
    if args.recompute_granularity != "full" and (args.recompute_method or args.recompute_num_layers):
        raise ValueError("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    if not args.mock_data and not args.data_path:
        raise ValueError("give --data-path FILE [FILE ...] (chat JSONL/Parquet) or --mock-data")
    if args.mock_data and args.data_path:
        raise ValueError("--mock-data and --data-path are exclusive")
    if args.data_path:
        for path in DataBlend.parse(args.data_path).paths:
            data_files(path)  # exists, and is a directory of data files or one with a known suffix
    for name in ("train_iters", "seq_length", "micro_batch_size", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _validate_batch(args)
    _validate_schedule(args)
    _validate_positions(args)
    if args.finetune and not (args.pretrained_checkpoint or args.load):
        raise ValueError("--finetune needs --pretrained-checkpoint DIR (or --load DIR) to take the weights from")
    if args.ckpt_step is not None and not (args.load or args.pretrained_checkpoint):
        raise ValueError("--ckpt-step needs --load DIR or --pretrained-checkpoint DIR")
    if args.ckpt_step is not None and args.ckpt_step < 0:
        raise ValueError(f"--ckpt-step must be >= 0, got {args.ckpt_step}")
    if args.rope_scaling_factor is not None and not args.use_rope_scaling:
        raise ValueError("--rope-scaling-factor needs --use-rope-scaling")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save DIR")
    METHODS[args.training_mode].validate(args)


def _validate_batch(args: argparse.Namespace) -> None:
    """The global batch splits into micro-batches over the data-parallel ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world % model_parallel:
        raise ValueError(f"WORLD_SIZE {world} is not a multiple of --tensor-model-parallel-size x "
                         f"--pipeline-model-parallel-size x --context-parallel-size = {model_parallel}")
    dp = world // model_parallel
    if args.global_batch_size is not None and (args.global_batch_size < 1
                                               or args.global_batch_size % (args.micro_batch_size * dp)):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a positive multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp} (WORLD_SIZE {world} "
                         f"/ model-parallel size {model_parallel})")
    pp = args.pipeline_model_parallel_size
    micro_batches = (args.global_batch_size or args.micro_batch_size * dp) // (args.micro_batch_size * dp)
    if args.training_mode != "focusft" and _has_virtual_stages(args) and micro_batches % pp:
        how = ("without --global-batch-size" if args.global_batch_size is None else
               f"--global-batch-size {args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x "
               f"data-parallel size {dp})")
        raise ValueError(f"virtual pipeline stages with --training-mode {args.training_mode} run Megatron's "
                         f"interleaved 1F1B, which needs the micro-batches per iteration to be a multiple of "
                         f"--pipeline-model-parallel-size {pp}: {micro_batches} ({how})")


def _has_virtual_stages(args: argparse.Namespace) -> bool:
    """Whether the flags give each pipeline rank several model chunks (checked: _check_virtual_stages)."""
    layout = args.pipeline_model_parallel_layout
    return (args.num_virtual_stages_per_pipeline_rank is not None
            or args.num_layers_per_virtual_pipeline_stage is not None
            or (layout is not None and layout_virtual_stages(layout, args.pipeline_model_parallel_size) is not None))


def _validate_schedule(args: argparse.Namespace) -> None:
    """What megatron-core's optimizer and OptimizerParamScheduler assert, as flag errors."""
    for name in ("lr", "min_lr", "weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.lr_decay_iters is not None and args.lr_decay_iters < 1:
        raise ValueError(f"--lr-decay-iters must be >= 1, got {args.lr_decay_iters}")
    if args.lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction < 1:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise ValueError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    schedule = LrSchedule.from_args(args)
    if schedule.warmup_steps >= schedule.decay_steps:
        decay = (f"--lr-decay-iters {args.lr_decay_iters}" if args.lr_decay_iters
                 else f"--train-iters {args.train_iters}")
        raise ValueError(f"the warmup ({schedule.warmup_steps} iterations) must be shorter than the decay ({decay})")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError(f"{OVERRIDE_FLAG} and {USE_CHECKPOINT_FLAG} are exclusive")


def _validate_positions(args: argparse.Namespace) -> None:
    """--seq-length fits the position limit, when it is known before a checkpoint is read."""
    if args.max_position_embeddings is not None:
        limit, where = args.max_position_embeddings, "--max-position-embeddings"
    elif not (args.load or args.pretrained_checkpoint):
        preset = args.model_preset or DEFAULT_PRESET
        limit, where = get_preset(preset).max_position_embeddings, f"the {preset} preset's max_position_embeddings"
    else:
        return  # the checkpoint's shape decides (starting_point checks it)
    if args.seq_length > limit:
        raise ValueError(f"--seq-length {args.seq_length} exceeds {where} {limit}")
