"""Room for checkpoints: the --save check and telling a full disk from other write failures."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import CheckpointException

from megatron_focusft.engine import disk_space
from megatron_focusft.engine.disk_space import SaveDirError, check_save_dir, checkpoint_bytes, out_of_space

NEEDED = 40_000_000


def test_checkpoint_bytes_counts_weights_and_adam_state():
    # fp32: weight + two moments; bf16: the bf16 weight, two fp32 moments and the fp32 main copy.
    assert checkpoint_bytes(1000, torch.float32) == int(1000 * 12 * disk_space.HEADROOM)
    assert checkpoint_bytes(1000, torch.bfloat16) == int(1000 * 14 * disk_space.HEADROOM)
    assert checkpoint_bytes(1000, torch.bfloat16, with_optimizer=False) == int(1000 * 2 * disk_space.HEADROOM)


def test_check_save_dir_creates_it_or_says_why_not(tmp_path: Path, monkeypatch):
    check_save_dir(tmp_path / "new" / "ckpt", 1)
    assert (tmp_path / "new" / "ckpt").is_dir() and not list((tmp_path / "new" / "ckpt").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(SaveDirError, match=rf"--save {tmp_path / 'file' / 'ckpt'} is not writable: "):
        check_save_dir(tmp_path / "file" / "ckpt", 1)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 123)
    with pytest.raises(SaveDirError, match=r"has 123 bytes free, one checkpoint needs about 40,000,000"):
        check_save_dir(tmp_path / "new" / "ckpt", NEEDED)


def _raised(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as outer:
        return outer


def test_out_of_space_by_errno_text_or_a_full_disk(tmp_path: Path, monkeypatch):
    enospc = OSError(errno.ENOSPC, "No space left on device")
    # What megatron-core's writer leaves of a worker's OSError: its class name only.
    worker = RuntimeError("Worker failure: An error is caught while starting worker 0, error: <class 'OSError'>")
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 10 * NEEDED)
    assert out_of_space(_raised(RuntimeError("save failed"), enospc), tmp_path, NEEDED)
    assert out_of_space(CheckpointException("save", {0: (enospc, None)}), tmp_path, NEEDED)
    assert out_of_space(RuntimeError("[Errno 122] Disk quota exceeded"), tmp_path, NEEDED)
    assert not out_of_space(worker, tmp_path, NEEDED)
    assert not out_of_space(_raised(RuntimeError("save failed"), PermissionError(errno.EACCES, "denied")), tmp_path,
                            NEEDED)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 4096)  # what a write that hit ENOSPC leaves
    assert out_of_space(worker, tmp_path, NEEDED)
