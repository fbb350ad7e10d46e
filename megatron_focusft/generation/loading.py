"""A model for inference: from a Hugging Face directory or one of this project's checkpoints,
at this process group's tensor-parallel size, optionally with fast-weight linears (test-time
adaptation)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_focusft.convert.commands import load_hf_weights
from megatron_focusft.convert.hf_files import open_hf_directory
from megatron_focusft.engine.checkpoint import ASSETS_DIR, CheckpointError, load_checkpoint, read_checkpoint_info
from megatron_focusft.engine.setup import ModelSetup, build_gpt
from megatron_focusft.fastweights import FastWeightConfig
from megatron_focusft.models.presets import ModelPreset


@dataclass
class InferenceModel:
    """model: the whole GPTModel on this rank (eval mode). assets: the folder that may hold the
    model's tokenizer and generation config. run_config: the training run's settings, when the
    checkpoint was saved by one."""

    model: GPTModel
    shape: ModelPreset
    assets: Path
    run_config: dict[str, Any] | None


def load_inference_model(*, hf_path: str | os.PathLike | None = None, load: str | os.PathLike | None = None,
                         ckpt_step: int | None = None, fast_weights: FastWeightConfig | None = None,
                         bf16: bool = False, attention_backend: str = "sdpa") -> InferenceModel:
    """Exactly one of `hf_path` (HF directory) and `load` (checkpoint directory); collective over TP."""
    if (hf_path is None) == (load is None):
        raise ValueError("give exactly one of --hf-path (a Hugging Face directory) and --load (a checkpoint)")
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("generation runs with --pipeline-model-parallel-size 1")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if hf_path is not None:
        hf = open_hf_directory(hf_path)
        shape, assets, run_config = hf.shape, hf.path, None
    else:
        info = read_checkpoint_info(load, ckpt_step)
        if info is None:
            raise CheckpointError(f"{load} holds no complete checkpoint")
        shape, assets, run_config = info.shape, Path(load) / ASSETS_DIR, info.run_config
    setup = ModelSetup(preset=shape, tensor_model_parallel_size=tp, bf16=bf16, fast_weights=fast_weights,
                       attention_backend=attention_backend)
    model, _ = build_gpt(setup)
    if hf_path is not None:
        load_hf_weights(model, hf)
    else:
        load_checkpoint(load, model, None, None, iteration=ckpt_step, restore_rng=False)
    model.eval()
    return InferenceModel(model, shape, assets, run_config)
