"""Shared fixtures: one persistent gloo worker pool per world size, and a single-rank setup."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.helpers.distributed import WorkerPool


@pytest.fixture(scope="session")
def worker_pool() -> Iterator[Callable[[int], WorkerPool]]:
    """`worker_pool(n)` gives the session's pool of n ranks (one pool alive at a time)."""
    pools: dict[int, WorkerPool] = {}

    def get(world_size: int) -> WorkerPool:
        if world_size not in pools:
            for other in list(pools):
                pools.pop(other).close()
            pools[world_size] = WorkerPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def single_rank() -> Iterator[None]:
    """A one-process gloo world with Megatron's parallel state, for in-process model tests."""
    import torch.distributed as dist

    from megatron_focusft.patches.cpu import apply_cpu_patches
    from tests.helpers.distributed import _free_port

    apply_cpu_patches()
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
