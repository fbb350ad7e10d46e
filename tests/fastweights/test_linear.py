"""Fast-weight linears in a Megatron GPTModel: no-op without weights, per-sample in packs, the
dense math, TP = 2 against TP = 1 (outputs and gradients), and kept out of parameters/buffers."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from megatron_focusft.data.batch import sample_index_from_doc_ids
from megatron_focusft.fastweights import (
    FastWeightBinding,
    FastWeightConfig,
    TokenGroups,
    adapted_layer_numbers,
    bind_fast_weights,
    fast_weight_layout,
    fast_weight_modules,
    init_fast_weights,
    shard_fast_weights,
    with_fast_weights,
)
from megatron_focusft.masks import segment_mask
from megatron_focusft.models.gpt import build_gpt_model
from megatron_focusft.models.presets import get_preset, transformer_config
from megatron_focusft.models.spec import get_decoder_block_spec, get_segment_attention_layer_spec
from tests.helpers.distributed import init_model_parallel
from tests.helpers.fast_weights import check_fast_weights, select_samples, unshard_fast_weights
from tests.helpers.layouts import random_layout

VOCAB = get_preset("tiny").vocab_size
SMALL = FastWeightConfig(rank=8, alpha=16.0)  # tiny preset (4 layers): layers 3 and 4 adapted


def build_model(seed: int, fast_weights: FastWeightConfig | None, **overrides):
    """Tiny GPTModel, plain (fast_weights=None) or with the fast-weight block spec; same init either way."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    preset = get_preset("tiny")
    config = transformer_config(preset, **overrides)
    layer_spec = get_segment_attention_layer_spec("sdpa")
    spec = layer_spec if fast_weights is None else get_decoder_block_spec(layer_spec, config, fast_weights)
    torch.manual_seed(seed)
    return build_gpt_model(config, preset, spec)


def random_fast_weights(model_config, config: FastWeightConfig, num_samples: int, seed: int, dtype=torch.float32):
    """Unsharded fast weights: seeded kaiming A, and a nonzero random B so the adapters act."""
    weights = init_fast_weights(fast_weight_layout(model_config, config), [seed * 1000 + i for i in range(num_samples)],
                                config.rank, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return {key: (A, 0.05 * torch.randn(B.shape, generator=g, dtype=dtype)) for key, (A, B) in weights.items()}


def leaves(weights):
    return {key: (A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_())
            for key, (A, B) in weights.items()}


def packed_batch(seed: int, batch: int = 2, seq: int = 40):
    doc_ids = random_layout("causal", batch, seq, seed=seed, max_doc=16)["doc_ids"]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    return tokens, labels, positions, doc_ids


# --- config, layout, sharding ----------------------------------------------------------------


def test_adapted_layers_are_the_top_fraction_in_megatron_numbering():
    assert list(adapted_layer_numbers(4, 0.35)) == [3, 4]  # int(2.6) = 2 -> 0-based 2, 3
    assert list(adapted_layer_numbers(28, 0.35)) == list(range(19, 29))  # Qwen2.5-7B: int(18.2) = 18
    assert list(adapted_layer_numbers(32, 0.35)) == list(range(21, 33))
    assert list(adapted_layer_numbers(3, 1.0)) == [1, 2, 3]
    with pytest.raises(ValueError):
        FastWeightConfig(targets=("fc1", "o_proj"))


def test_layout_and_seeded_init():
    config = transformer_config(get_preset("tiny"))
    fw = FastWeightConfig(targets=("qkv", "proj", "fc1", "fc2"))
    layout = fast_weight_layout(config, fw)
    shapes = {s.key: (s.in_features, s.out_features) for s in layout}
    assert shapes[(3, "gate")] == shapes[(4, "up")] == (256, 688)
    assert shapes[(3, "down")] == (688, 256)
    assert shapes[(3, "qkv")] == (256, 64 * (4 + 2 * 2)) and shapes[(4, "proj")] == (256, 256)
    assert {layer for layer, _ in shapes} == {3, 4}
    weights = init_fast_weights(layout, [7, 8], rank=32)
    A, B = weights[(3, "down")]
    assert A.shape == (2, 32, 688) and B.shape == (2, 256, 32) and torch.all(B == 0)
    # Exactly nn.Linear(in, r)'s default weight init, from the (seed, layer, projection) generator.
    from megatron_focusft.fastweights.linear import _tensor_seed

    shape = next(s for s in layout if s.key == (3, "down"))
    torch.manual_seed(_tensor_seed(8, shape))
    assert torch.equal(A[1], torch.nn.Linear(688, 32, bias=False).weight.detach())
    assert A.abs().max() <= 1 / math.sqrt(688)
    # A sample's weights do not depend on the other samples or on the layout subset.
    alone = init_fast_weights([shape], [8], rank=32)
    assert torch.equal(alone[(3, "down")][0][0], A[1])
    # Supplied fast weights are checked against the layout.
    check_fast_weights(layout, weights, rank=32)
    with pytest.raises(KeyError):
        check_fast_weights(layout[1:], weights, rank=32)
    with pytest.raises(ValueError, match="expected A"):
        check_fast_weights(layout, {**weights, (3, "down"): (A, B[:, :, :16])}, rank=32)


def test_shard_and_unshard_round_trip():
    config = transformer_config(get_preset("tiny"))
    fw = FastWeightConfig(rank=4, targets=("qkv", "proj", "fc1", "fc2"))
    full = random_fast_weights(config, fw, 3, seed=1)
    shards = [shard_fast_weights(full, rank, 2) for rank in range(2)]
    assert shards[1][(3, "gate")][1].shape == (3, 344, 4) and shards[1][(3, "gate")][0].shape == (3, 4, 256)
    assert shards[1][(3, "down")][0].shape == (3, 4, 344) and shards[1][(3, "down")][1].shape == (3, 256, 4)
    back = unshard_fast_weights(shards)
    for key, (A, B) in full.items():
        assert torch.equal(back[key][0], A) and torch.equal(back[key][1], B)


def test_sample_index_is_micro_batch_wide():
    doc_ids = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 2], [-1, -1, -1, -1]])
    assert sample_index_from_doc_ids(doc_ids).tolist() == [[0, 0, 1, -1], [2, 3, 3, 4], [-1, -1, -1, -1]]


