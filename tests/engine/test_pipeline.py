"""Megatron's pipeline layout strings (engine/pipeline.py): parsed into per-stage layer counts,
written back from them, and refused with the flag named when this build cannot run them."""

from __future__ import annotations

import pytest

from megatron_focusft.engine.pipeline import layout_of_counts, layout_stage_counts, layout_virtual_stages


@pytest.mark.parametrize("layout, stages, counts, virtual", [
    ("Et|tttL", 2, [1, 3], None), ("Et*10|t*6L", 2, [10, 6], None), ("Ett|(tt|)*2tL", 4, [2, 2, 2, 1], None),
    ("EttttL", 1, [4], None), ("Et*5|t*3|t*5|t*3L", 2, [5, 3, 5, 3], 2), ("Et|tt|t|tt|t|ttL", 2, [1, 2, 1, 2, 1, 2], 3),
    ("Et|t|t|tL", 4, [1, 1, 1, 1], None)])
def test_layout_strings_give_each_stage_its_layer_count(layout, stages, counts, virtual):
    # V x P stages: V virtual stages per rank (stage s on rank s mod P), counts in layer order.
    assert layout_stage_counts(layout, stages) == counts
    assert layout_stage_counts(layout_of_counts(counts), stages) == counts
    assert layout_virtual_stages(layout, stages) == virtual


def test_layout_of_counts_is_megatron_syntax():
    assert layout_of_counts([3, 1]) == "Ettt|tL"


@pytest.mark.parametrize("layout, message", [
    ("Et|t|tL", "has 3 stages, not a multiple of --pipeline-model-parallel-size 2 (V x P stages give V virtual"),
    ("tE|tL", "embedding first, loss last"),
    ("Et|tLL", "embedding first, loss last"),
    ("Et|tmL", "embedding first, loss last"),
    ("Ett|L", "stage 1 holds no decoder layer"),
    ("Etx|tL", "Invalid layer character: x"),
])
def test_layouts_this_build_cannot_run_are_refused(layout, message):
    with pytest.raises(ValueError, match="--pipeline-model-parallel-layout") as error:
        layout_stage_counts(layout, 2)
    assert message in str(error.value)


def test_a_layout_must_place_every_layer_of_the_model(single_rank):
    from megatron_focusft.engine.setup import ModelSetup, build_gpt

    with pytest.raises(ValueError, match="'EttL' places 2 decoder layers; the model has 4"):
        build_gpt(ModelSetup(preset="tiny", pipeline_model_parallel_layout="EttL"))


def test_a_layout_of_virtual_stages_needs_the_setup_to_say_so(single_rank):
    from megatron_focusft.engine.setup import ModelSetup, build_gpt

    with pytest.raises(ValueError, match="'Et\\|t\\|t\\|tL' gives 4 virtual stages per rank, the setup None"):
        build_gpt(ModelSetup(preset="tiny", pipeline_model_parallel_layout="Et|t|t|tL"))
