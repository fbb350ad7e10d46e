"""The CPU shim: still needed, still matching megatron-core, and numerics-neutral."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from megatron_focusft.patches import cpu


@pytest.mark.parametrize("module_name", sorted(cpu.PATCHED_MODULES))
def test_patched_module_still_has_the_cuda_code(module_name):
    # If megatron-core drops the CUDA-only code, the patch is stale and must be removed.
    _, snippet = cpu.PATCHED_MODULES[module_name]
    source = inspect.getsource(importlib.import_module(module_name))
    assert snippet in source, f"{module_name} no longer contains {snippet!r}: review patches/cpu.py"


@pytest.mark.parametrize("patch", cpu.PATCHED_FUNCTIONS, ids=lambda p: p.name)
def test_patched_function_signature_unchanged(patch):
    original = cpu.original(patch)
    assert str(inspect.signature(original)) == patch.expected_signature
    assert inspect.signature(patch.replacement).parameters.keys() == inspect.signature(original).parameters.keys()


def test_apply_is_a_no_op_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.apply_cpu_patches() == []


def test_apply_patches_every_listed_symbol(single_rank):
    applied = cpu.apply_cpu_patches()
    assert set(cpu.PATCHED_MODULES) <= set(applied)
    for name in cpu.PATCHED_MODULES:
        assert importlib.import_module(name).torch is cpu._CPU_TORCH
    for patch in cpu.PATCHED_FUNCTIONS:
        assert cpu.lookup(patch.used_in, patch.name) is patch.replacement


def test_proxy_puts_cuda_requests_on_cpu_and_keeps_everything_else():
    proxy = cpu._CPU_TORCH
    for device in ("cuda", "cuda:1", 0, torch.device("cuda", 0)):
        assert proxy.zeros(2, device=device).device.type == "cpu"
    x = proxy.tensor([1.5, 2.5], dtype=torch.float64, device="cuda")
    assert x.dtype == torch.float64 and x.tolist() == [1.5, 2.5]
    assert proxy.float32 is torch.float32 and proxy.Tensor is torch.Tensor
    assert proxy.cuda.current_device() == torch.device("cpu")
    assert proxy.cuda.is_available() is False
    proxy.cuda.synchronize()
    proxy.cuda.current_stream().wait_event(None)


def test_rope_embedding_under_the_shim_equals_the_definition(single_rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    emb = rope.get_emb(7, offset=3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    angles = torch.outer(torch.arange(3, 10, dtype=torch.float32), inv_freq)
    expected = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    assert emb.device.type == "cpu"
    torch.testing.assert_close(emb, expected, rtol=0, atol=0)


@pytest.mark.parametrize("total_norm, max_norm", [(10.0, 1.0), (0.5, 1.0), (torch.tensor(4.0), 2.0)])
def test_clip_replacement_arithmetic(total_norm, max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    cpu._clip_grad_by_total_norm_cpu(params, max_norm, total_norm)
    coeff = min(float(max_norm / (float(total_norm) + 1e-6)), 1.0)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g * coeff, rtol=0, atol=0)


class _FakeGroup:
    """The two methods a process group offers Megatron's CP RoPE slicing."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_rope_slice_is_our_load_balanced_layout(single_rank, cp_size):
    # The patched RotaryEmbedding gives CP rank r the table rows at cp_positions(S, cp, r): the
    # same tokens split_batch_for_cp hands that rank, so RoPE angles stay global positions.
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_focusft.parallel.cp_layout import cp_positions

    cpu.apply_cpu_patches()
    seq_len = 8 * cp_size
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    full = rope.get_emb(seq_len)
    for rank in range(cp_size):
        local = rope(seq_len, cp_group=_FakeGroup(cp_size, rank))
        assert torch.equal(local, full[cp_positions(seq_len, cp_size, rank)])
        table = torch.randn(3, seq_len, 5)  # another sequence dim
        sliced = cpu._pos_emb_on_this_cp_rank_cpu(table, 1, _FakeGroup(cp_size, rank))
        assert torch.equal(sliced, table[:, cp_positions(seq_len, cp_size, rank)])


def test_cp_rope_patch_is_still_needed():
    from megatron.core.models.common.embeddings import rope_utils

    source = inspect.getsource(rope_utils.get_pos_emb_on_this_cp_rank)
    assert "pin_memory=True" in source and ".cuda(" in source, "review the get_pos_emb_on_this_cp_rank patch"


def test_global_memory_buffer_and_sp_mappings_allocate_on_cpu(single_rank):
    # The sequence-parallel linears all-gather into Megatron's global memory buffer.
    from megatron.core.utils import GlobalMemoryBuffer

    cpu.apply_cpu_patches()
    buffer = GlobalMemoryBuffer()
    tensor = buffer.get_tensor([4, 3], torch.float32, "mpu")
    assert tensor.device.type == "cpu" and tuple(tensor.shape) == (4, 3)
    assert buffer.get_tensor([2, 6], torch.float32, "mpu").data_ptr() == tensor.data_ptr()  # reused


def test_rng_fork_runs_its_body_and_refuses_random_draws(single_rank):
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    cpu.apply_cpu_patches()
    tracker = CudaRNGStatesTracker()  # no state added: Megatron's fork would raise, or need CUDA
    x = torch.randn(8)
    with tracker.fork():
        y = torch.nn.functional.dropout(x, p=0.0, training=True) * 2
    assert torch.equal(y, 2 * x)
    with pytest.raises(RuntimeError, match="dropout to 0"):
        with tracker.fork():
            torch.nn.functional.dropout(x, p=0.5, training=True)


def test_rng_fork_patch_is_still_needed():
    from megatron.core.tensor_parallel import random as megatron_random

    # Read the module's source: CudaRNGStatesTracker.fork may already be the replacement here.
    source = inspect.getsource(megatron_random)
    assert "_set_cuda_rng_state(self.states_[name]" in source, "review the CudaRNGStatesTracker.fork patch"