# --- (a) no binding, or B = 0: exactly the plain model ---------------------------------------


def test_without_fast_weights_or_with_zero_B_the_model_is_bit_identical(single_rank):
    tokens, _, positions, doc_ids = packed_batch(seed=3)
    mask = segment_mask("causal", doc_ids=doc_ids)
    plain = build_model(5, None)
    model = build_model(5, SMALL)
    with torch.no_grad():
        expected = plain(tokens, positions, mask)
        assert torch.equal(model(tokens, positions, mask), expected)
        sample_index = sample_index_from_doc_ids(doc_ids)
        n = int(sample_index.max()) + 1
        fresh = init_fast_weights(fast_weight_layout(model.config, SMALL), list(range(n)), SMALL.rank)
        with bind_fast_weights(model, FastWeightBinding(sample_index, fresh)):
            assert torch.equal(model(tokens, positions, mask), expected)
        with bind_fast_weights(model, FastWeightBinding(sample_index, random_fast_weights(model.config, SMALL, n, 2))):
            assert not torch.allclose(model(tokens, positions, mask), expected, atol=1e-3)
        # Unbound again after the `with`.
        assert torch.equal(model(tokens, positions, mask), expected)


# --- (b) a packed batch equals each sample run alone with its own fast weights ---------------


def test_packed_samples_match_each_sample_alone(single_rank):
    tokens, labels, positions, doc_ids = packed_batch(seed=11)
    model = build_model(6, SMALL)
    sample_index = sample_index_from_doc_ids(doc_ids)
    n = int(sample_index.max()) + 1
    assert n >= 4
    full = random_fast_weights(model.config, SMALL, n, seed=4)
    packed_weights = leaves(full)
    with bind_fast_weights(model, FastWeightBinding(sample_index, packed_weights)):
        logits = model(tokens, positions, segment_mask("causal", doc_ids=doc_ids))
        per_token = model(tokens, positions, segment_mask("causal", doc_ids=doc_ids), labels=labels)
    (per_token * (sample_index >= 0)).sum().backward()
    for s in range(n):
        row, idx = [t for t in (sample_index == s).nonzero().t()]
        row = int(row[0])
        own = leaves(select_samples(full, [s]))
        alone_ids = torch.zeros(1, len(idx), dtype=torch.long)
        alone = (tokens[row, idx][None], torch.arange(len(idx))[None], segment_mask("causal", doc_ids=alone_ids))
        with bind_fast_weights(model, FastWeightBinding(alone_ids, own)):
            alone_logits = model(*alone)
            alone_loss = model(*alone, labels=labels[row, idx][None]).sum()
        alone_loss.backward()
        torch.testing.assert_close(logits[row, idx], alone_logits[0], rtol=1e-4, atol=2e-5)
        # The packed loss gives sample s's fast weights exactly its own, unpacked gradient.
        for key, (A, B) in own.items():
            torch.testing.assert_close(packed_weights[key][0].grad[s], A.grad[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(packed_weights[key][1].grad[s], B.grad[0], rtol=1e-4, atol=1e-6)


# --- (c) the MLP math, written out densely ---------------------------------------------------


def test_adapted_mlp_matches_dense_computation(single_rank):
    from megatron.core.process_groups_config import ProcessGroupCollection

    build_model(0, None)  # initialises Megatron's parallel state when needed
    config = transformer_config(get_preset("tiny"), params_dtype=torch.float64)
    fw = FastWeightConfig(rank=4, alpha=6.0)
    spec = with_fast_weights(get_segment_attention_layer_spec("sdpa"), fw, layer_number=1)
    torch.manual_seed(0)
    mlp = spec.submodules.mlp(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                              is_mtp_layer=False, ffn_hidden_size=config.ffn_hidden_size)
    assert mlp.linear_fc1.weight.dtype == torch.float64
    s, b, h, ffn = 9, 2, config.hidden_size, config.ffn_hidden_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s, b, h, generator=g, dtype=torch.float64)
    sample_index = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1], [2, 2, 2, 2, 2, 2, 2, 2, 2]])
    weights = {}
    for proj, (d_in, d_out) in {"gate": (h, ffn), "up": (h, ffn), "down": (ffn, h)}.items():
        weights[(1, proj)] = (torch.randn(3, 4, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in),
                              torch.randn(3, d_out, 4, generator=g, dtype=torch.float64) / 2)
    with bind_fast_weights(mlp, FastWeightBinding(sample_index, weights)):
        out, bias = mlp(x)
    assert bias is None

    W_gate, W_up = mlp.linear_fc1.weight.detach().chunk(2, dim=0)
    W_down = mlp.linear_fc2.weight.detach()
    scale = fw.alpha / fw.rank
    expected = torch.empty_like(x)
    for row in range(b):
        for pos in range(s):
            sample, v = int(sample_index[row, pos]), x[pos, row]

            def lora(proj, inp):
                if sample < 0:
                    return 0.0
                A, B = weights[(1, proj)]
                return scale * B[sample] @ (A[sample] @ inp)

            gate = W_gate @ v + lora("gate", v)
            up = W_up @ v + lora("up", v)
            act = torch.nn.functional.silu(gate) * up
            expected[pos, row] = W_down @ act + lora("down", act)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# --- (d) TP = 2 equals TP = 1: outputs and gradients -----------------------------------------


