"""Megatron parallel linears with per-sample fast weights (transient LoRA-style adapters).

Legend: s sequence, b micro-batch, T = s * b tokens in Megatron's [s, b] order (token t is
position t // b of row t % b), n samples of the micro-batch, r adapter rank, P tensor-parallel
size, p this rank.

Unsharded (reference) layout, per adapted layer and projection:
    A [n, r, in], B [n, out, r], `in` / `out` the projection's full sizes; keyed by
    (Megatron layer number, projection), projection in qkv, proj, gate, up, down.
Tensor-parallel sharding (what rank p binds, see `shard_fast_weights`):
    column slots (qkv; fc1 -> gate, up): A replicated; B split along `out` into P contiguous
        chunks, rank p binds chunk p. Megatron initialises the gated fc1 with stride 2, so its
        local output is [gate chunk p; up chunk p] and each half gets its own adapter.
        qkv has one adapter over Megatron's fused QKV rows (per query group: q heads, k, v).
    row slots (fc2 -> down; proj): A split along `in` into P contiguous chunks (rank p's input
        is chunk p of the activation); B replicated. The rank's partial B_s A_s,p x_p is added to
        its partial output before Megatron's all-reduce, which sums it exactly.
Gradients: on every rank, a replicated fast weight gets its full gradient (the same on all
ranks) and a sharded one the gradient of its own shard. The column slots all-reduce the
[T', 2r] adapter activation's gradient, the row slots the gradient of B.

Sequence parallelism (SP): activations between the linears are split along the sequence over
the TP group (rank p holds positions [p s/P, (p+1) s/P) of every row: a contiguous range of the
[s, b]-ordered tokens). The sample index stays the whole sequence's.
    column slots: Megatron all-gathers the sequence shard inside the linear. The adapter instead
        projects its own shard's tokens with A (h = x A_s^T is per token), and all-gathers the
        small [T, parts * r] h, not the [T, in] input (less traffic, and no gathered input is
        kept for the backward); backward reduce-scatters h's gradient
        (partial over the output shards), and A's gradient, now a sum over this rank's tokens
        only, is all-reduced.
    row slots: the input is the whole sequence, as without SP; Megatron reduce-scatters what
        _forward_impl returns, so the partial adapter term added before it is summed exactly.

Fast weights are never module parameters or buffers: they reach the modules only through a
`FastWeightBinding` attached by `bind_fast_weights` for the duration of a forward (and of the
backward that follows it). Without a binding the modules are exactly Megatron's linears.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_focusft.fastweights.config import TARGETS, FastWeightConfig, adapted_layer_numbers, target_projections
from megatron_focusft.fastweights.segmented import TokenGroups, segmented_matmul

FastWeightKey = tuple[int, str]  # (Megatron layer number, projection)
TensorPair = tuple[torch.Tensor, torch.Tensor]  # (A, B)
FastWeights = dict[FastWeightKey, TensorPair]

# projection -> (dim of A, dim of B) split across tensor-parallel ranks; None = replicated.
SHARD_DIMS: dict[str, tuple[int | None, int | None]] = {
    "qkv": (None, 1), "gate": (None, 1), "up": (None, 1), "down": (2, None), "proj": (2, None),
}
# Fixed ids that enter the seeded initialisation (changing them changes every seeded A).
_PROJECTION_IDS = {"qkv": 0, "proj": 1, "gate": 2, "up": 3, "down": 4}


class FastWeightBinding:
    """One step's fast weights: the sample of every token and this rank's shards.

    sample_index  [b, s] long on the activations' device, the micro-batch's sample of each
                  token (0..n-1 across the whole micro-batch, not per row; -1 = no sample, no
                  adapter). SegmentBatch.sample_index holds it (data/batch.py).
    weights       key -> (A [n, r, in_local], B [n, out_local, r]) for every adapted linear of
                  the model (keys of layers this pipeline stage does not hold are ignored).
    Tokens are grouped by sample here, once for all layers.
    """

    def __init__(self, sample_index: torch.Tensor, weights: Mapping[FastWeightKey, TensorPair]) -> None:
        if sample_index.dim() != 2 or sample_index.dtype != torch.long:
            raise ValueError(f"sample_index must be a [b, s] long tensor, got {sample_index.dtype} "
                             f"of shape {tuple(sample_index.shape)}")
        if not weights:
            raise ValueError("a binding needs fast weights for at least one linear")
        sizes = {A.shape[0] for A, _ in weights.values()} | {B.shape[0] for _, B in weights.values()}
        if len(sizes) != 1:
            raise ValueError(f"all fast weights must hold the same number of samples, got sizes {sorted(sizes)}")
        self.sample_index = sample_index
        self.weights = dict(weights)
        self.num_samples = sizes.pop()
        # Megatron's activations are [s, b, ...]: flatten the index in that order.
        self.groups = TokenGroups.from_sample_index(sample_index.t().reshape(-1), self.num_samples)
        self._shard_groups: dict[tuple[int, int], TokenGroups] = {}

    def sequence_shard_groups(self, rank: int, size: int) -> TokenGroups:
        """Groups of the tokens sequence-parallel rank `rank` of `size` holds (positions
        [rank s/size, (rank+1) s/size) of every row), numbered within the shard; cached."""
        if (rank, size) not in self._shard_groups:
            s = self.sample_index.shape[1]
            if s % size:
                raise ValueError(f"sequence length {s} does not split into {size} sequence-parallel ranks")
            shard = self.sample_index.t()[rank * (s // size):(rank + 1) * (s // size)]
            self._shard_groups[(rank, size)] = TokenGroups.from_sample_index(shard.reshape(-1), self.num_samples)
        return self._shard_groups[(rank, size)]


class _FastWeightSlot:
    """What both fast-weight linears share: identity, expected shapes, the bound weights."""

    # Set by `_init_fast_weights`; the base class __init__ runs first.
    fast_weight_target: str
    fast_weight_layer: int
    fast_weight_config: FastWeightConfig
    fast_weight_projections: tuple[str, ...]
    _binding: FastWeightBinding | None

    def _init_fast_weights(
        self, target: str, layer_number: int, config: FastWeightConfig, allowed: tuple[str, ...]
    ) -> None:
        if target not in allowed:
            raise ValueError(f"{type(self).__name__} carries targets {allowed}, got {target!r}")
        self.fast_weight_target = target
        self.fast_weight_layer = layer_number
        self.fast_weight_config = config
        self.fast_weight_projections = target_projections(target, self.config.gated_linear_unit)
        self._binding = None

    @property
    def fast_weight_keys(self) -> tuple[FastWeightKey, ...]:
        return tuple((self.fast_weight_layer, p) for p in self.fast_weight_projections)

    def local_fast_weight_shapes(self) -> dict[FastWeightKey, tuple[tuple[int, int], tuple[int, int]]]:
        """key -> (A's [r, in_local], B's [out_local, r]) that this rank binds, per sample."""
        raise NotImplementedError

    def _check_binding(self, binding: FastWeightBinding) -> None:
        for key, (a_shape, b_shape) in self.local_fast_weight_shapes().items():
            if key not in binding.weights:
                raise KeyError(f"the binding has no fast weights for layer {key[0]} projection {key[1]!r}")
            A, B = binding.weights[key]
            if tuple(A.shape[1:]) != a_shape or tuple(B.shape[1:]) != b_shape:
                raise ValueError(f"fast weights of layer {key[0]} {key[1]!r}: expected local A [n, {a_shape[0]}, "
                                 f"{a_shape[1]}] and B [n, {b_shape[0]}, {b_shape[1]}], got {tuple(A.shape)} and "
                                 f"{tuple(B.shape)} (shard them with shard_fast_weights)")

    def _tokens(self, x_SBI: torch.Tensor, sequence_shards: int = 1) -> tuple[FastWeightBinding, torch.Tensor]:
        """The binding and x as [T, in] tokens; x holds 1 / sequence_shards of the binding's sequence."""
        binding = self._binding
        assert binding is not None
        b, s = binding.sample_index.shape
        if x_SBI.shape[:2] != (s // sequence_shards, b) or s % sequence_shards:
            shard = f" / {sequence_shards} sequence-parallel ranks" if sequence_shards > 1 else ""
            raise ValueError(f"layer {self.fast_weight_layer} {self.fast_weight_target}: input [s, b] = "
                             f"{tuple(x_SBI.shape[:2])} does not match the binding's [b, s] = ({b}, {s}){shard}")
        return binding, x_SBI.reshape(-1, x_SBI.shape[-1])


class FastWeightColumnParallelLinear(_FastWeightSlot, ColumnParallelLinear):
    """ColumnParallelLinear (fc1 or qkv) plus per-sample adapters; base parameters unchanged.

    The local output holds one contiguous block per projection ([gate; up] for a gated fc1);
    projection i's adapter writes block i with its own A and B.
    """

    def __init__(self, *args, fast_weight_target: str, fast_weight_layer: int,
                 fast_weight_config: FastWeightConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fast_weights(fast_weight_target, fast_weight_layer, fast_weight_config, ("fc1", "qkv"))
        if self.output_size_per_partition % len(self.fast_weight_projections):
            raise ValueError(f"local output {self.output_size_per_partition} does not split into "
                             f"{self.fast_weight_projections}")

    def local_fast_weight_shapes(self) -> dict[FastWeightKey, tuple[tuple[int, int], tuple[int, int]]]:
        r = self.fast_weight_config.rank
        out_local = self.output_size_per_partition // len(self.fast_weight_projections)
        return {key: ((r, self.input_size), (out_local, r)) for key in self.fast_weight_keys}

    def _forward_impl(self, input, weight, *args, **kwargs):
        # Megatron's forward calls this with the input it multiplies (this rank's sequence shard
        # under SP, gathered inside) and adds nothing to the result but an optional gather.
        output = super()._forward_impl(input, weight, *args, **kwargs)
        if self._binding is None:
            return output
        pairs = [self._binding.weights[key] for key in self.fast_weight_keys]
        r = self.fast_weight_config.rank
        # One down-projection for all projections: A_cat [n, parts * r, in].
        A_cat = torch.cat([A for A, _ in pairs], dim=1)
        if self.sequence_parallel:
            binding, h = self._sequence_parallel_down_projection(input, A_cat)
        else:
            binding, x_TI = self._tokens(input)
            h = segmented_matmul(x_TI.index_select(0, binding.groups.order), binding.groups, A_cat.to(x_TI.dtype))
            # h is the same on every rank; its gradient is a partial sum over the ranks' output
            # shards, so it is all-reduced: x and A then get their full gradients on every rank.
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        groups = binding.groups
        y = torch.cat([segmented_matmul(h_part, groups, B.to(h.dtype))
                       for h_part, (_, B) in zip(h.split(r, dim=1), pairs)], dim=1)
        out_TO = output.reshape(groups.num_tokens, output.shape[-1])
        return out_TO.index_add(0, groups.order, y, alpha=self.fast_weight_config.scale).view_as(output)

    def _sequence_parallel_down_projection(
        self, x_shard: torch.Tensor, A_cat: torch.Tensor
    ) -> tuple[FastWeightBinding, torch.Tensor]:
        """SP: h = x A_s^T of every token of the sequence, [T', parts * r] in `binding.groups` order,
        from this rank's sequence shard x_shard [s/P, b, in]."""
        rank, size = self.tp_group.rank(), self.tp_group.size()
        binding, x_TI = self._tokens(x_shard, sequence_shards=size)
        local = binding.sequence_shard_groups(rank, size)
        # A is replicated, but this rank projects only its tokens: all-reduce A's gradient.
        A_cat = copy_to_tensor_model_parallel_region(A_cat, group=self.tp_group).to(x_TI.dtype)
        h_local = segmented_matmul(x_TI.index_select(0, local.order), local, A_cat)
        # Back to the shard's token order (0 for tokens of no sample), then gather the sequence.
        h_shard = h_local.new_zeros(local.num_tokens, h_local.shape[1]).index_copy(0, local.order, h_local)
        # h's gradient is a partial sum over the output shards: the backward reduce-scatters it.
        h_all = gather_from_sequence_parallel_region(h_shard, tensor_parallel_output_grad=True, group=self.tp_group)
        return binding, h_all.index_select(0, binding.groups.order)


class FastWeightRowParallelLinear(_FastWeightSlot, RowParallelLinear):
    """RowParallelLinear (fc2 or proj) plus per-sample adapters; base parameters unchanged."""

    def __init__(self, *args, fast_weight_target: str, fast_weight_layer: int,
                 fast_weight_config: FastWeightConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fast_weights(fast_weight_target, fast_weight_layer, fast_weight_config, ("fc2", "proj"))

    def local_fast_weight_shapes(self) -> dict[FastWeightKey, tuple[tuple[int, int], tuple[int, int]]]:
        r = self.fast_weight_config.rank
        return {key: ((r, self.input_size_per_partition), (self.output_size, r)) for key in self.fast_weight_keys}

    def _forward_impl(self, input, weight, *args, **kwargs):
        # Megatron's forward all-reduces (under SP: reduce-scatters) what this returns: adding the
        # rank's partial adapter output here makes that sum it over the input shards. The input
        # is the whole sequence with or without SP.
        output = super()._forward_impl(input, weight, *args, **kwargs)
        if self._binding is None:
            return output
        binding, x_TI = self._tokens(input)
        groups = binding.groups
        (A, B), = [binding.weights[key] for key in self.fast_weight_keys]
        h = segmented_matmul(x_TI.index_select(0, groups.order), groups, A.to(x_TI.dtype))
        # B is replicated but sees only this rank's partial h: all-reduce its gradient.
        B = copy_to_tensor_model_parallel_region(B, group=self.tp_group).to(x_TI.dtype)
        y = segmented_matmul(h, groups, B)
        out_TO = output.reshape(x_TI.shape[0], output.shape[-1])
        return out_TO.index_add(0, groups.order, y, alpha=self.fast_weight_config.scale).view_as(output)


FastWeightLinear = FastWeightColumnParallelLinear | FastWeightRowParallelLinear


def fast_weight_modules(model: torch.nn.Module) -> list[FastWeightLinear]:
    """The fast-weight linears of a model (a DDP wrapper is fine), checked against their layers.

    Each linear knows the layer number its spec was built for; a linear inside a TransformerLayer
    with another number means a per-layer spec was reused for several layers.
    """
    modules = [m for m in model.modules() if isinstance(m, _FastWeightSlot)]
    for layer in model.modules():
        if isinstance(layer, TransformerLayer):
            for m in layer.modules():
                if isinstance(m, _FastWeightSlot) and m.fast_weight_layer != layer.layer_number:
                    raise ValueError(f"a fast-weight {m.fast_weight_target} built for layer {m.fast_weight_layer} "
                                     f"sits in layer {layer.layer_number}: build the model with "
                                     "get_decoder_block_spec (one spec per layer)")
    return modules


@contextlib.contextmanager
def bind_fast_weights(model: torch.nn.Module, binding: FastWeightBinding) -> Iterator[None]:
    """Attach `binding` to every fast-weight linear of `model` for the body of the `with`.

    A backward after the `with` only uses saved tensors; activation recomputation re-binds
    (engine/split_model.forward_layers).
    """
    modules = fast_weight_modules(model)
    if not modules:
        raise ValueError("the model has no fast-weight linears: build it with get_decoder_block_spec")
    for m in modules:
        if m._binding is not None:
            raise RuntimeError("fast weights are already bound to this model")
        m._check_binding(binding)
    for m in modules:
        m._binding = binding
    try:
        yield
    finally:
        for m in modules:
            m._binding = None


def bound_fast_weights(model: torch.nn.Module) -> FastWeightBinding | None:
    """The binding attached to `model`'s fast-weight linears (None: unbound or no such linears)."""
    return next((m._binding for m in model.modules() if isinstance(m, _FastWeightSlot)), None)


# --- Unsharded fast weights: layout, initialisation, sharding -------------------------------


@dataclass(frozen=True)
class FastWeightShape:
    """One adapted projection: A [n, r, in_features], B [n, out_features, r] (unsharded)."""

    layer_number: int
    projection: str
    in_features: int
    out_features: int

    @property
    def key(self) -> FastWeightKey:
        return (self.layer_number, self.projection)


def fast_weight_layout(model_config: TransformerConfig, config: FastWeightConfig) -> list[FastWeightShape]:
    """Every adapted projection of the model, by layer number then projection (unsharded sizes)."""
    h, ffn, kv = model_config.hidden_size, model_config.ffn_hidden_size, model_config.kv_channels
    heads = model_config.num_attention_heads
    groups = model_config.num_query_groups or heads
    sizes = {"qkv": (h, kv * (heads + 2 * groups)), "proj": (kv * heads, h),
             "gate": (h, ffn), "up": (h, ffn), "down": (ffn, h)}
    layout = []
    for layer in adapted_layer_numbers(model_config.num_layers, config.layer_fraction):
        for target in TARGETS:
            if target in config.targets:
                for projection in target_projections(target, model_config.gated_linear_unit):
                    layout.append(FastWeightShape(layer, projection, *sizes[projection]))
    return layout


def _tensor_seed(sample_seed: int, shape: FastWeightShape) -> int:
    # A of (sample, layer, projection) does not depend on the other samples of the pack nor on
    # which layers this pipeline stage builds.
    seed = (sample_seed * 100_003 + shape.layer_number) * len(_PROJECTION_IDS) + _PROJECTION_IDS[shape.projection]
    return seed % (2**63 - 1)  # torch.Generator seeds are int64; Python ints are not bounded


def init_fast_weights(
    layout: Sequence[FastWeightShape],
    sample_seeds: Sequence[int],
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> FastWeights:
    """Fresh unsharded fast weights, one sample per seed: A ~ kaiming_uniform(a=sqrt(5)), B = 0.

    Each sample's A [r, in] is drawn in fp32 exactly as torch.nn.init draws an nn.Linear(in, r)
    weight (U(-1/sqrt(in), 1/sqrt(in))), from a generator seeded by (seed, layer, projection);
    then cast to `dtype`.
    """
    weights: FastWeights = {}
    for shape in layout:
        rows = []
        for seed in sample_seeds:
            a = torch.empty(rank, shape.in_features)
            generator = torch.Generator().manual_seed(_tensor_seed(seed, shape))
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            rows.append(a)
        A = torch.stack(rows) if rows else torch.empty(0, rank, shape.in_features)
        A = A.to(dtype=dtype, device=device)
        B = torch.zeros(len(sample_seeds), shape.out_features, rank, dtype=dtype, device=device)
        weights[shape.key] = (A, B)
    return weights


def shard_fast_weights(weights: Mapping[FastWeightKey, TensorPair], tp_rank: int, tp_size: int) -> FastWeights:
    """This rank's local fast weights from unsharded ones (differentiable views; see SHARD_DIMS)."""
    local: FastWeights = {}
    for key, tensors in weights.items():
        pair = []
        for tensor, dim in zip(tensors, SHARD_DIMS[key[1]]):
            if dim is None:
                pair.append(tensor)
                continue
            if tensor.shape[dim] % tp_size:
                raise ValueError(f"{key}: size {tensor.shape[dim]} along dim {dim} does not split into {tp_size} ranks")
            pair.append(tensor.chunk(tp_size, dim=dim)[tp_rank])
        local[key] = (pair[0], pair[1])
    return local
