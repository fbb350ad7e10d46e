"""Megatron's pipeline layout strings (engine/pipeline.py): parsed into per-stage layer counts,
written back from them, and refused with the flag named when this build cannot run them."""

from __future__ import annotations

import pytest

from megatron_focusft.engine.pipeline import layout_of_counts, layout_stage_counts


@pytest.mark.parametrize("layout, stages, counts", [
    ("Et|tttL", 2, [1, 3]), ("Et*10|t*6L", 2, [10, 6]), ("Ett|(tt|)*2tL", 4, [2, 2, 2, 1]), ("EttttL", 1, [4])])
def test_layout_strings_give_each_stage_its_layer_count(layout, stages, counts):
    assert layout_stage_counts(layout, stages) == counts
    assert layout_stage_counts(layout_of_counts(counts), stages) == counts


def test_layout_of_counts_is_megatron_syntax():
    assert layout_of_counts([3, 1]) == "Ettt|tL"


@pytest.mark.parametrize("layout, message", [
    ("Et|t|tL", "has 3 stages for --pipeline-model-parallel-size 2 (a layout with virtual stages is not supported"),
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
