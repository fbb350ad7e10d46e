"""The training-methods registry: each method's flags, their one default, and its resume keys."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_focusft.blockattn.sample_forms import BlockFormConfig
from megatron_focusft.blockattn.step import DistillConfig
from megatron_focusft.engine.setup import OptimizerSetup
from megatron_focusft.fastweights import FastWeightConfig
from megatron_focusft.focusft import FocusftConfig
from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.methods import METHODS

BASE = ["--train-iters", "1", "--mock-data"]


def test_every_method_is_a_training_mode_and_declares_flags_that_exist(tmp_path):
    args = parse_training_args(BASE)
    assert set(METHODS) == {"focusft", "sft", "block-sft", "block-distill"}
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    # The block methods read chat data and block-distill a teacher checkpoint.
    needs = {"block-sft": ["--train-iters", "1", "--data-path", str(chats)],
             "block-distill": ["--train-iters", "1", "--data-path", str(chats), "--teacher-checkpoint", str(tmp_path)]}
    for method in METHODS.values():
        argv = [*needs.get(method.name, BASE), "--training-mode", method.name]
        assert parse_training_args(argv).training_mode == method.name
        for key in method.resume_keys:
            assert hasattr(args, key), f"{method.name} resume key {key} is not a flag"


def test_flag_defaults_are_the_configs_defaults():
    args = parse_training_args(BASE)
    step, fast, opt = FocusftConfig(), FastWeightConfig(), OptimizerSetup()
    assert (args.focusft_inner_steps, args.focusft_inner_lr, args.focusft_inner_grad_clip,
            args.focusft_inner_objective, args.focusft_max_update_norm) == (
        step.inner_steps, step.inner_lr, step.inner_grad_clip, step.inner_objective, step.max_update_norm)
    assert (args.focusft_rank, args.focusft_alpha, args.focusft_layer_fraction, tuple(args.focusft_targets)) == (
        fast.rank, fast.alpha, fast.layer_fraction, fast.targets)
    for field in dataclasses.fields(OptimizerSetup):
        assert getattr(args, field.name) == getattr(opt, field.name), field.name
    forms, distill = BlockFormConfig(), DistillConfig()
    assert (args.block_ratio, args.block_sink_tokens) == (forms.block_ratio, forms.sink_tokens)
    assert (args.distill_temperature, args.distill_ce_weight, args.block_dropout, args.distill_token_weighting,
            args.distill_weight_clip) == (distill.temperature, distill.ce_weight, distill.block_dropout,
                                          distill.token_weighting, distill.weight_clip)


@pytest.mark.parametrize("mode, mask_kind, adapted", [("focusft", "focusft", True), ("sft", "causal", False)])
def test_a_method_says_what_model_and_mask_it_needs(mode, mask_kind, adapted):
    args = parse_training_args([*BASE, "--training-mode", mode, "--focusft-rank", "8"])
    needs = METHODS[mode].model(args)
    assert needs.mask_kind == mask_kind
    assert (needs.fast_weights is not None) == adapted
    if adapted:
        assert needs.fast_weights.rank == 8
    # The baseline under FocuSFT's mask, without the bilevel step (the demo's SFT run).
    focusft_mask = METHODS["sft"].model(parse_training_args([*BASE, "--training-mode", "sft", "--sft-mask", "focusft"]))
    assert focusft_mask.mask_kind == "focusft"


def test_focusft_plans_its_pipeline_schedule_from_the_costs_the_balance_measured():
    """`--pipeline-balance auto`'s StageBalance reaches FocuSFT's forward step: its interleaved
    schedule plans from those costs (an inner backward three times its forward: stride 3 on two
    chunks per rank with layers 3-4 adapted), without a balance from nominal costs (stride 2)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_focusft.engine.method import StageBalance
    from megatron_focusft.focusft.interleaved import InterleavedSchedule
    from megatron_focusft.focusft.pipeline_cost import NOMINAL_COSTS, FocusftPipeline, LayerCosts, stage_layers
    from megatron_focusft.models.presets import get_preset

    args = parse_training_args([*BASE, "--focusft-layer-fraction", "0.5"])
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                               pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                               pipeline_dtype=torch.float32)
    costs = LayerCosts(1, 2, 1, 6, 1, 2, 0, 0, 0, 0)
    pipeline = FocusftPipeline(stage_layers(4, 3, [1, 1, 1, 1]), 2, False, 3, num_devices=2)
    for balanced, plan_costs, stride in ((StageBalance((1, 1, 1, 1), "line", costs), costs, 3),
                                         (None, NOMINAL_COSTS, 2)):
        step = METHODS["focusft"].run(args, config, 0, get_preset("tiny"), balanced).forward_step
        assert step.plan_costs is (balanced and costs)
        planned = pipeline.planned(plan_costs)
        assert planned.stride == stride
        assert InterleavedSchedule(step).plan(config, 3).order == planned.simulate(plan_costs).order
