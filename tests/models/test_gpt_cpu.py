"""Megatron GPTModel on CPU: TP = 2 over gloo trains exactly like TP = 1."""

from __future__ import annotations

import torch

from megatron_focusft.training.setup import ModelSetup, OptimizerSetup, build_model, build_optimizer
from megatron_focusft.training.sft import train_step
from tests.helpers.batches import random_batch
from tests.helpers.distributed import init_model_parallel


def _train(tp: int, steps: int) -> dict:
    """Runs on every rank: a few optimizer steps of the tiny model on fixed packed batches."""
    from megatron.core import parallel_state

    init_model_parallel(tp=tp)
    model, _ = build_model(ModelSetup(tensor_model_parallel_size=tp))
    optimizer = build_optimizer(model, OptimizerSetup(lr=3e-3))
    micro_batches = [random_batch(2, 48, 512, seed=seed) for seed in (11, 12)]
    losses, grads = [], {}
    for step in range(steps):
        losses.append(train_step(model, optimizer, micro_batches))
        if step == 0:
            continue
    # Gradients of the last step, as this rank holds them (main_grad buffers after reduction).
    for name, param in model.module.named_parameters():
        grads[name] = (param.main_grad.clone(), getattr(param, "partition_dim", -1), getattr(param, "partition_stride", 1))
    return {"losses": losses, "grads": grads, "tp_rank": parallel_state.get_tensor_model_parallel_rank()}


def test_tp2_matches_tp1(worker_pool):
    from megatron_focusft.parallel.tensor_parallel import unshard

    steps = 3
    reference = worker_pool(2).run(_train, 1, steps)[0]
    sharded = worker_pool(2).run(_train, 2, steps)
    ref_losses = [step["loss"] for step in reference["losses"]]
    for rank_result in sharded:
        losses = [step["loss"] for step in rank_result["losses"]]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0], f"training did not reduce the loss: {ref_losses}"
    for name, (ref_grad, _, _) in reference["grads"].items():
        grad0, dim, stride = sharded[0]["grads"][name]
        if dim < 0 or not getattr(grad0, "shape", None) or grad0.shape == ref_grad.shape:
            full = grad0
        else:
            full = unshard([r["grads"][name][0] for r in sharded], dim, stride)
        torch.testing.assert_close(full, ref_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
