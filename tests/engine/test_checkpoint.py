"""Distributed checkpoints: a resumed run reproduces the uninterrupted one (TP = 1 and 2), commits
are crash-safe (marker + tracker), bad checkpoints give clear errors, fast weights stay out."""

from __future__ import annotations

import copy
import errno
import functools
import os
import random
import re
import shutil

import pytest
import torch

from megatron_focusft.data.batch import make_batch
from megatron_focusft.data.synthetic import RetrievalPacker, RetrievalTaskConfig
from megatron_focusft.engine import checkpoint
from megatron_focusft.engine.checkpoint import (
    MARKER_FILE,
    TRACKER_FILE,
    CheckpointError,
    iteration_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers.noise_band import assert_curve_within, measured_band, perturb_by_one_ulp

SEQ = 64
ROWS = 2  # rows per micro-batch
MICRO = 2  # micro-batches per optimizer step
STEPS = 6
DATA_SEED = 11
LR = 1e-3


def _setup(seed: int, tp: int = 1, fast_weights=None, preset: str = "tiny"):
    """Fresh model (initialised from `seed`), optimizer and a warmup + cosine scheduler (the lr
    changes every step, so a scheduler that is not restored shows in the losses)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_focusft.engine.setup import ModelSetup, OptimizerSetup, build_model, build_optimizer
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel(tp=tp, seed=seed)
    model, _ = build_model(ModelSetup(preset=preset, tensor_model_parallel_size=tp, fast_weights=fast_weights))
    optimizer = build_optimizer(model, OptimizerSetup(lr=LR, min_lr=LR / 10))
    # lr by scheduler step 0..5: 1e-4, 1e-3, 9.1e-4, 6.9e-4, 4.1e-4, 1.9e-4 (no two equal, so a
    # scheduler that restarts after loading changes the losses).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=LR / 10, max_lr=LR, min_lr=LR / 10, lr_warmup_steps=1, lr_decay_steps=STEPS,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=STEPS, wd_incr_style="constant")
    return model, optimizer, scheduler


def _packer(rows_consumed: int = 0) -> RetrievalPacker:
    """The data stream after `rows_consumed` next_rows() calls: the packer cannot report its
    position, so a resumed run replays it (checkpoint module doc)."""
    packer = RetrievalPacker(RetrievalTaskConfig.fitting(SEQ), SEQ, ROWS, seed=DATA_SEED)
    for _ in range(rows_consumed):
        packer.next_rows()
    return packer


def _train(model, optimizer, scheduler, packer: RetrievalPacker, steps: int) -> list[float]:
    from megatron_focusft.engine.train_step import train_step
    from megatron_focusft.sft import sft_forward_step

    losses = []
    for _ in range(steps):
        batches = []
        for _ in range(MICRO):
            rows = packer.next_rows()
            batches.append(make_batch(rows.tokens, rows.doc_ids, rows.response, mask_kind="focusft"))
        losses.append(train_step(model, optimizer, batches, sft_forward_step)["loss"])
        scheduler.step(1)
    return losses


def _same(a, b) -> bool:
    """Exact equality of nested containers of tensors and Python values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _snapshot(model, optimizer, scheduler) -> dict:
    return copy.deepcopy({"model": {k: v for k, v in model.module.state_dict().items() if "_extra_state" not in k},
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "rng": (torch.get_rng_state(), random.getstate())})


def _resume_vs_uninterrupted(save_dir: str, tp: int) -> dict:
    """On every rank. Uninterrupted: 6 steps, with a save after step 3 that is checked to leave
    every state untouched (so the curve is that of a run without it). Resumed: a model from
    another seed, RNGs scrambled, load, steps 4-6."""
    model, optimizer, scheduler = _setup(seed=1, tp=tp)
    packer = _packer()
    full = _train(model, optimizer, scheduler, packer, STEPS // 2)
    before = _snapshot(model, optimizer, scheduler)
    save_checkpoint(save_dir, STEPS // 2, model, optimizer, scheduler, {"rows_consumed": MICRO * (STEPS // 2)},
                    run_config={"tp": tp, "lr": LR})
    save_is_read_only = _same(before, _snapshot(model, optimizer, scheduler))
    draws_after_save = (torch.rand(3), random.random())
    saved_weight = next(model.parameters()).detach().clone()
    full += _train(model, optimizer, scheduler, packer, STEPS - STEPS // 2)
    full_final_lr = [g["lr"] for g in optimizer.param_groups]

    model, optimizer, scheduler = _setup(seed=2, tp=tp)
    fresh_differs = not torch.equal(next(model.parameters()), saved_weight)
    torch.manual_seed(1234)
    random.seed(1234)
    iteration, extra = load_checkpoint(save_dir, model, optimizer, scheduler, run_config={"tp": tp, "lr": LR})
    rng_restored = torch.equal(torch.rand(3), draws_after_save[0]) and random.random() == draws_after_save[1]
    resumed = _train(model, optimizer, scheduler, _packer(extra["rows_consumed"]), STEPS - STEPS // 2)
    return {"full": full, "resumed": full[:STEPS // 2] + resumed, "iteration": iteration,
            "final_lr": (full_final_lr, [g["lr"] for g in optimizer.param_groups]),
            "fresh_differs": fresh_differs, "rng_restored": rng_restored, "save_is_read_only": save_is_read_only}


def _check_resume(out: dict) -> None:
    assert out["save_is_read_only"] and out["fresh_differs"] and out["rng_restored"]
    assert out["iteration"] == STEPS // 2
    assert out["final_lr"][0] == out["final_lr"][1]
    assert out["resumed"] == out["full"], (out["resumed"], out["full"])  # bitwise


def test_resume_equals_uninterrupted_tp1(single_rank, tmp_path):
    _check_resume(_resume_vs_uninterrupted(str(tmp_path), tp=1))


def test_resume_equals_uninterrupted_tp2_and_reshards_to_tp1(single_rank, worker_pool, tmp_path, capsys):
    per_rank = worker_pool(2).run(_resume_vs_uninterrupted, str(tmp_path), 2)
    for out in per_rank:
        _check_resume(out)
    assert per_rank[0]["full"] == per_rank[1]["full"]
    # The TP = 2 checkpoint loads at TP = 1 (Megatron reshards model and optimizer; RNG states
    # belong to the old layout and are skipped, with a message). TP = 1 sums in another order,
    # hence a tolerance: the TP = 1 continuation's own noise band (tests/helpers/noise_band.py).
    def resume_at_tp1(perturb_seed: int | None) -> list[float]:
        model, optimizer, scheduler = _setup(seed=3, tp=1)
        iteration, extra = load_checkpoint(tmp_path, model, optimizer, scheduler)
        assert iteration == STEPS // 2
        if perturb_seed is not None:
            perturb_by_one_ulp(model, perturb_seed)
        return _train(model, optimizer, scheduler, _packer(extra["rows_consumed"]), STEPS - iteration)

    resumed, band = measured_band(resume_at_tp1)
    assert "RNG states are not restored" in capsys.readouterr().out
    assert_curve_within(resumed, per_rank[0]["full"][STEPS // 2:], band, "TP 2 -> TP 1 resumed loss")


# --- Crash safety -----------------------------------------------------------------------------


@pytest.fixture
def trained(single_rank):
    """A model, optimizer and scheduler after one step (so the optimizer has state)."""
    model, optimizer, scheduler = _setup(seed=1)
    _train(model, optimizer, scheduler, _packer(), 1)
    return model, optimizer, scheduler


class Killed(BaseException):
    """The process dying (a BaseException, like SystemExit: no `except Exception` stops it)."""


def _boom(*args, **kwargs):
    raise Killed


def _killed_outright_at(patch: pytest.MonkeyPatch, step: str) -> None:
    """The process dies at `step` of a save without running any cleanup (kill -9)."""
    patch.setattr(checkpoint, step, _boom)
    patch.setattr(checkpoint, "_remove_checkpoint_dir", lambda directory: None)


def test_crash_before_marker_leaves_previous_checkpoint(trained, tmp_path, monkeypatch, capsys):
    model, optimizer, scheduler = trained
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"at": 3})
    with monkeypatch.context() as m:
        # Interrupted after every rank wrote its data files, before the marker and the tracker:
        # the save removes its partial directory on the way out.
        m.setattr(checkpoint, "_write_marker", _boom)
        with pytest.raises(Killed):
            save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"at": 6})
    assert not iteration_dir(tmp_path, 6).exists()
    assert (tmp_path / TRACKER_FILE).read_text().strip() == "3"
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (3, {"at": 3})

    # A process killed outright (kill -9) runs no cleanup: its data files stay, unmarked.
    with monkeypatch.context() as m:
        _killed_outright_at(m, "_write_marker")
        with pytest.raises(Killed):
            save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"at": 6})
    partial = iteration_dir(tmp_path, 6)
    assert any(partial.glob("*.distcp")) and not (partial / MARKER_FILE).exists()
    # An unmarked directory is never loaded: asked for by name ...
    with pytest.raises(CheckpointError, match=r"iter_0000006 is missing or incomplete"):
        load_checkpoint(tmp_path, model, optimizer, scheduler, iteration=6)
    # ... nor when the tracker names it: the newest complete one before it is used.
    (tmp_path / TRACKER_FILE).write_text("6\n")
    capsys.readouterr()
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (3, {"at": 3})
    assert "iter_0000006 is incomplete" in capsys.readouterr().out
    # Without a tracker: the newest complete directory, with a message.
    (tmp_path / TRACKER_FILE).unlink()
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (3, {"at": 3})
    assert f"no {TRACKER_FILE}" in capsys.readouterr().out


def test_an_interrupt_torch_wraps_stays_an_interrupt(trained, tmp_path, monkeypatch):
    # torch's DCP catches BaseException in its collectives and re-raises a CheckpointException:
    # a signal raised as an exception during planning must still end the run as an interrupt,
    # not as a failed save or a damaged checkpoint to fall back from.
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner, MCoreSavePlanner

    model, optimizer, scheduler = trained
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"at": 3})
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {"at": 4})
    with monkeypatch.context() as m:
        m.setattr(MCoreSavePlanner, "create_local_plan", _boom)
        with pytest.raises(Killed):
            save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"at": 6})
    assert not iteration_dir(tmp_path, 6).exists()
    with monkeypatch.context() as m:
        m.setattr(MCoreLoadPlanner, "create_local_plan", _boom)
        with pytest.raises(Killed):
            load_checkpoint(tmp_path, model, optimizer, scheduler)
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (4, {"at": 4})


