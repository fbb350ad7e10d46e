"""Checkpoints in Megatron's distributed format (torch_dist), committed so that a crash never
leaves one that loads as valid.

Layout of a checkpoint directory::

    <dir>/iter_0000010/                        Megatron dist_checkpointing files (every rank writes
                                               its shards; `metadata.json` last)
    <dir>/iter_0000010/focusft_complete.json   completion marker, written after every rank is done
    <dir>/latest_checkpointed_iteration.txt    tracker: the committed iteration, written last
    <dir>/model_assets/                        optional: files that travel with the model (the
                                               source HF config.json, tokenizer files), copied
                                               by `copy_model_assets`

Save protocol (every rank calls `save_checkpoint`): clear a leftover directory of the same
iteration, write the sharded state with `dist_checkpointing.save`, barrier, rank 0 writes the
marker, barrier, rank 0 replaces the tracker, barrier. Both files are written to a temporary
name, fsynced and renamed with `os.replace`, so each is either the old or the new file. A run
killed at any point leaves the tracker on the previous complete checkpoint.

The writer: megatron-core's synchronous torch_dist save writes from this process (its threads)
but collects the results through a queue of a `multiprocessing` Manager, a spawned server
process that re-imports `__main__` (seconds, most of a GB) and is not tied to this one: a
trainer killed with any signal left it running under PID 1. `save_checkpoint` hands megatron-core
a plain in-process queue instead (`_write_results_in_this_process`), so a save starts no process.

A save that fails or is interrupted (any exception, KeyboardInterrupt, a signal raised as an
exception) before its commit removes its partial directory on rank 0, so the previous
checkpoint stays in charge; a failure is re-raised as CheckpointSaveError naming the directory
and the reason, "no space left on device" with the bytes needed and free when the disk is full
(engine/disk_space.py).

Which checkpoint `load_checkpoint` takes: the tracker's iteration if its directory carries the
marker. Otherwise, with a printed reason, the newest marked directory below it (the tracker named
a directory that is missing or incomplete), or the newest marked directory when there is no
tracker. Marked directories above the tracker are saves that finished writing but were never
committed (killed between marker and tracker); they are skipped, with a message, and the next
save of that iteration replaces them. A tracker that is not an integer is an error: it is only
ever written atomically, so a bad one means something else is wrong. No directory, or one
without a tracker and without marked iterations: no checkpoint (None). A marked checkpoint that
fails to load (a truncated or missing `.distcp`, `.metadata` or common state) is skipped with a
warning naming it and why, and the next older marked one is tried (`checkpoint_candidates`);
every rank agrees on each outcome, so all ranks load the same iteration. A checkpoint asked for
by `iteration=` never falls back.

What a checkpoint holds:
- the model's `sharded_state_dict()` and the optimizer's `sharded_state_dict(model_sd)`, so it
  reloads at another tensor-parallel size (Megatron reshards);
- common state (rank 0's copy; it must be the same on every rank): iteration, scheduler state,
  the model's shape (models.presets.ModelPreset: checked on load, and read by
  `read_checkpoint_info` to build a model without a preset), its parameter dtype, the
  parallel layout, the caller's `run_config` (checked
  on load when given there too) and the caller's `extra_state`;
- each rank's RNG states (torch CPU, CUDA when present, Megatron's CUDA RNG tracker, python
  `random`, numpy), restored only when the parallel layout is unchanged.

Fast weights are never saved: they are not parameters, and the fast-weight linears keep their
base parameter names and sharded state dict.

Data position contract: the checkpoint does not know the data pipeline. The caller puts its
position into `extra_state` (plain Python values or tensors; the same on every rank, so store
the global position, not a rank's shard of it) and rebuilds the stream from it after loading:
- chat data (training/data_source.ChatDataSource): (epoch, micro-batches consumed in that
  epoch); repack that epoch and skip that many micro-batches.
- `synthetic.RetrievalPacker`: it cannot report its state, so store the number of
  `next_rows()` calls made; rebuild the packer with the same arguments and seed and call
  `next_rows()` that many times (deterministic, so the rows continue exactly).
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import CheckpointException

from megatron_focusft.engine import disk_space
from megatron_focusft.engine.errors import short_error, wrapped_interrupt
from megatron_focusft.models.block_sinks import STATE_PREFIX as BLOCK_SINKS_PREFIX
from megatron_focusft.models.gpt import model_shape
from megatron_focusft.models.presets import ModelPreset

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MARKER_FILE = "focusft_complete.json"
FORMAT_VERSION = 2
ASSETS_DIR = "model_assets"
# What model_assets may hold: the source HF config and the files a tokenizer and generation need.
MODEL_ASSET_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                     "chat_template.json", "generation_config.json")
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_RNG_KEY = "focusft_rng_state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: the message names the path and the problem."""


