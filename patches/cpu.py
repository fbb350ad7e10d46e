"""CPU compatibility shim for megatron-core 0.19: the places it hard-codes CUDA.

Applied only by an explicit `apply_cpu_patches()` call, and only when CUDA is absent. Two
kinds of patch, each listed with its reason:
- PATCHED_MODULES: the module-global `torch` is replaced by a proxy that behaves like torch
  except that CUDA devices resolve to the CPU and CUDA-only calls (synchronize,
  current_device) become their CPU equivalents. Code outside those modules is untouched.
- PATCHED_FUNCTIONS: a function (or a method, named `Class.method`) whose CUDA assumption is
  not a device argument (an assert on the tensor type, a pinned tensor moved with .cuda(), the
  CUDA generator's state) is replaced by a CPU version with the same arithmetic.
No numerics change: only where tensors live. tests/patches/test_cpu.py fails if megatron-core
changes a patched function's signature or no longer contains the CUDA code a module is
patched for.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch

# module -> (why it is patched, a snippet of its source that shows the CUDA code)
PATCHED_MODULES: dict[str, tuple[str, str]] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device()",
        "self.inv_freq.to(device=torch.cuda.current_device())"),
    "megatron.core.distributed.param_and_grad_buffer": (
        "gradient buffers on torch.cuda.current_device(); grad sync waits on torch.cuda.current_stream()",
        "device=torch.cuda.current_device()"),
    "megatron.core.distributed.distributed_data_parallel": (
        "torch.cuda.synchronize() around buffer allocation and release",
        "torch.cuda.synchronize()"),
    "megatron.core.optimizer.optimizer": (
        "found_inf / scale tensors are created with device='cuda'",
        "device='cuda'"),
    "megatron.core.optimizer.clip_grads": (
        "gradient norms are reduced in tensors created with device='cuda'",
        "device='cuda'"),
    "megatron.core.utils": (
        "the multi-tensor L2-norm fallback returns its result in a tensor created with device='cuda'; "
        "the global memory buffer (sequence-parallel all-gathers in the linears) allocates on "
        "torch.cuda.current_device()",
        'device="cuda"'),
    "megatron.core.tensor_parallel.mappings": (
        "sequence-parallel scatter/gather/reduce-scatter and TP gathers allocate their outputs on "
        "torch.cuda.current_device()",
        "device=torch.cuda.current_device()"),
    "megatron.core.tensor_parallel.layers": (
        "under sequence parallelism the linears' backward allocates the reduce-scattered input "
        "gradient on torch.cuda.current_device()",
        "dim_size, dtype=input.dtype, device=torch.cuda.current_device(), requires_grad=False"),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (
        "the synchronous torch_dist save stages tensors to host with preload_tensors, which calls "
        "torch.cuda.synchronize()",
        "torch.cuda.synchronize()"),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "save finalisation broadcasts its failure flag in a tensor on torch.cuda.current_device()",
        "device=torch.cuda.current_device()"),
    "megatron.core.pipeline_parallel.schedules": (
        "the token counter of every schedule is created with device='cuda'",
        'device="cuda"'),
    "megatron.core.timers": (
        "Timer.start/stop (the schedules' per-stage timers) call torch.cuda.synchronize()",
        "torch.cuda.synchronize()"),
    "megatron.core.transformer.attention": (
        "the static inference context's KV cache (Attention._allocate_memory) is allocated on "
        "torch.cuda.current_device()",
        "device=torch.cuda.current_device()"),
    "megatron.core.pipeline_parallel.p2p_communication": (
        "shape exchange buffers on torch.cuda.current_device() and torch.cuda.synchronize()",
        "device=torch.cuda.current_device()"),
}

_CPU = torch.device("cpu")


def _clip_grad_by_total_norm_cpu(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: int | float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scale gradients in place by max_norm / (total_norm + 1e-6) when that is below 1.

    The arithmetic of megatron's version (multi_tensor_scale: grad * coeff in fp32), without
    its assertion that gradients are torch.cuda.FloatTensor.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for grad in grads:
        grad.mul_(clip_coeff)


def _pos_emb_on_this_cp_rank_cpu(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    """This CP rank's rows of a RoPE table: chunks r and 2cp-1-r of 2cp along seq_dim, in that order.

    Megatron's selection (the load-balanced layout of attention/context_parallel.py and parallel/cp_layout.py), with the
    index tensor made on the table's device instead of pinned and copied to CUDA.
    """
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    chunks = pos_emb.unflatten(seq_dim, (2 * cp_size, -1))
    index = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=pos_emb.device)
    return chunks.index_select(seq_dim, index).flatten(seq_dim, seq_dim + 1)


@contextlib.contextmanager
def _rng_tracker_fork_cpu(self: Any, name: str = "model-parallel-rng") -> Iterator[None]:
    """CudaRNGStatesTracker.fork without CUDA: the body runs as is, and must not draw random numbers.

    Megatron's fork swaps the CUDA generator to a per-TP-rank stream for the body (GPTModel forks
    around the embedding dropout and the decoder layers under sequence parallelism). Without CUDA
    there is no such generator, and CPU ops never drew from it, so running the body unchanged is
    the exact CPU equivalent, as long as the body draws no CPU random numbers: those would come
    from the default stream, the same on every TP rank, where Megatron uses a per-rank stream for
    sequence-split activations. That case (dropout > 0 under SP) is refused, not changed.
    """
    state = torch.get_rng_state()
    yield
    if not torch.equal(state, torch.get_rng_state()):
        raise RuntimeError(f"random numbers were drawn inside the RNG tracker's fork({name!r}) on CPU: "
                           "the CPU shim has no per-TP-rank generator (set dropout to 0 with sequence "
                           "parallelism on CPU)")


def _get_cuda_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """The CUDA generator's state without CUDA: there is none, so an empty state.

    Megatron's activation checkpoint saves it next to the CPU generator's state (which it saves
    and restores itself) and hands it back to `_set_cuda_rng_state_cpu` when recomputing.
    """
    return torch.empty(0, dtype=torch.uint8)


def _set_cuda_rng_state_cpu(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Restoring the (empty) CUDA generator state of `_get_cuda_rng_state_cpu`: nothing to do."""
    if new_state.numel():
        raise RuntimeError("a CUDA generator state reached the CPU shim: it cannot be restored without CUDA")


_LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"
_SETUP_EMBEDDINGS = "LanguageModule.setup_embeddings_and_output_layer"


def _setup_embeddings_and_output_layer_cpu(self: Any) -> None:
    """LanguageModule.setup_embeddings_and_output_layer with its tied-embedding sync on the CPU.

    Under pipeline parallelism with tied embeddings, megatron-core zeroes the last stage's copy
    of the word embeddings and all-reduces it with the first stage's over the embedding group,
    after moving the tensor with `.cuda()`. Here megatron-core's method runs with that block
    switched off (its own `init_model_with_meta_device` guard), then the same all-reduce runs on
    the CPU tensor.
    """
    config = self.config
    meta_device = config.init_model_with_meta_device
    config.init_model_with_meta_device = True
    try:
        _ORIGINALS[(_LANGUAGE_MODULE, _SETUP_EMBEDDINGS)](self)
    finally:
        config.init_model_with_meta_device = meta_device
    synced = (self.share_embeddings_and_output_weights or getattr(config, "mtp_num_layers", 0)) \
        and config.pipeline_model_parallel_size > 1
    if synced and torch.distributed.is_initialized() and not meta_device and self._is_in_embd_group():
        torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)


@dataclass(frozen=True)
class FunctionPatch:
    used_in: str  # the module whose reference is replaced
    defined_in: str  # where megatron-core defines the original
    name: str  # an attribute of used_in, or `Class.method`
    replacement: Callable[..., Any]
    expected_signature: str
    reason: str