def test_crash_before_tracker_keeps_committed_checkpoint(trained, tmp_path, monkeypatch, capsys):
    model, optimizer, scheduler = trained
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"at": 3})
    with monkeypatch.context() as m:
        _killed_outright_at(m, "_write_tracker")
        with pytest.raises(Killed):
            save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"at": 6})
    assert (iteration_dir(tmp_path, 6) / MARKER_FILE).exists()
    capsys.readouterr()
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (3, {"at": 3})
    assert "never committed" in capsys.readouterr().out
    # Saving that iteration again replaces the leftover and commits it.
    save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"at": 6})
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (6, {"at": 6})


def test_missing_and_bad_checkpoints(trained, tmp_path):
    model, optimizer, scheduler = trained
    assert load_checkpoint(tmp_path / "absent", model, optimizer, scheduler) is None
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) is None  # empty directory
    iteration_dir(tmp_path, 2).mkdir()  # a save killed before it wrote anything
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) is None

    (tmp_path / TRACKER_FILE).write_text("2\n")
    with pytest.raises(CheckpointError, match=r"names iteration 2.*no older complete checkpoint"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    (tmp_path / TRACKER_FILE).write_text("not a number")
    with pytest.raises(CheckpointError, match=rf"{TRACKER_FILE} is corrupt"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)

    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, run_config={"lr": LR, "seq_length": SEQ})
    with pytest.raises(CheckpointError, match=r"does not match this run: run_config.seq_length: saved 64, now 128"):
        load_checkpoint(tmp_path, model, optimizer, scheduler, run_config={"lr": LR, "seq_length": 128})
    small, small_optimizer, small_scheduler = _setup(seed=1, preset="small")
    with pytest.raises(CheckpointError, match=r"iter_0000004 does not match this run: model.num_layers: saved 4, "
                                              r"now 16"):
        load_checkpoint(tmp_path, small, small_optimizer, small_scheduler)

    model, optimizer, scheduler = _setup(seed=1)
    save_checkpoint(tmp_path, 5, model, None, scheduler)
    with pytest.raises(CheckpointError, match=r"no optimizer state; pass optimizer=None"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    assert load_checkpoint(tmp_path, model, None, scheduler) == (5, {})

    with pytest.raises(TypeError, match="extra_state must hold only plain Python values"):
        save_checkpoint(tmp_path, 6, model, None, scheduler, {"sampler": object()})



def test_load_falls_back_past_a_damaged_newest_checkpoint(trained, tmp_path, capsys):
    model, optimizer, scheduler = trained
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"at": 2})
    newest = iteration_dir(tmp_path, 4)
    for damage in ("truncated .distcp", "missing .metadata", "missing .distcp"):
        save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {"at": 4})
        data = next(newest.glob("*.distcp"))
        if damage == "truncated .distcp":
            data.write_bytes(data.read_bytes()[:1000])
        else:
            (newest / ".metadata" if damage == "missing .metadata" else data).unlink()
        capsys.readouterr()
        assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (2, {"at": 2}), damage
        warning = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
        # One line naming the damaged directory, why, and where it falls back to.
        assert len(warning) == 1 and len(warning[0]) < 400 + 2 * len(str(newest)), warning
        assert f"{newest} cannot" in warning[0] and warning[0].endswith("falling back to iteration 2"), warning
        # Asked for by name, the damaged one is an error, not a fallback.
        with pytest.raises(CheckpointError, match=rf"{newest} cannot"):
            load_checkpoint(tmp_path, model, optimizer, scheduler, iteration=4)
    # With nothing older to fall back to, the damage is the error.
    shutil.rmtree(iteration_dir(tmp_path, 2))
    with pytest.raises(CheckpointError, match=r"no older complete checkpoint to fall back to"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)


