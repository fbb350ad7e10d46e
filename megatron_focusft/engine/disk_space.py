"""Room for checkpoints: what one takes, whether a directory can take it, and whether a failed
write ran out of space.

Sizes are bytes on disk of the tensors (the torch_dist files add a few hundred bytes of framing
per tensor, and the common state a few KB: HEADROOM covers both). A Megatron checkpoint holds
the model's parameters in their dtype and, with the optimizer, Adam's two fp32 moments per
parameter plus, for bf16 parameters, the optimizer's fp32 main copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import torch

from megatron_focusft.engine.errors import exception_chain

ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MAIN_PARAM_BYTES = 4  # fp32 main copy of a 16-bit parameter
HEADROOM = 1.05  # framing, metadata, common state
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_TEXT = ("no space left on device", "disk quota exceeded")


class SaveDirError(OSError):
    """A --save directory that cannot take a checkpoint: the message names it and why."""


def checkpoint_bytes(num_params: int, params_dtype: torch.dtype, with_optimizer: bool = True) -> int:
    """Bytes one checkpoint of `num_params` parameters takes (HEADROOM included)."""
    itemsize = torch.empty((), dtype=params_dtype).element_size()
    per_param = itemsize
    if with_optimizer:
        per_param += ADAM_MOMENT_BYTES + (MAIN_PARAM_BYTES if itemsize < 4 else 0)
    return int(num_params * per_param * HEADROOM)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this process on the filesystem that holds `path` (or would: its nearest
    existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_save_dir(directory: str | os.PathLike, needed: int) -> None:
    """Create `directory` if needed and prove it writable with a probe file; SaveDirError when it
    is not, or when fewer than `needed` bytes are free there."""
    directory = Path(directory)
    probe = directory / f".focusft-write-probe-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as error:
        raise SaveDirError(f"--save {directory} is not writable: {error.strerror or error}") from error
    free = free_bytes(directory)
    if free < needed:
        raise SaveDirError(f"--save {directory} has {free:,} bytes free, one checkpoint needs about {needed:,}: "
                           f"free space there or choose another --save")


def out_of_space(error: BaseException, directory: str | os.PathLike, needed: int) -> bool:
    """Whether a failed write of `needed` bytes into `directory` ran out of space.

    megatron-core's writer re-raises a worker's OSError as a RuntimeError naming only its class,
    and torch's zip writer reports a short write as "unexpected pos": the errno is often gone. So
    besides ENOSPC / EDQUOT (or their text) anywhere in the chain, a disk found (nearly) full
    right after the failure counts: a write that hit ENOSPC leaves no space behind, so fewer free
    bytes than 5% of the save's size plus 1 MiB.
    """
    for part in exception_chain(error):
        if isinstance(part, OSError) and part.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(text in str(part).lower() for text in _OUT_OF_SPACE_TEXT):
            return True
    try:
        return free_bytes(directory) < needed // 20 + 2**20
    except OSError:
        return False
