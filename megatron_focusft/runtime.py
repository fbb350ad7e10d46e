"""Process-group start-up, timing and Megatron import-warning filters shared by the commands."""

from __future__ import annotations

import os
import socket
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> bool:
    """Join torchrun's world when its env is set, else start a 1-process world.

    Returns whether this call created the process group (and so must destroy it).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group(backend, init_method="env://")
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn() in ms over `iters` runs after `warmup` runs (CUDA: events)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def quiet_megatron_import_warnings() -> None:
    """Ignore the UserWarnings Megatron-Core emits at import that are expected here.

    TE/Apex absent and a fallback to torch (expected on CPU: local layer spec, torch optimizer),
    and MimoModelConfig being experimental: they only clutter the progress lines.
    """
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "MimoModelConfig is experimental"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def release_model_parallel() -> None:
    """Megatron's destroy_model_parallel, and the process groups it created destroyed too.

    destroy_model_parallel only forgets its groups; each gloo group keeps two threads and its
    sockets, so a process that re-initialises parallel state (tests, repeated commands) would
    accumulate them.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    groups = {}
    for value in vars(parallel_state).values():
        for group in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(group, dist.ProcessGroup) and group is not dist.group.WORLD:
                groups[id(group)] = group
    parallel_state.destroy_model_parallel()
    for group in groups.values():
        try:
            dist.destroy_process_group(group)
        except ValueError:  # a group torch does not hold for this rank (not a member)
            pass


@contextmanager
def megatron_session(
    tensor_model_parallel_size: int = 1, seed: int = 1234, context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1, virtual_pipeline_model_parallel_size: int | None = None,
) -> Iterator[torch.device]:
    """Process group, CPU shim (without CUDA), Megatron parallel state and seeds for a command
    (virtual_pipeline_model_parallel_size: model chunks per pipeline rank, or None).

    Joins torchrun's world or starts a 1-process one; tears down only what it created, so it
    also runs inside a test process that already set things up. Yields this rank's device.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_focusft.patches.cpu import apply_cpu_patches

    cuda = torch.cuda.is_available()
    created_world = init_distributed()  # sets the CUDA device of this rank first
    owns_parallel_state = False
    try:
        if not cuda:
            apply_cpu_patches()
        owns_parallel_state = not parallel_state.model_parallel_is_initialized()
        if owns_parallel_state:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tensor_model_parallel_size,
                pipeline_model_parallel_size=pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
                context_parallel_size=context_parallel_size)
        torch.manual_seed(seed)
        if cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    finally:
        if owns_parallel_state:
            release_model_parallel()
        if created_world:
            dist.destroy_process_group()