def test_save_starts_no_process(trained, tmp_path, monkeypatch):
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    model, optimizer, scheduler = trained
    # As in a fresh process, where megatron-core would start its Manager for the write results.
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before


def _bytes_under(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_disk_full_during_a_save_is_one_readable_error_and_leaves_the_previous_checkpoint(trained, tmp_path,
                                                                                         monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_focusft.engine import disk_space

    model, optimizer, scheduler = trained
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"at": 3})
    one_checkpoint = _bytes_under(tmp_path)
    # The estimate the entry point checks --save against, before training.
    estimate = disk_space.checkpoint_bytes(sum(p.numel() for p in model.parameters()), torch.float32)
    assert one_checkpoint <= estimate <= 1.1 * one_checkpoint
    # A disk with room for half another checkpoint: a write past it fails with ENOSPC, as the
    # OS's would, and the free space is what the disk has left.
    capacity = one_checkpoint + one_checkpoint // 2
    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron-core reads its signature
    def write_until_full(*args, **kwargs):
        result = write_item(*args, **kwargs)
        stream = args[-4]  # (*transforms, stream, data, write_item, storage_key)
        stream.flush()
        if _bytes_under(tmp_path) > capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return result

    monkeypatch.setattr(filesystem_async, "_write_item", write_until_full)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: max(capacity - _bytes_under(tmp_path), 0))
    with pytest.raises(checkpoint.CheckpointSaveError) as failure:
        save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"at": 6})
    message = str(failure.value)
    needed = int(re.search(r"needs about ([\d,]+) bytes", message).group(1).replace(",", ""))
    assert message.startswith(f"saving the checkpoint of iteration 6 to {iteration_dir(tmp_path, 6)} failed: no space "
                              f"left on device")
    assert re.search(r", 0 bytes were free; its partial directory was removed and the checkpoint of iteration 3 "
                     r"stays the latest$", message), message
    assert 0.95 * one_checkpoint < needed <= one_checkpoint
    assert not iteration_dir(tmp_path, 6).exists()
    assert load_checkpoint(tmp_path, model, optimizer, scheduler) == (3, {"at": 3})


