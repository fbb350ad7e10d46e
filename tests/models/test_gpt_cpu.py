"""Megatron GPTModel on CPU: TP = 2 over gloo trains exactly like TP = 1."""

from __future__ import annotations

import torch

from megatron_focusft.engine.setup import ModelSetup, OptimizerSetup, build_model, build_optimizer
from megatron_focusft.engine.train_step import train_step
from megatron_focusft.sft import sft_forward_step
from tests.helpers.batches import random_batch
from tests.helpers.distributed import init_model_parallel
from tests.helpers.noise_band import PERTURBATION_SEEDS, assert_curve_within, noise_band, perturb_by_one_ulp


def _train(tp: int, steps: int, perturb_seed: int | None = None) -> dict:
    """Runs on every rank: a few optimizer steps of the tiny model on fixed packed batches; with
    `perturb_seed`, from weights moved by one ulp (the noise band, tests/helpers/noise_band.py)."""
    from megatron.core import parallel_state

    init_model_parallel(tp=tp)
    model, _ = build_model(ModelSetup(tensor_model_parallel_size=tp))
    if perturb_seed is not None:
        perturb_by_one_ulp(model, perturb_seed)
    optimizer = build_optimizer(model, OptimizerSetup(lr=3e-3))
    micro_batches = [random_batch(2, 48, 512, seed=seed) for seed in (11, 12)]
    losses, grads = [], {}
    for step in range(steps):
        losses.append(train_step(model, optimizer, micro_batches, sft_forward_step))
        if step == 0:  # first-step gradients (same weights, no optimizer amplification) as this
            # rank holds them: main_grad buffers after reduction
            grads = {name: (param.main_grad.clone(), getattr(param, "partition_dim", -1),
                            getattr(param, "partition_stride", 1)) for name, param in model.module.named_parameters()}
    return {"losses": losses, "grads": grads, "tp_rank": parallel_state.get_tensor_model_parallel_rank()}


def test_tp2_matches_tp1(worker_pool):
    from megatron_focusft.parallel.tensor_parallel import unshard

    steps = 3
    pool = worker_pool(2)
    reference = pool.run(_train, 1, steps)[0]
    sharded = pool.run(_train, 2, steps)
    ref_losses = [step["loss"] for step in reference["losses"]]
    band = noise_band(ref_losses, [[step["loss"] for step in pool.run(_train, 1, steps, seed)[0]["losses"]]
                                   for seed in PERTURBATION_SEEDS])
    for rank_result in sharded:
        assert_curve_within([step["loss"] for step in rank_result["losses"]], ref_losses, band, "TP 2 loss")
    assert ref_losses[-1] < ref_losses[0], f"training did not reduce the loss: {ref_losses}"
    for name, (ref_grad, _, _) in reference["grads"].items():
        grad0, dim, stride = sharded[0]["grads"][name]
        if dim < 0 or not getattr(grad0, "shape", None) or grad0.shape == ref_grad.shape:
            full = grad0
        else:
            full = unshard([r["grads"][name][0] for r in sharded], dim, stride)
        # One backward: TP splits the matmuls' reductions, so entries differ by fp32 rounding of
        # sums over <= 688 products (~sqrt(688) eps ~ 3e-6 relative): 1e-4 relative, and 1e-6
        # absolute slack for entries whose sums cancel to near zero.
        torch.testing.assert_close(full, ref_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
