"""runtime.release_model_parallel: re-initialising Megatron's parallel state does not leak groups."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.distributed import init_model_parallel


def _gloo_threads() -> int:
    return sum(1 for comm in Path("/proc/self/task").glob("*/comm") if comm.read_text().startswith("pt_gloo"))


def _reinitialise(times: int) -> list[int]:
    counts = []
    for _ in range(times):
        init_model_parallel(tp=2)
        counts.append(_gloo_threads())
    return counts


def test_reinitialising_parallel_state_keeps_the_thread_count(worker_pool):
    for counts in worker_pool(2).run(_reinitialise, 4):
        assert counts[0] > 0  # gloo groups run threads: the count measures something
        assert counts[1:] == counts[:-1], counts