def test_keep_last(trained, tmp_path):
    model, optimizer, scheduler = trained
    iteration_dir(tmp_path, 1).mkdir(parents=True)  # leftover of a crashed save
    for iteration in (2, 4, 6):
        save_checkpoint(tmp_path, iteration, model, None, None, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000006", TRACKER_FILE]
    assert latest_checkpoint(tmp_path) == (6, [])


# --- Fast weights -----------------------------------------------------------------------------


def test_fast_weights_are_not_checkpointed(single_rank, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_focusft.data.batch import sample_index_from_doc_ids
    from megatron_focusft.fastweights import (
        FastWeightBinding,
        FastWeightConfig,
        bind_fast_weights,
        fast_weight_layout,
        fast_weight_modules,
        init_fast_weights,
    )

    config = FastWeightConfig(rank=4, layer_fraction=1.0, targets=("qkv", "proj", "fc1", "fc2"))
    model, optimizer, scheduler = _setup(seed=1, fast_weights=config)
    assert fast_weight_modules(model)
    packer = _packer()
    _train(model, optimizer, scheduler, packer, 1)  # unbound fast-weight linears are the base linears
    # Save while a binding is attached: still nothing of it may reach the checkpoint.
    rows = packer.next_rows()
    sample_index = sample_index_from_doc_ids(rows.doc_ids)
    weights = init_fast_weights(fast_weight_layout(model.config, config), range(int(sample_index.max()) + 1),
                                config.rank)
    with bind_fast_weights(model, FastWeightBinding(sample_index, weights)):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler)

    saved = iteration_dir(tmp_path, 1)
    keys = set(dist_checkpointing.load_tensors_metadata(str(saved)))
    assert not [k for k in keys if "fast" in k.lower()]
    assert not [k for k in dist_checkpointing.load_common_state_dict(str(saved)) if "fast" in str(k).lower()]

    plain, plain_optimizer, plain_scheduler = _setup(seed=2)
    plain_keys = {sh.key for sh in plain.module.sharded_state_dict().values() if isinstance(sh, ShardedTensor)}
    assert plain_keys <= keys  # the same weights; the rest is optimizer state
    assert load_checkpoint(tmp_path, plain, plain_optimizer, plain_scheduler) == (1, {})
    for (name, p), (_, q) in zip(model.module.state_dict().items(), plain.module.state_dict().items()):
        if "_extra_state" not in name:
            assert torch.equal(p, q), name
    # Both continue identically (unbound fast-weight linears compute the base linears).
    after_fast = _train(model, optimizer, scheduler, _packer(3), 1)
    after_plain = _train(plain, plain_optimizer, plain_scheduler, _packer(3), 1)
    assert after_fast == after_plain
