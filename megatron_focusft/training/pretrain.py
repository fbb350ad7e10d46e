"""The training entry point: `pretrain_focusft.py` / `focusft train` (torchrun-launched).

One iteration = `global_batch_size / (micro_batch_size * DP)` micro-batches through Megatron's
schedule with the FocuSFT forward step (or the plain SFT one), an optimizer step and an LR
scheduler step. Console progress every `--log-interval` (training/progress.py), TensorBoard every
iteration; under pipeline parallelism also each stage's busy time (engine/pipeline.py).

Faults: every flag is checked before anything starts (arguments.py); `--save` is checked writable
with room for one checkpoint before the first iteration; SIGINT / SIGTERM stop the run at once
with one line naming the latest checkpoint, or with `--exit-signal-handler` save first
(interrupts.py). `main` turns the errors it expects (checkpoint, --save, interruption) into one
line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_focusft.engine.checkpoint import CheckpointError, CheckpointSaveError, latest_checkpoint
from megatron_focusft.engine.disk_space import SaveDirError, check_save_dir, checkpoint_bytes
from megatron_focusft.models.presets import ModelPreset
from megatron_focusft.runtime import megatron_session
from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.interrupts import SignalHandling, TrainingInterrupted
from megatron_focusft.training.lr_schedule import LrSchedule, ResumedSchedule, resume_schedule
from megatron_focusft.training.progress import attention_line, progress_line

if TYPE_CHECKING:
    from megatron_focusft.engine.method import MethodModel

# bf16 dense peak FLOP/s by device name fragment, for MFU (others: MFU not reported).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _build_data(args: argparse.Namespace, preset: ModelPreset, needs: MethodModel, tokenizer_dir: str | None,
                dp_rank: int, dp_size: int, device: torch.device, log: Callable[[str], None], seed_offset: int = 0):
    from megatron_focusft.training.data_source import ChatDataSource, MockDataSource

    mask_kind = needs.mask_kind
    if args.mock_data:
        from megatron_focusft.data.synthetic import RetrievalTaskConfig

        task = RetrievalTaskConfig.fitting(args.seq_length, vocab_size=preset.vocab_size)
        seed = (args.seed + seed_offset) * 1000 + dp_rank
        return MockDataSource(task, args.seq_length, args.micro_batch_size, seed, mask_kind, device)
    from megatron_focusft.data.blend import DataBlend
    from megatron_focusft.data.chat import ChatDataConfig, load_chat_samples
    from megatron_focusft.data.packing import PackingConfig
    from megatron_focusft.data.tokenizer import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > preset.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{preset.vocab_size}: set --vocab-size >= {tokenizer.vocab_size}")
    blend = DataBlend.parse(args.data_path)
    forms = needs.sample_forms(tokenizer, args.seq_length) if needs.sample_forms is not None else None
    samples = load_chat_samples(ChatDataConfig(blend.paths, args.seq_length, args.bad_sample_policy,
                                               args.data_cache_dir), tokenizer, log=log if seed_offset == 0 else None,
                                forms=forms)
    packing = PackingConfig(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                            seed=args.seed + seed_offset, mask_kind=mask_kind)
    return ChatDataSource(samples, packing, dp_rank, dp_size, device, blend)


# Settings a resumed run must share with the run that saved the checkpoint
# (and the method's own: TrainingMethod.resume_keys). --train-iters may change (the LR schedule
# rules of lr_schedule.py decide what that does).
_RESUME_KEYS = ("training_mode", "seq_length", "micro_batch_size", "global_batch_size", "mock_data", "data_path",
                "seed")
# Stats that are this rank's share of an iteration's total: summed over the data-parallel ranks.
_SUMMED = ("real_tokens",)


def _dp_mean(stats: dict[str, float]) -> dict[str, float]:
    """Token-mean loss over data- and context-parallel ranks; _SUMMED stats summed, other stats
    averaged over those ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    # Loss sums and token counts are split over data- and context-parallel ranks alike.
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) == 1:
        return stats
    keys = [k for k in stats if k not in ("loss", "num_tokens", "grad_norm")]
    values = torch.tensor([stats["loss"] * stats["num_tokens"], stats["num_tokens"], *(stats[k] for k in keys)],
                          dtype=torch.float64)
    if torch.cuda.is_available():
        values = values.cuda()
    dist.all_reduce(values, group=group)
    n = dist.get_world_size(group)
    out = {"loss": float(values[0] / values[1].clamp(min=1)), "num_tokens": int(values[1]),
           "grad_norm": stats["grad_norm"]}
    out.update({k: float(v) if k in _SUMMED else float(v) / n for k, v in zip(keys, values[2:].tolist())})
    return out


