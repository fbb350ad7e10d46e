"""A persistent pool of gloo worker processes for multi-rank tests on CPU.

Starting a rank costs ~7 s (importing torch and megatron-core), so each world size gets one
pool per test session; tests ship module-level functions to it by reference. Every task runs
on all ranks; the pool returns each rank's result or raises with the failing rank's traceback.

Tasks and results cross the queues as plain pickled bytes: a multiprocessing queue would
otherwise share each tensor through a file descriptor handed over a socket, and that hand-over
can block forever (seen once in CI, on 2 cores with 4 ranks).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable

TASK_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    from megatron_focusft.patches.cpu import apply_cpu_patches

    torch.set_num_threads(1)
    apply_cpu_patches()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = pickle.loads(task)
        try:
            results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
        except BaseException:  # report every failure to the test process, then keep serving
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """`world_size` gloo ranks kept alive; `run(fn, *args)` calls fn on every rank."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world_size = world_size
        self._results: mp.Queue = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(rank, world_size, port, self._tasks[rank], self._results), daemon=True)
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        task = pickle.dumps((fn, args, kwargs))
        for task_queue in self._tasks:
            task_queue.put(task)
        by_rank: dict[int, Any] = {}
        failures = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn.__name__} did not finish on all ranks in {TASK_TIMEOUT_S} s") from None
            if ok:
                by_rank[rank] = pickle.loads(value)
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
        if failures:
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(failures))
        return [by_rank[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        for task_queue, proc in zip(self._tasks, self._procs):
            if proc.is_alive():
                task_queue.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, vp: int | None = None) -> None:
    """(Re)initialise Megatron's parallel state on a worker and seed torch identically on all ranks
    (vp: virtual pipeline stages per rank)."""
    import torch
    from megatron.core import parallel_state

    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vp,
    )
    torch.manual_seed(seed)
