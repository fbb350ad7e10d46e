"""Where each pipeline stage's layers sit (models/spec.stage_layer_span): Megatron's placement for
even and uneven splits, and for a pipeline layout asked about any stage from any rank."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.models.presets import get_preset, transformer_config
from megatron_focusft.models.spec import stage_layer_span


@pytest.mark.parametrize("placement, spans", [
    ({}, [(0, 2), (2, 2)]),
    ({"num_layers_in_last_pipeline_stage": 3}, [(0, 1), (1, 3)]),
    ({"pipeline_model_parallel_layout": "Ettt|tL"}, [(0, 3), (3, 1)]),
])
def test_every_stage_span_from_this_rank(single_rank, placement, spans):
    # single_rank: this process is pipeline rank 0, so stage 1's answer must come from pp_rank.
    config = transformer_config(get_preset("tiny"), pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                                **placement)
    assert [stage_layer_span(config, pp_rank=s) for s in range(2)] == spans