class CheckpointDamaged(CheckpointError):
    """A marked checkpoint whose files cannot be read (truncated, missing): loading falls back."""


class CheckpointSaveError(RuntimeError):
    """A save that failed: the message names the directory, the reason and what stays latest."""


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer | None,
    scheduler: OptimizerParamScheduler | None,
    extra_state: Mapping[str, Any] | None = None,
    *,
    run_config: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save and commit the checkpoint of `iteration` (collective: every rank calls it).

    model: the Megatron DDP model (or the bare MegatronModule), or a rank's list of model chunks
    (virtual pipeline stages). optimizer / scheduler may be None (not saved). extra_state: the caller's state, e.g. the data position (module doc).
    run_config: the run's settings, compared on load. keep_last: after committing, delete all
    but the newest `keep_last` complete checkpoints (and incomplete leftovers older than this
    one). Returns the iteration directory.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    extra_state = dict(extra_state or {})
    run_config = dict(run_config) if run_config is not None else None
    _check_same_on_all_ranks({"extra_state": extra_state, "run_config": run_config})
    _check_serialisable(extra_state, "extra_state")
    _check_serialisable(run_config, "run_config")

    rank = dist.get_rank()
    save_dir = Path(save_dir)
    target = iteration_dir(save_dir, iteration)
    modules = _modules(model)
    module = modules[0]
    model_sd = _nest([m.sharded_state_dict() for m in modules])
    state: dict[str, Any] = {
        "model": model_sd,
        "focusft": {
            "format": FORMAT_VERSION,
            "iteration": iteration,
            "model_shape": model_shape(module).to_dict(),
            "params_dtype": str(module.config.params_dtype),
            "layout": _parallel_layout(),
            "run_config": run_config,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "has_optimizer": optimizer is not None,
            "extra_state": extra_state,
        },
        _RNG_KEY: _rng_sharded_object(_rng_state()),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    committed = False
    try:
        if rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            if target.exists():
                # A leftover of an earlier (maybe crashed) save of this iteration: unmark it first so
                # that a crash during the removal cannot leave a marked, partial directory.
                _remove_checkpoint_dir(target)
            target.mkdir()
        dist.barrier()
        _write_results_in_this_process()
        # Synchronous torch_dist save; returns after every rank's files and metadata.json are
        # written and a barrier.
        dist_checkpointing.save(state, str(target))
        if rank == 0:
            _write_marker(target, iteration)
        dist.barrier()
        if rank == 0:
            _write_tracker(save_dir, iteration)
            committed = True
            if keep_last is not None:
                _apply_retention(save_dir, iteration, keep_last)
        dist.barrier()
    except BaseException as error:
        # Interrupts (KeyboardInterrupt, a signal raised as an exception; also when torch wrapped
        # them) propagate unchanged after the cleanup; failures become one CheckpointSaveError.
        interrupt = wrapped_interrupt(error)
        failure = interrupt is None
        if failure:  # diagnosed before the partial files are removed, while the disk is still full
            needed = _bytes_to_write(state)
            reason = (f"no space left on device: it needs about {needed:,} bytes, "
                      f"{disk_space.free_bytes(save_dir):,} bytes were free"
                      if disk_space.out_of_space(error, save_dir, needed) else short_error(error))
        if rank == 0 and not committed and target.exists():
            _remove_checkpoint_dir(target)
        if interrupt is error:
            raise
        if interrupt is not None:
            raise interrupt from None
        latest = _latest_or_none(save_dir)
        kept = (f"the checkpoint of iteration {latest} stays the latest" if latest is not None
                else "no earlier checkpoint exists there")
        raise CheckpointSaveError(f"saving the checkpoint of iteration {iteration} to {target} failed: {reason}; "
                                  f"its partial directory was removed and {kept}") from error
    return target


def _write_results_in_this_process() -> None:
    """Give megatron-core's writer an in-process results queue (module doc: the writer).

    The synchronous save puts and gets its results in this process, so a `queue.Queue` serves it;
    megatron-core creates its Manager only while the module's queue is still None.
    """
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def _bytes_to_write(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors this rank writes (main replicas of its shards)."""
    return sum(value.data.numel() * value.data.element_size() for value in nested_values(state)
               if isinstance(value, ShardedTensor) and value.data is not None and is_main_replica(value.replica_id))


def _latest_or_none(save_dir: Path) -> int | None:
    try:
        return latest_checkpoint(save_dir)[0]
    except CheckpointError:
        return None


def _write_marker(directory: Path, iteration: int) -> None:
    _write_atomic(directory / MARKER_FILE, json.dumps(
        {"iteration": iteration, "world_size": dist.get_world_size(), "format": FORMAT_VERSION}))


def _write_tracker(save_dir: Path, iteration: int) -> None:
    _write_atomic(save_dir / TRACKER_FILE, f"{iteration}\n")


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, rename over `path`, fsync the directory: readers see the
    old or the new content, never a partial one, also after a power loss."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_checkpoint_dir(directory: Path) -> None:
    (directory / MARKER_FILE).unlink(missing_ok=True)
    _fsync_dir(directory)
    shutil.rmtree(directory)


def _apply_retention(save_dir: Path, current: int, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to `current`; drop older complete ones
    and incomplete leftovers below `current`. Directories above `current` are left alone."""
    dirs = _iteration_dirs(save_dir)
    complete = sorted((i for i in dirs if i <= current and _is_complete(dirs[i], i)), reverse=True)
    keep = set(complete[:keep_last])
    for i, path in dirs.items():
        if i < current and i not in keep:
            _remove_checkpoint_dir(path)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def load_checkpoint(
    load_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer | None,
    scheduler: OptimizerParamScheduler | None,
    *,
    run_config: Mapping[str, Any] | None = None,
    iteration: int | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, Any]] | None:
    """Load the latest committed checkpoint of `load_dir` (module doc) into model, optimizer
    and scheduler, and restore the RNG states; collective.

    Returns (iteration, extra_state), or None when `load_dir` holds no checkpoint. A checkpoint
    whose files fail to load is skipped, with a warning, for the next older complete one; one
    asked for by `iteration` must be complete and load. `run_config`, when given, must equal the
    saved one. optimizer = scheduler = None and restore_rng = False load the model weights only
    (fine-tuning from it; the saved parameters are cast to the model's dtype).
    Raises CheckpointError naming the path and the problem for a corrupt or mismatched one.
    """
    candidates = _agree_on_candidates(Path(load_dir), iteration)
    modules = _modules(model)
    for index, chosen in enumerate(candidates):
        try:
            extra = _load_one(iteration_dir(load_dir, chosen), modules, optimizer, scheduler, run_config, restore_rng)
        except CheckpointDamaged as damage:
            if index + 1 == len(candidates):
                older = " (no older complete checkpoint to fall back to)" if iteration is None else ""
                raise CheckpointDamaged(f"{damage}{older}") from damage
            if dist.get_rank() == 0:
                print(f"checkpoint: WARNING: {damage}; falling back to iteration {candidates[index + 1]}", flush=True)
            continue
        return chosen, extra
    return None


def _load_one(path: Path, modules: list[torch.nn.Module], optimizer: MegatronOptimizer | None,
              scheduler: OptimizerParamScheduler | None, run_config: Mapping[str, Any] | None,
              restore_rng: bool) -> dict[str, Any]:
    """Load one checkpoint directory into a rank's model (its chunks); CheckpointDamaged (on every
    rank) when its files fail to read."""
    damage = None
    try:
        meta = _read_meta(path)
    except CheckpointDamaged as error:
        damage = error
    _raise_if_damaged_anywhere(damage)
    _check_compatible(path, meta, modules[0], optimizer, scheduler, run_config)

    model_sds = [m.sharded_state_dict() for m in modules]
    fresh = [_fresh_keys(meta, m, sd) if optimizer is None else [] for m, sd in zip(modules, model_sds)]
    request: dict[str, Any] = {"model": _nest([{k: v for k, v in sd.items() if k not in keys}
                                              for sd, keys in zip(model_sds, fresh)])}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(_nest(model_sds), is_loading=True)
    same_layout = meta["layout"] == _parallel_layout()
    if same_layout and restore_rng:
        request[_RNG_KEY] = _rng_sharded_object(_rng_state())
    elif restore_rng and dist.get_rank() == 0:
        print(f"checkpoint {path}: saved with parallel layout {meta['layout']}, now {_parallel_layout()}: "
              f"model and optimizer are resharded, RNG states are not restored", flush=True)
    try:
        state = dist_checkpointing.load(request, str(path))
    # torch's CheckpointException (damaged files) derives from BaseException, not Exception.
    except (Exception, CheckpointException) as error:
        interrupt = wrapped_interrupt(error)
        if interrupt is not None:  # a signal during the load, not a damaged checkpoint
            raise interrupt from None
        damage = CheckpointDamaged(f"checkpoint {path} cannot be loaded: {short_error(error)}")
    _raise_if_damaged_anywhere(damage)
    try:
        loaded = [state["model"]] if len(modules) == 1 else [state["model"][f"model{v}"] for v in range(len(modules))]
        for module, module_state, keys in zip(modules, loaded, fresh):
            if keys:
                missing, unexpected = module.load_state_dict(module_state, strict=False)
                if sorted(missing) != sorted(keys) or unexpected:
                    raise ValueError(f"missing keys {missing} (expected only {keys}), unexpected keys {unexpected}")
            else:
                module.load_state_dict(module_state)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            # After the optimizer: the scheduler writes the restored lr and wd into its param groups.
            scheduler.load_state_dict(meta["scheduler"])
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: applying the saved state failed: {short_error(error)}") from error
    if same_layout and restore_rng:
        _set_rng_state(state[_RNG_KEY])
    return meta["extra_state"]


def _fresh_keys(meta: dict, module: torch.nn.Module, model_sd: Mapping[str, Any]) -> list[str]:
    """Weights a weights-only load keeps at their initial values: block sink embeddings the
    checkpoint has none of (a block-attention run fine-tuning a model saved without them)."""
    saved = ModelPreset.from_dict(meta["model_shape"]).block_sink_tokens
    if saved or not model_shape(module).block_sink_tokens:
        return []
    return [key for key in model_sd if key.startswith(BLOCK_SINKS_PREFIX)]


def _raise_if_damaged_anywhere(damage: CheckpointDamaged | None) -> None:
    """Every rank learns whether any rank found the checkpoint damaged (the first such rank's
    message), so that all ranks fall back together instead of some entering a collective load."""
    if dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, None if damage is None else str(damage))
        first = next((message for message in gathered if message is not None), None)
        damage = None if first is None else CheckpointDamaged(first)
    if damage is not None:
        raise damage


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, read without building a model."""

    path: Path
    iteration: int
    shape: ModelPreset
    run_config: dict[str, Any] | None  # the saving run's settings (None: not a training run's)
    scheduler: dict[str, Any] | None  # the LR scheduler's state (None: saved without one)


def read_checkpoint_info(load_dir: str | os.PathLike, iteration: int | None = None) -> CheckpointInfo | None:
    """The checkpoint `load_checkpoint` would take (or `iteration`), None when there is none;
    read from this process's view of the filesystem, no collective. Without `iteration`, one
    whose common state is unreadable is passed over as load_checkpoint passes over it."""
    if iteration is not None:
        path = iteration_dir(load_dir, iteration)
        if not _is_complete(path, iteration):
            raise CheckpointError(f"checkpoint {path} is missing or incomplete (no valid {MARKER_FILE})")
        candidates = [iteration]
    else:
        candidates, _ = checkpoint_candidates(load_dir)
    for index, chosen in enumerate(candidates):
        path = iteration_dir(load_dir, chosen)
        try:
            meta = _read_meta(path)
        except CheckpointDamaged:
            if index + 1 == len(candidates):
                raise
            continue
        return CheckpointInfo(path, chosen, ModelPreset.from_dict(meta["model_shape"]), meta["run_config"],
                              meta["scheduler"])
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    # torch's CheckpointException (damaged files) derives from BaseException, not Exception.
    except (Exception, CheckpointException) as e:
        interrupt = wrapped_interrupt(e)
        if interrupt is not None:
            raise interrupt from None
        raise CheckpointDamaged(f"checkpoint {path} cannot be loaded: its common state is unreadable: "
                                f"{short_error(e)}") from e
    if "focusft" not in common:
        raise CheckpointError(f"checkpoint {path} was not written by megatron_focusft (no 'focusft' common state)")
    meta = common["focusft"]
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {meta.get('format')}, this code reads {FORMAT_VERSION}")
    return meta


def copy_model_assets(source: str | os.PathLike, save_dir: str | os.PathLike) -> None:
    """Copy MODEL_ASSET_FILES into `save_dir`/model_assets (once: an existing folder is kept).
    `source` is a checkpoint directory (its model_assets folder is copied, if it has one) or
    a folder holding such files (e.g. a tokenizer directory). Rank 0 only."""
    source, target = Path(source), Path(save_dir) / ASSETS_DIR
    if target.exists():
        return
    folder = source / ASSETS_DIR if (source / ASSETS_DIR).is_dir() else source
    files = [folder / name for name in MODEL_ASSET_FILES if (folder / name).is_file()]
    if not files:
        return
    stage = target.with_name(f".{ASSETS_DIR}.partial{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, stage / f.name)
    os.replace(stage, target)


def latest_checkpoint(load_dir: str | os.PathLike) -> tuple[int | None, list[str]]:
    """(iteration to load or None, notes explaining any fallback) for `load_dir`, read from this
    process's view of the filesystem. Raises CheckpointError for an unusable tracker."""
    load_dir = Path(load_dir)
    notes: list[str] = []
    if not load_dir.is_dir():
        return None, notes
    dirs = _iteration_dirs(load_dir)
    complete = sorted(i for i, p in dirs.items() if _is_complete(p, i))
    tracker = load_dir / TRACKER_FILE
    if not tracker.exists():
        if complete:
            notes.append(f"{load_dir}: no {TRACKER_FILE}; using the newest complete checkpoint, "
                         f"iteration {complete[-1]}")
            return complete[-1], notes
        if dirs:
            notes.append(f"{load_dir}: no {TRACKER_FILE} and no complete checkpoint "
                         f"(incomplete: {sorted(dirs)}); starting from scratch")
        return None, notes
    text = tracker.read_text().strip()
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"checkpoint tracker {tracker} is corrupt: {text[:80]!r} is not an iteration "
                              f"number; fix it or delete it to use the newest complete checkpoint "
                              f"(complete: {complete or 'none'})")
    committed = int(text)
    uncommitted = [i for i in complete if i > committed]
    if uncommitted:
        notes.append(f"{load_dir}: skipping iteration(s) {uncommitted}: written but never committed "
                     f"to {TRACKER_FILE} (run killed during the save)")
    if committed in complete:
        return committed, notes
    older = [i for i in complete if i < committed]
    state = "missing" if committed not in dirs else f"incomplete (no {MARKER_FILE})"
    if not older:
        raise CheckpointError(f"{tracker} names iteration {committed}, whose directory "
                              f"{iteration_dir(load_dir, committed)} is {state}, and no older complete "
                              f"checkpoint exists")
    notes.append(f"{iteration_dir(load_dir, committed)} is {state}; using the newest complete checkpoint "
                 f"before it, iteration {older[-1]}")
    return older[-1], notes