def _count_parameters(model: torch.nn.Module | list[torch.nn.Module]) -> int:
    """Parameters of the whole model: this rank's, minus tensor-parallel duplicates, summed over TP x PP."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    chunks = model if isinstance(model, list) else [model]
    local = sum(p.numel() for chunk in chunks for p in chunk.parameters() if param_is_not_tensor_parallel_duplicate(p))
    count = torch.tensor([float(local)], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
    return int(count.item())


def _mfu(tokens_per_s: float, n_params: int, device: torch.device) -> float | None:
    """Model FLOPs utilisation of the whole job: tokens_per_s is global, so the peak is every rank's."""
    import torch.distributed as dist

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in PEAK_BF16_FLOPS.items() if key in name), None)
    # 6 N FLOPs per token (dense forward + backward), the usual model-FLOPs convention.
    return None if peak is None else 6 * n_params * tokens_per_s / (peak * dist.get_world_size())


def _rng_states() -> tuple:
    """The random states a model build draws from (torch's, and on CUDA Megatron's tracker)."""
    from megatron.core import tensor_parallel

    cuda = torch.cuda.is_available()
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None,
            tensor_parallel.get_cuda_rng_tracker().get_states() if cuda else None)


def _restore_rng_states(states: tuple) -> None:
    from megatron.core import tensor_parallel

    cpu, cuda, tracker = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


@dataclass
class _Position:
    """Where a run is, for the line an interruption prints."""

    phase: str = "setup"  # "setup" | "training" | "saving"
    iteration: int = 0