PATCHED_FUNCTIONS: tuple[FunctionPatch, ...] = (
    FunctionPatch(
        "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
        _clip_grad_by_total_norm_cpu,
        "(parameters: Union[List[torch.Tensor], torch.Tensor], max_norm: Union[int, float], "
        "total_norm: float, use_decoupled_grad: bool = False)",
        "asserts param.grad.type() == 'torch.cuda.FloatTensor'",
    ),
    FunctionPatch(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank",
        _pos_emb_on_this_cp_rank_cpu,
        "(pos_emb: 'Tensor', seq_dim: 'int', cp_group: 'torch.distributed.ProcessGroup') -> 'Tensor'",
        "RotaryEmbedding under context parallelism builds its index with pin_memory=True and .cuda()",
    ),
    FunctionPatch(
        "megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork",
        _rng_tracker_fork_cpu,
        "(self, name='model-parallel-rng')",
        "the tracker's fork reads and sets the CUDA generator's state (GPTModel forks under sequence parallelism)",
    ),
    FunctionPatch(
        "megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
        _get_cuda_rng_state_cpu,
        "(device: 'Union[int, str, torch.device]' = 'cuda', clone: 'bool' = False, graph_safe: 'bool' = False) "
        "-> 'torch.Tensor'",
        "activation checkpointing (tensor_parallel.checkpoint) saves the CUDA generator's state",
    ),
    FunctionPatch(
        "megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
        _set_cuda_rng_state_cpu,
        "(new_state: 'torch.Tensor', device: 'int' = -1, graph_safe: 'bool' = False)",
        "activation checkpointing restores the CUDA generator's state before recomputing",
    ),
    FunctionPatch(
        _LANGUAGE_MODULE, _LANGUAGE_MODULE, _SETUP_EMBEDDINGS, _setup_embeddings_and_output_layer_cpu,
        "(self) -> None",
        "a pipelined model with tied embeddings syncs the last stage's copy after weight.data.cuda()",
    ),
)


def lookup(module_name: str, name: str) -> Any:
    """The object `name` (an attribute or `Class.method`) of a module."""
    value: Any = importlib.import_module(module_name)
    for part in name.split("."):
        value = getattr(value, part)
    return value


# (used_in, name) -> megatron-core's object, saved before a patch replaces it where it is defined.
_ORIGINALS: dict[tuple[str, str], Any] = {}


def original(patch: FunctionPatch) -> Any:
    """megatron-core's object that `patch` replaces (also after apply_cpu_patches)."""
    return _ORIGINALS.get((patch.used_in, patch.name)) or lookup(patch.defined_in, patch.name)


def _to_cpu_device(device: Any) -> Any:
    """CUDA device specs (str, int index, torch.device) resolve to the CPU; others pass through."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CpuStream:
    """The CPU runs every op in order: waiting on events or streams is a no-op."""

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None


class _CpuCuda(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside a patched module."""

    @staticmethod
    def current_stream(device: Any = None) -> _CpuStream:
        return _CpuStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    @staticmethod
    def empty_cache() -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def is_available() -> bool:
        return False


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside a patched module: factory calls get CPU devices."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if callable(value) and name in _FACTORIES:
            def factory(*args: Any, _fn: Any = value, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return _fn(*args, **kwargs)

            return factory
        return value


_FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like"})
_CPU_TORCH = _CpuTorch("torch")


def apply_cpu_patches(force: bool = False) -> list[str]:
    """Apply PATCHED_MODULES and PATCHED_FUNCTIONS for CPU runs; no-op when CUDA is available.

    `force` patches even with CUDA present (tests only). Returns the patched names.
    Idempotent.
    """
    if torch.cuda.is_available() and not force:
        return []
    for name in PATCHED_MODULES:
        importlib.import_module(name).torch = _CPU_TORCH
    for patch in PATCHED_FUNCTIONS:
        current = lookup(patch.used_in, patch.name)
        if current is not patch.replacement:
            _ORIGINALS[(patch.used_in, patch.name)] = current
        owner, _, attribute = patch.name.rpartition(".")
        target = lookup(patch.used_in, owner) if owner else importlib.import_module(patch.used_in)
        setattr(target, attribute, patch.replacement)
    return list(PATCHED_MODULES) + [f"{p.used_in}.{p.name}" for p in PATCHED_FUNCTIONS]