ALL_TARGETS = FastWeightConfig(rank=8, alpha=16.0, targets=("qkv", "proj", "fc1", "fc2"))


def _tp_forward_backward(tp: int, sp: bool = False) -> dict:
    """Runs on every rank: logits (this rank's vocab shard) and gradients w.r.t. x and the local fast weights.

    With sp the decoder input is this rank's sequence shard (x[rank s/tp : (rank+1) s/tp]), as
    GPTModel's embedding would hand it over; x_grad is then the gradient of that shard.
    """
    from megatron.core import parallel_state

    init_model_parallel(tp=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    model = build_model(7, ALL_TARGETS, tensor_model_parallel_size=tp, sequence_parallel=sp)
    tokens, _, positions, doc_ids = packed_batch(seed=21, seq=32)
    sample_index = sample_index_from_doc_ids(doc_ids)
    n = int(sample_index.max()) + 1
    local = leaves(shard_fast_weights(random_fast_weights(model.config, ALL_TARGETS, n, seed=9), rank, tp))
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(32, 2, model.config.hidden_size, generator=g)  # decoder input [s, b, h]
    x = (x_full.chunk(tp, dim=0)[rank] if sp else x_full).clone().requires_grad_()
    cotangent = torch.randn(2, 32, VOCAB, generator=g).chunk(tp, dim=-1)[rank]
    with bind_fast_weights(model, FastWeightBinding(sample_index, local)):
        logits = model(tokens, positions, segment_mask("causal", doc_ids=doc_ids), decoder_input=x)
    # Each rank holds a vocab shard of the logits; the sum of the ranks' partial losses is the
    # TP = 1 loss, and Megatron's backward all-reduces what each rank's shard contributes.
    (logits * cotangent).sum().backward()
    return {"logits": logits.detach(), "x_grad": x.grad,
            "grads": {key: (A.grad, B.grad) for key, (A, B) in local.items()}}


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_tp2_matches_tp1_outputs_and_gradients(worker_pool, sp):
    pool = worker_pool(2)
    reference = pool.run(_tp_forward_backward, 1)[0]
    sharded = pool.run(_tp_forward_backward, 2, sp)
    # One forward/backward of one layer, no inner loop: TP and SP only reorder fp32 sums of <= 256
    # products (~sqrt(256) eps ~ 2e-6 relative), so 1e-5 (1e-4 for the fast-weight gradients, sums
    # over every token) with a small absolute term for entries that cancel.
    torch.testing.assert_close(torch.cat([r["logits"] for r in sharded], dim=-1), reference["logits"],
                               rtol=1e-5, atol=1e-5)
    x_grads = [r["x_grad"] for r in sharded]
    if sp:  # each rank holds the gradient of its own sequence shard
        x_grads = [torch.cat(x_grads, dim=0)] * len(sharded)
    for x_grad in x_grads:
        torch.testing.assert_close(x_grad, reference["x_grad"], rtol=1e-5, atol=1e-6)
    grads = unshard_fast_weights([r["grads"] for r in sharded])
    assert grads.keys() == reference["grads"].keys() and len(grads) == 2 * 5
    for key, (dA, dB) in reference["grads"].items():
        assert dA.abs().max() > 0 and dB.abs().max() > 0, key
        torch.testing.assert_close(grads[key][0], dA, rtol=1e-4, atol=1e-6, msg=lambda m: f"dA {key}: {m}")
        torch.testing.assert_close(grads[key][1], dB, rtol=1e-4, atol=1e-6, msg=lambda m: f"dB {key}: {m}")
        # Replicated fast weights get the same full gradient on every rank.
        replicated = 0 if key[1] in ("qkv", "gate", "up") else 1
        torch.testing.assert_close(sharded[0]["grads"][key][replicated], sharded[1]["grads"][key][replicated],
                                   rtol=1e-5, atol=1e-7)


def test_binding_groups_of_a_sequence_shard():
    # Rank p of P holds positions [p s/P, (p+1) s/P) of every row: tokens numbered in [s, b] order.
    sample_index = torch.tensor([[0, 0, 1, 1, -1, 2], [3, 3, 3, 4, 4, -1]])
    binding = FastWeightBinding(sample_index, {(1, "up"): (torch.zeros(5, 2, 3), torch.zeros(5, 4, 2))})
    for rank in range(3):
        groups = binding.sequence_shard_groups(rank, 3)
        shard = sample_index[:, 2 * rank:2 * rank + 2].t().reshape(-1)  # [2 positions x 2 rows]
        expected = TokenGroups.from_sample_index(shard, 5)
        assert groups.num_tokens == 4 and groups.counts == expected.counts
        assert torch.equal(groups.order, expected.order)
    assert binding.sequence_shard_groups(1, 3) is binding.sequence_shard_groups(1, 3)
    with pytest.raises(ValueError, match="does not split"):
        binding.sequence_shard_groups(0, 4)


# --- (e) fast weights stay out of parameters, state dicts and DDP buffers --------------------


def test_fast_weights_are_not_parameters_state_or_grad_buffers(single_rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    plain = build_model(8, None)
    model = build_model(8, SMALL)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert model.sharded_state_dict().keys() == plain.sharded_state_dict().keys()
    adapted = [(m.fast_weight_layer, m.fast_weight_target) for m in fast_weight_modules(model)]
    assert adapted == [(3, "fc1"), (3, "fc2"), (4, "fc1"), (4, "fc2")]
    assert type(model.decoder.layers[1].mlp.linear_fc1) is ColumnParallelLinear  # layer 2 stays plain

    tokens, labels, positions, doc_ids = packed_batch(seed=13, seq=24)
    mask = segment_mask("causal", doc_ids=doc_ids)
    sample_index = sample_index_from_doc_ids(doc_ids)
    n = int(sample_index.max()) + 1
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
    main_grads = {}
    for name, module, weights in (
        ("plain", plain, None),
        ("zero B", model, leaves(init_fast_weights(fast_weight_layout(model.config, SMALL), range(n), SMALL.rank))),
        ("random B", model, leaves(random_fast_weights(model.config, SMALL, n, seed=5))),
    ):
        ddp = DistributedDataParallel(module.config, ddp_config, module)
        ddp.zero_grad_buffer()
        with bind_fast_weights(ddp, FastWeightBinding(sample_index, weights)) if weights else contextlib.nullcontext():
            ddp(tokens, positions, mask, labels=labels).sum().backward()
        params = set(module.parameters())
        assert set().union(*(buffer.params for buffer in ddp.buffers)) == params
        assert sum(buffer.numel for buffer in ddp.buffers) == sum(p.numel() for p in params)
        main_grads[name] = [p.main_grad.clone() for p in module.parameters()]
        if weights:
            fast = [t for pair in weights.values() for t in pair]
            assert all(not hasattr(t, "main_grad") and t.grad is not None for t in fast)
            assert not any(t is p for t in fast for p in params)
        assert [n for n, _ in module.named_parameters()] == [n for n, _ in plain.named_parameters()]
    # B = 0 leaves the slow weights' gradients bit-identical; a nonzero B changes them.
    assert all(torch.equal(a, b) for a, b in zip(main_grads["zero B"], main_grads["plain"]))
    assert not all(torch.allclose(a, b) for a, b in zip(main_grads["random B"], main_grads["plain"]))


def test_binding_errors_are_clear(single_rank):
    model = build_model(9, SMALL)
    sample_index = torch.zeros(1, 8, dtype=torch.long)
    weights = init_fast_weights(fast_weight_layout(model.config, SMALL), [0], SMALL.rank)
    with pytest.raises(KeyError, match="layer 4"):
        layer_3_only = {key: pair for key, pair in weights.items() if key[0] == 3}
        with bind_fast_weights(model, FastWeightBinding(sample_index, layer_3_only)):
            pass
    with pytest.raises(ValueError, match="shard_fast_weights"):
        bad = {k: (A, B[:, :-1]) for k, (A, B) in weights.items()}
        with bind_fast_weights(model, FastWeightBinding(sample_index, bad)):
            pass
    with pytest.raises(ValueError, match="does not match the binding"):
        with bind_fast_weights(model, FastWeightBinding(sample_index, weights)):
            model(torch.zeros(1, 12, dtype=torch.long), torch.arange(12)[None], None)
    # A single per-layer spec reused for every layer is caught.
    preset, config = get_preset("tiny"), transformer_config(get_preset("tiny"))
    reused = build_gpt_model(config, preset, with_fast_weights(get_segment_attention_layer_spec("sdpa"), SMALL, 4))
    with pytest.raises(ValueError, match="one spec per layer"):
        with bind_fast_weights(reused, FastWeightBinding(sample_index, weights)):
            pass