def checkpoint_candidates(load_dir: str | os.PathLike) -> tuple[list[int], list[str]]:
    """The iterations to try, newest first: latest_checkpoint's choice, then every older
    complete one (the fallbacks past a damaged checkpoint); with latest_checkpoint's notes."""
    chosen, notes = latest_checkpoint(load_dir)
    if chosen is None:
        return [], notes
    dirs = _iteration_dirs(Path(load_dir))
    older = sorted((i for i, p in dirs.items() if i < chosen and _is_complete(p, i)), reverse=True)
    return [chosen, *older], notes


def _agree_on_candidates(load_dir: Path, iteration: int | None) -> list[int]:
    """Rank 0 lists the checkpoints to try and every rank takes its answer (or its error), so
    that ranks never load different iterations."""
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            if iteration is None:
                candidates, notes = checkpoint_candidates(load_dir)
                for note in notes:
                    print(f"checkpoint: {note}", flush=True)
            else:
                path = iteration_dir(load_dir, iteration)
                if not _is_complete(path, iteration):
                    raise CheckpointError(f"checkpoint {path} is missing or incomplete (no valid {MARKER_FILE})")
                candidates = [iteration]
            answer = [("ok", candidates)]
        except CheckpointError as e:
            answer = [("error", str(e))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _check_compatible(path: Path, meta: dict, module: torch.nn.Module, optimizer: MegatronOptimizer | None,
                      scheduler: OptimizerParamScheduler | None, run_config: Mapping[str, Any] | None) -> None:
    saved_shape = ModelPreset.from_dict(meta["model_shape"])
    if optimizer is None and scheduler is None:
        # Weights only: the weights must fit; RoPE, norm epsilon and the position limit may change.
        # Sinks the checkpoint has none of start fresh (_fresh_keys).
        saved_weights = saved_shape.weight_shape()
        if saved_weights["block_sink_tokens"] == 0:
            saved_weights["block_sink_tokens"] = model_shape(module).block_sink_tokens
        problems = _diff(saved_weights, model_shape(module).weight_shape(), "model.")
    else:
        problems = _diff(meta["model_shape"], model_shape(module).to_dict(), "model.")
    if optimizer is not None and meta["params_dtype"] != str(module.config.params_dtype):
        problems.append(f"params_dtype: saved {meta['params_dtype']}, now {module.config.params_dtype} (resuming "
                        f"needs the same dtype; load the weights only to change it)")
    if run_config is not None and meta["run_config"] is not None:
        # Saved keys the caller does not check (any more) are not compared: a resumed run may
        # change them (e.g. extend train_iters).
        saved = {key: value for key, value in meta["run_config"].items() if key in run_config}
        problems += _diff(saved, dict(run_config), "run_config.")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this run: " + "; ".join(problems))
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointError(f"checkpoint {path} has no optimizer state; pass optimizer=None to load the "
                              f"model only")
    if scheduler is not None and meta["scheduler"] is None:
        raise CheckpointError(f"checkpoint {path} has no scheduler state; pass scheduler=None")


def _diff(saved: Any, now: Any, prefix: str) -> list[str]:
    """'key: saved X, now Y' for every differing leaf of two nested dicts."""
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            if key not in now:
                out.append(f"{prefix}{key}: saved {saved[key]!r}, now absent")
            elif key not in saved:
                out.append(f"{prefix}{key}: absent in the checkpoint, now {now[key]!r}")
            else:
                out += _diff(saved[key], now[key], f"{prefix}{key}.")
        return out
    return [] if _same(saved, now) else [f"{prefix.rstrip('.')}: saved {saved!r}, now {now!r}"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return not _diff(a, b, "")
    return type(a) is type(b) and a == b


def _iteration_dirs(directory: Path) -> dict[int, Path]:
    out = {}
    for child in directory.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and child.is_dir():
            out[int(match.group(1))] = child
    return out


def _is_complete(directory: Path, iteration: int) -> bool:
    """The marker exists, parses and names this iteration (it is written atomically, after
    every rank finished writing)."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("iteration") == iteration


# ---------------------------------------------------------------------------------------------
# State pieces
# ---------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP: its state-dict keys are the model's own (no `module.` prefix),
    as in Megatron's checkpoints."""
    return unwrap_model(model)


def _modules(model: torch.nn.Module | list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The GPTModels of a rank: one, or one per model chunk (virtual pipeline stages), in order."""
    return [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _nest(per_chunk: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's (sharded) state dict, or Megatron's {"model0": ..., "model1": ...} for chunks.
    The sharded keys hold global layer numbers either way, so a checkpoint loads into any layout."""
    return per_chunk[0] if len(per_chunk) == 1 else {f"model{v}": sd for v, sd in enumerate(per_chunk)}


def _parallel_layout() -> dict[str, int]:
    layout = {
        "world_size": dist.get_world_size(),
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "context": parallel_state.get_context_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }
    virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if virtual is not None:  # only then: checkpoints saved before the key existed keep their layout
        layout["virtual"] = virtual
    return layout


def _rng_state() -> dict[str, Any]:
    # numpy's key array becomes a tensor: the common state and sharded objects are read back
    # with torch.load(weights_only=True), which refuses numpy arrays.
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state["megatron_tracker"]:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(state: dict[str, Any]) -> ShardedObject:
    """One entry per global rank: TP ranks may hold different RNG streams (Megatron's tracker)."""
    return ShardedObject(_RNG_KEY, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _check_serialisable(value: Any, name: str) -> None:
    """Fail at save time, not at load time: the common state is read with weights_only=True."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise TypeError(f"{name} must hold only plain Python values (dict, list, tuple, str, int, float, "
                        f"bool, None) and tensors: {e}") from e


def _check_same_on_all_ranks(values: Mapping[str, Any]) -> None:
    """Only rank 0's copy is stored, so a rank-dependent value would be lost silently. Every rank
    learns the outcome, so all raise together instead of leaving the others in a barrier."""
    if dist.get_world_size() == 1:
        return
    received: list[Any] = [dict(values) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(received, src=0)
    problems = _diff(received[0], dict(values), "")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    bad = {rank: p for rank, p in enumerate(gathered) if p}
    if bad:
        rank, problems = next(iter(bad.items()))
        raise ValueError(f"{', '.join(sorted({k.split('.')[0] for k in problems}))} differ between rank 0 and "
                         f"rank(s) {sorted(bad)} (rank {rank}: {'; '.join(problems)}). They are stored once, so "
                         f"they must describe the global state (e.g. the global data position)")
