"""`import-hf` and `export-hf`: Hugging Face directories <-> this project's Megatron checkpoints.

Import is collective (one process per TP x PP rank under torchrun): each rank builds its
stage's model, fills its own shard from the safetensors files and writes it with the rest of
the distributed checkpoint (iteration 0, no optimizer), which then loads at any TP / PP / CP.
Export runs in one process: the checkpoint is loaded at TP = PP = 1 (Megatron reshards).
Both check everything they can before writing, and write aside, then rename.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_focusft.convert.hf_config import default_family, family_of, hf_config_from_shape
from megatron_focusft.convert.hf_files import (
    ASSET_FILES,
    HFCheckpointError,
    HFDirectory,
    check_output_dir,
    commit_dir,
    open_hf_directory,
    staging_dir,
    write_hf_directory,
)
from megatron_focusft.convert.state_dict import (
    SINKS_HF_NAME,
    SINKS_MEGATRON_NAME,
    hf_state_dict,
    megatron_tensor,
    tp_slice,
)
from megatron_focusft.engine.checkpoint import (
    ASSETS_DIR,
    CheckpointError,
    read_checkpoint_info,
    load_checkpoint,
    save_checkpoint,
)
from megatron_focusft.engine.setup import ModelSetup, build_gpt, check_parallel_fit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _global_name(model: GPTModel, local_name: str) -> str:
    """A stage-local parameter name with the global layer number (what the HF layers count)."""
    if not local_name.startswith("decoder.layers."):
        return local_name
    index, _, rest = local_name.removeprefix("decoder.layers.").partition(".")
    return f"decoder.layers.{model.decoder.layers[int(index)].layer_number - 1}.{rest}"


def load_hf_weights(model: GPTModel, hf: HFDirectory) -> None:
    """Copy this rank's shard of every parameter from the HF files into `model` (one stage, TP-sharded)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    # One parameter's HF tensors at a time: memory stays at the size of the largest tensor.
    with torch.no_grad():
        for local_name, param in model.named_parameters():
            name = _global_name(model, local_name)
            full = megatron_tensor(name, hf.read, hf.shape)
            part = tp_slice(name, full, param, tp_rank, tp_size)
            if part.shape != param.shape:
                raise HFCheckpointError(f"{hf.path}: {name} maps to a tensor of shape {list(part.shape)} on TP rank "
                                        f"{tp_rank}, the model holds {list(param.shape)}")
            param.copy_(part)


def import_hf(hf_path: str | os.PathLike, megatron_path: str | os.PathLike, *, overwrite: bool = False,
              bf16: bool = False, log: Callable[[str], None] = print) -> Path:
    """HF directory -> Megatron distributed checkpoint at `megatron_path` (collective).

    Checks the HF directory, the output path and the parallel sizes on every rank before
    anything is written. The checkpoint records the model's shape, and keeps the source
    config.json and tokenizer files in its model_assets folder (export copies them back).
    """
    hf = open_hf_directory(hf_path)
    out = check_output_dir(megatron_path, overwrite)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel_fit(hf.shape, tp, pp)
    stage = out.with_name(f".{out.name}.partial")
    if dist.get_rank() == 0:
        staging_dir(out)  # removes a leftover of an interrupted import
        log(f"importing {hf.family} from {hf.path}: {hf.shape.num_layers} layers, hidden {hf.shape.hidden_size}, "
            f"{hf.shape.num_attention_heads} heads / {hf.shape.num_query_groups} query groups, vocab "
            f"{hf.shape.vocab_size}; TP {tp}, PP {pp}")
    dist.barrier()
    model, _ = build_gpt(ModelSetup(preset=hf.shape, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    bf16=bf16))
    load_hf_weights(model, hf)
    save_checkpoint(stage, 0, model, None, None, extra_state={"imported_from": str(hf.path)})
    if dist.get_rank() == 0:
        assets = stage / ASSETS_DIR
        assets.mkdir()
        for f in [hf.path / "config.json", *hf.asset_files()]:
            shutil.copy2(f, assets / f.name)
        commit_dir(stage, out)
        log(f"wrote {out}")
    dist.barrier()
    return out


def _source_config(checkpoint: Path) -> dict | None:
    path = checkpoint / ASSETS_DIR / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _export_assets(checkpoint: Path, tokenizer_model: str | None) -> list[Path]:
    """Tokenizer (and generation-config) files: from --tokenizer-model when given, else those the
    checkpoint keeps; never its config.json (export writes its own)."""
    folder = Path(tokenizer_model) if tokenizer_model else checkpoint / ASSETS_DIR
    if tokenizer_model and not folder.is_dir():
        raise FileNotFoundError(f"--tokenizer-model {folder} is not a directory")
    found = [folder / name for name in ASSET_FILES if (folder / name).is_file()]
    if tokenizer_model and not found:
        raise FileNotFoundError(f"--tokenizer-model {folder} holds none of {ASSET_FILES}")
    return found


def _export_dtype(name: str, source: dict | None) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    declared = (source or {}).get("dtype") or (source or {}).get("torch_dtype")
    return DTYPES.get(str(declared), torch.float32)


def export_hf(megatron_path: str | os.PathLike, hf_path: str | os.PathLike, *, tokenizer_model: str | None = None,
              overwrite: bool = False, dtype: str = "auto", ckpt_step: int | None = None,
              log: Callable[[str], None] = print) -> Path:
    """This project's checkpoint (any TP / PP / CP it was saved at) -> an HF directory that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. One process; fast weights are
    never part of a checkpoint, so never exported."""
    if dist.get_world_size() != 1:
        raise ValueError(f"export-hf runs in one process (it loads the checkpoint at TP = PP = 1); got "
                         f"{dist.get_world_size()} ranks")
    checkpoint = Path(megatron_path)
    out = check_output_dir(hf_path, overwrite)
    info = read_checkpoint_info(checkpoint, ckpt_step)
    if info is None:
        raise CheckpointError(f"{checkpoint} holds no complete checkpoint")
    shape = info.shape
    source = _source_config(checkpoint)
    family = family_of(source, str(checkpoint / ASSETS_DIR / "config.json")) if source else default_family(shape)
    config = hf_config_from_shape(shape, family, source)
    assets = _export_assets(checkpoint, tokenizer_model)
    model, _ = build_gpt(ModelSetup(preset=shape))
    iteration, _ = load_checkpoint(checkpoint, model, None, None, iteration=ckpt_step, restore_rng=False)
    weights = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
    torch_dtype = _export_dtype(dtype, source)
    stage = staging_dir(out)
    sinks = [(SINKS_HF_NAME, weights.pop(SINKS_MEGATRON_NAME))] if shape.block_sink_tokens else []
    write_hf_directory(stage, config, [*hf_state_dict(weights, shape), *sinks], assets, torch_dtype)
    commit_dir(stage, out)
    log(f"exported iteration {iteration} of {checkpoint} as {family} ({str(torch_dtype).removeprefix('torch.')}) "
        f"to {out}")
    return out