def pretrain(args: argparse.Namespace, on_finish: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Train; returns a summary (losses per iteration, settings). Rank 0 logs and writes TensorBoard.

    on_finish(model) is called with the trained (DDP-wrapped) model (with virtual pipeline stages,
    the list of this rank's model chunks) before the process group and
    parallel state are torn down, e.g. to evaluate it. A SIGINT or SIGTERM (without
    --exit-signal-handler) raises TrainingInterrupted after one line naming the latest checkpoint.
    """
    position = _Position()
    with SignalHandling(args.exit_signal_handler) as signals:
        try:
            return _train(args, on_finish, signals, position)
        except TrainingInterrupted as interrupt:
            if int(os.environ.get("RANK", "0")) == 0:
                print(_interrupted_line(interrupt, position, args.save), flush=True)
            raise


def _interrupted_line(interrupt: TrainingInterrupted, position: _Position, save_dir: str | None) -> str:
    """One line: when the signal came and which checkpoint is the latest on disk now."""
    latest = latest_checkpoint(save_dir)[0] if save_dir is not None and os.path.isdir(save_dir) else None
    where = {"setup": "during setup", "training": f"during iteration {position.iteration}",
             "saving": f"while saving iteration {position.iteration} (that save "
                       f"{'completed' if latest == position.iteration else 'was discarded'})"}[position.phase]
    if save_dir is None:
        saved = "nothing was saved (no --save)"
    else:
        saved = (f"the latest checkpoint in {save_dir} is iteration {latest}" if latest is not None
                 else f"no checkpoint in {save_dir}")
    return f"{interrupt} {where}: {saved}"


def _agree_on_rank0(check: Callable[[], None]) -> None:
    """Run `check` on rank 0 and raise its SaveDirError on every rank (no rank left in a collective)."""
    import torch.distributed as dist

    box: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except SaveDirError as error:
            box = [str(error)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SaveDirError(box[0])


def _train(args: argparse.Namespace, on_finish: Callable[[Any], None] | None, signals: SignalHandling,
           position: _Position) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_focusft.analysis.attention_metrics import attention_metrics
    from megatron_focusft.attention.backends import attention_backend
    from megatron_focusft.data.cp_split import split_batch_for_cp
    from megatron_focusft.engine.checkpoint import copy_model_assets, load_checkpoint, save_checkpoint
    from megatron_focusft.engine.pipeline import (
        collect_stage_times,
        format_stage_times,
        layout_of_counts,
        num_pipeline_stages,
        schedule_timers,
        stage_layer_numbers,
    )
    from megatron_focusft.engine.setup import (
        OptimizerSetup,
        build_model_chunks,
        build_optimizer,
        model_setup_from_args,
        virtual_stages_per_rank,
    )
    from megatron_focusft.engine.train_step import train_step
    from megatron_focusft.training.methods import METHODS
    from megatron_focusft.training.starting_point import starting_point

    start = starting_point(args)  # read-only: before the process group
    with megatron_session(args.tensor_model_parallel_size, args.seed, args.context_parallel_size,
                          args.pipeline_model_parallel_size,
                          virtual_stages_per_rank(args, start.shape.num_layers)) as device:
        rank = dist.get_rank()
        log = print if rank == 0 else (lambda *a, **k: None)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        global_batch = args.global_batch_size or args.micro_batch_size * dp_size
        num_micro_batches = global_batch // (args.micro_batch_size * dp_size)  # a multiple: arguments.py
        for note in start.notes:
            log(f"model shape: {note}")
        if start.tokenizer_dir is not None and args.tokenizer_model is None and not args.mock_data:
            log(f"tokenizer: {start.tokenizer_dir} (the starting checkpoint's; --tokenizer-model overrides)")
        schedule = ResumedSchedule(LrSchedule.from_args(args))
        if start.resume_from and start.checkpoint.scheduler is not None:
            # Before anything is built: a schedule the flags do not say how to treat is refused here.
            schedule = resume_schedule(schedule.build, LrSchedule.from_state(start.checkpoint.scheduler),
                                       args.override_opt_param_scheduler, args.use_checkpoint_opt_param_scheduler)
        if schedule.note:
            log(schedule.note)
        method = METHODS[args.training_mode]
        needs = method.model(args)
        # Block sink embeddings are the method's: a checkpoint without them gets fresh ones.
        preset = dataclasses.replace(start.shape, block_sink_tokens=needs.block_sink_tokens)
        setup = model_setup_from_args(args, preset, needs.fast_weights)
        mask_kind = needs.mask_kind
        cp, cp_rank = args.context_parallel_size, parallel_state.get_context_parallel_rank()
        # CP chunks: whole flex tiles; under SP each rank's two chunks split evenly over TP.
        chunk_multiple = math.lcm(attention_backend(args.attention_backend).chunk_multiple,
                                  args.tensor_model_parallel_size if args.sequence_parallel else 1)
        probe = _build_data(args, preset, needs, start.tokenizer_dir, 0, 1, device, log,
                            seed_offset=7919).next_micro_batch()
        rng = _rng_states()
        model, model_config = build_model_chunks(setup)  # with virtual stages: this rank's chunks
        balanced = None
        if args.pipeline_balance == "auto":
            balanced = method.balance(
                args, model, probe if cp == 1 else split_batch_for_cp(probe, cp, cp_rank, chunk_multiple=chunk_multiple),
                num_micro_batches)
            log(f"pipeline balance: {balanced.description}")
            _restore_rng_states(rng)  # the model is then initialised as a run given these flags would be
            setup = dataclasses.replace(setup, pipeline_model_parallel_layout=layout_of_counts(balanced.counts))
            model, model_config = build_model_chunks(setup)
        stage_models = [chunk.module for chunk in model] if isinstance(model, list) else model.module
        pipelined = args.pipeline_model_parallel_size > 1
        if pipelined:
            model_config.timers = schedule_timers()
        n_params = _count_parameters(model)
        if args.save:
            needed = checkpoint_bytes(n_params, model_config.params_dtype)
            _agree_on_rank0(lambda: check_save_dir(args.save, needed))
        built = schedule.build
        optimizer = build_optimizer(model, OptimizerSetup(
            lr=built.max_lr, min_lr=built.min_lr, weight_decay=built.weight_decay, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, clip_grad=args.clip_grad), bf16=args.bf16)
        scheduler = built.build(optimizer)
        data = _build_data(args, preset, needs, start.tokenizer_dir, dp_rank, dp_size, device, log)
        run = method.run(args, model_config, dp_rank, preset, balanced)
        run_config = {key: getattr(args, key) for key in (*_RESUME_KEYS, *method.resume_keys)}

        def next_micro_batch():
            batch = data.next_micro_batch()
            if cp == 1:
                return batch
            # Every CP rank of a data-parallel group reads the same rows and keeps its chunks.
            return split_batch_for_cp(batch, cp, cp_rank, chunk_multiple=chunk_multiple)

        writer = None
        if args.tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(args.tensorboard_dir)
            log(f"TensorBoard: {os.path.abspath(args.tensorboard_dir)}")
        tokens_per_iter = global_batch * args.seq_length
        log(f"training {args.training_mode} ({'mask ' + mask_kind}): {preset.num_layers} layers, "
            f"{n_params / 1e6:.1f}M params, TP {args.tensor_model_parallel_size}"
            f"{' (SP)' if args.sequence_parallel else ''}, PP {args.pipeline_model_parallel_size}"
            f"{f' x {len(model)} virtual stages' if isinstance(model, list) else ''}, "
            f"CP {args.context_parallel_size}, "
            f"DP {dp_size}, "
            f"{num_micro_batches} micro-batch(es) of [{args.micro_batch_size}, {args.seq_length}] per iteration, "
            f"{args.train_iters} iterations")

        def resume_state() -> dict[str, Any]:
            return {"data": data.state_dict()}

        start_iteration = 0
        if start.resume_from:
            start_iteration, extra = load_checkpoint(start.resume_from, model, optimizer, scheduler,
                                                     run_config=run_config, iteration=args.ckpt_step)
            if schedule.after_load is not None:
                schedule.after_load.apply(scheduler, optimizer)
            data.load_state_dict(extra["data"])
            run.resume(start_iteration * num_micro_batches)
            log(f"resumed from {start.resume_from} at iteration {start_iteration}")
        elif start.weights_from:
            loaded_iteration, _ = load_checkpoint(start.weights_from, model, None, None, iteration=args.ckpt_step,
                                                  restore_rng=False)
            log(f"fine-tuning from the model weights of {start.weights_from} (its iteration {loaded_iteration}): "
                f"fresh optimizer and schedule, iteration 0")
        elif args.load:
            log(f"no checkpoint in {args.load}: starting from scratch")
        # Files that travel with the model (tokenizer, source HF config) go with its checkpoints.
        asset_source = start.tokenizer_dir or start.weights_from or start.resume_from

        def save(iteration: int) -> None:
            position.phase = "saving"
            t0 = time.perf_counter()
            save_checkpoint(args.save, iteration, model, optimizer, scheduler, resume_state(), run_config=run_config)
            if rank == 0 and asset_source:
                copy_model_assets(asset_source, args.save)
            position.phase = "training"
            log(f"saved checkpoint of iteration {iteration} to {args.save} ({time.perf_counter() - t0:.2f} s)")

        losses: list[float] = []
        history: list[dict[str, float]] = []
        t_start = time.perf_counter()
        position.phase = "training"
        for iteration in range(start_iteration + 1, args.train_iters + 1):
            position.iteration = iteration
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            micro_batches = [next_micro_batch() for _ in range(num_micro_batches)]
            stats = train_step(model, optimizer, micro_batches, run.forward_step)
            # Sample tokens (doc_ids >= 0): this rank's share, summed over the data-parallel ranks.
            stats["real_tokens"] = float(sum(int((b.doc_ids >= 0).sum()) for b in micro_batches))
            stats = _dp_mean(stats)
            scheduler.step(increment=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"iteration {iteration}: lm loss is {stats['loss']}")
            if "inner_skipped_steps" in stats:
                # train_step's mean per micro-batch (and _dp_mean's over the ranks) -> the iteration's total.
                stats["inner_skipped_steps"] = round(stats["inner_skipped_steps"] * num_micro_batches * dp_size)
            stats.update({"learning_rate": lr, "tokens_per_s": tokens_per_iter / dt,
                          "real_tokens_per_s": stats.pop("real_tokens") / dt, "iteration_s": dt})
            mfu = _mfu(stats["tokens_per_s"], n_params, device)
            if mfu is not None:
                stats["mfu"] = mfu
            # A gather over all ranks: only at log iterations (the timers sum over the interval).
            logged = iteration % args.log_interval == 0 or iteration == args.train_iters
            stage_times = collect_stage_times(model_config.timers) if pipelined and logged else []
            stats.update({f"pipeline/stage{t.stage}_busy_fraction": t.busy_fraction for t in stage_times})
            if args.attention_metrics_interval and iteration % args.attention_metrics_interval == 0:
                stats.update({f"attention/{k}": v for k, v in attention_metrics(stage_models, probe).items()})
            losses.append(stats["loss"])
            history.append({"iteration": iteration, **stats})
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(key if "/" in key else f"train/{key}", value, iteration)
            if logged:
                eta = (time.perf_counter() - t_start) / (iteration - start_iteration) * (args.train_iters - iteration)
                log(progress_line(iteration, args.train_iters, stats, eta), flush=True)
                if stage_times:
                    log(f"    pipeline: {format_stage_times(stage_times)}", flush=True)
            probe_line = attention_line(iteration, stats)
            if probe_line is not None:
                log(probe_line, flush=True)
            exiting = args.exit_interval is not None and iteration % args.exit_interval == 0
            last = iteration == args.train_iters
            saving = args.save and ((args.save_interval and iteration % args.save_interval == 0) or exiting or last)
            if saving:
                save(iteration)
            if args.exit_signal_handler and signals.stop_requested(device):
                if args.save and not saving:
                    save(iteration)
                log(f"SIGTERM received: stopping after iteration {iteration}; "
                    + (f"the latest checkpoint in {args.save} is iteration {iteration}" if args.save
                       else "nothing was saved (no --save)"), flush=True)
                break
            if exiting and not last:
                log(f"exit interval reached at iteration {iteration}")
                break
        if writer is not None:
            writer.close()
        if on_finish is not None:
            on_finish(model)
        stage_layers = [len(stage_layer_numbers(model_config, s)) for s in range(num_pipeline_stages(model_config))]
        return {"losses": losses, "history": history, "args": vars(args), "start_iteration": start_iteration,
                "stage_layers": stage_layers}


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: flag errors exit 2 (argparse); the errors a run reports to its user
    (checkpoints, --save, data, flags against a checkpoint: ValueError, and a non-finite loss)
    print one line and exit 1; an interruption exits 128 + its signal (the line saying what was
    saved is printed already)."""
    args = parse_training_args(argv)
    try:
        summary = pretrain(args)
    except TrainingInterrupted as interrupt:
        return interrupt.exit_code
    except (CheckpointError, CheckpointSaveError, SaveDirError, ValueError, FloatingPointError) as error:
        print(f"pretrain_focusft.py: error: {error}", file=sys.stderr, flush=True)
        return 1
    if args.tensorboard_dir:
        os.makedirs(args.tensorboard_dir, exist_ok=True)
        with open(os.path.join(args.tensorboard_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=1, default=str)
    return 0
