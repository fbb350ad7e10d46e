"""Hugging Face model directories: read and check them (config.json + safetensors, sharded or
not), and write them aside, then rename, so an output is whole or absent."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_focusft.convert.hf_config import family_of, shape_from_hf_config
from megatron_focusft.convert.state_dict import SINKS_HF_NAME, hf_tensor_shapes
from megatron_focusft.engine.checkpoint import MODEL_ASSET_FILES
from megatron_focusft.models.presets import ModelPreset

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SINKS_FILE = "block_sinks.safetensors"  # block sink embeddings, beside the weights (state_dict.SINKS_HF_NAME)
# Files besides the weights and config that travel with a model: tokenizer, chat template,
# generation defaults.
ASSET_FILES = tuple(name for name in MODEL_ASSET_FILES if name != "config.json")
# Buffers some checkpoints carry that are recomputed from the config, never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_SHARD_BYTES = 5 * 2**30


class HFCheckpointError(ValueError):
    """A Hugging Face directory that cannot be converted; the message names the file and the problem."""


@dataclass
class HFDirectory:
    """A checked HF model directory: its config, shape, and which file holds each tensor."""

    path: Path
    config: dict[str, Any]
    family: str
    shape: ModelPreset
    files: dict[str, Path]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor `name` (lazily, one file handle per shard)."""
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)

    def asset_files(self) -> list[Path]:
        return [self.path / name for name in ASSET_FILES if (self.path / name).is_file()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HFCheckpointError(f"{path} not found") from None
    except ValueError as e:
        raise HFCheckpointError(f"{path} is not valid JSON: {e}") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when there is one; every named shard must exist."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index} has no 'weight_map'")
        files = {name: path / shard for name, shard in weight_map.items()}
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise HFCheckpointError(f"{path}: shard(s) {missing} named in {INDEX_FILE} are missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return {name: path / SINGLE_FILE for name in _file_keys(path / SINGLE_FILE)}
    if any(path.glob("*.bin")):
        raise HFCheckpointError(f"{path}: PyTorch .bin weights are not supported; convert them to safetensors")
    raise HFCheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors' own error type: truncated or corrupt header
        raise HFCheckpointError(f"{path} is truncated or not a safetensors file ({e})") from None


def _check_shards(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Open every shard (a truncated file fails here) and read the tensor shapes it declares."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(files.values())):
        keys = _file_keys(shard)
        with safe_open(str(shard), framework="pt") as f:
            for name in keys:
                shapes[name] = tuple(f.get_slice(name).get_shape())
        indexed = {name for name, path in files.items() if path == shard}
        absent = sorted(indexed - set(keys))
        if absent:
            raise HFCheckpointError(f"{shard}: the index places {absent[0]} here but the file does not hold it")
    return shapes


def open_hf_directory(path: str | os.PathLike) -> HFDirectory:
    """Check an HF directory before any conversion: config, shards, tensor names and shapes."""
    path = Path(path)
    if not path.is_dir():
        raise HFCheckpointError(f"{path} is not a directory")
    config = _read_json(path / "config.json")
    source = str(path / "config.json")
    family = family_of(config, source)
    shape = shape_from_hf_config(config, source)
    files = _weight_files(path)
    found = _check_shards(files)
    expected = hf_tensor_shapes(shape)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise HFCheckpointError(f"{path}: {len(missing)} tensor(s) a {family} model of this config needs are missing, "
                                f"e.g. {missing[0]}")
    tolerated = {"lm_head.weight"} if shape.share_embeddings_and_output_weights else set()
    unexpected = sorted(n for n in set(found) - set(expected) - tolerated if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise HFCheckpointError(f"{path}: unexpected tensor(s) for a {family} model of this config, e.g. "
                                f"{unexpected[0]} in {files[unexpected[0]].name}")
    for name, want in expected.items():
        if found[name] != want:
            raise HFCheckpointError(f"{files[name]}: tensor {name} has shape {list(found[name])}, but config.json "
                                    f"implies {list(want)}")
    tensors = {n: files[n] for n in expected}
    if shape.block_sink_tokens:
        tensors[SINKS_HF_NAME] = _sinks_file(path, shape)
    return HFDirectory(path, config, family, shape, tensors)


def _sinks_file(path: Path, shape: ModelPreset) -> Path:
    """The checked SINKS_FILE of a directory whose config names block sink tokens."""
    sinks = path / SINKS_FILE
    if not sinks.is_file():
        raise HFCheckpointError(f"{path / 'config.json'} names {shape.block_sink_tokens} block sink tokens but "
                                f"{SINKS_FILE} is missing")
    found = _check_shards({SINKS_HF_NAME: sinks}).get(SINKS_HF_NAME)
    if found != (shape.block_sink_tokens, shape.hidden_size):
        raise HFCheckpointError(f"{sinks}: {SINKS_HF_NAME} has shape {None if found is None else list(found)}, "
                                f"config.json says [{shape.block_sink_tokens}, {shape.hidden_size}]")
    return sinks


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """An output path that may be written: absent, or present and `overwrite` given."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the parent directory of {path} does not exist")
    return path


def staging_dir(path: Path) -> Path:
    """The sibling directory an output is written to before `commit_dir` renames it (a
    leftover of an interrupted run is removed)."""
    stage = path.with_name(f".{path.name}.partial")
    if stage.exists():
        shutil.rmtree(stage)
    return stage


def commit_dir(stage: Path, path: Path) -> None:
    """Replace `path` by the finished `stage` (rename; an old `path` is removed after)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(stage, path)
    if old is not None:
        shutil.rmtree(old)


def write_hf_directory(path: Path, config: Any, tensors: Iterable[tuple[str, torch.Tensor]],
                       assets: Iterable[Path] = (), dtype: torch.dtype = torch.float32,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json, safetensors shards (with an index when there are several) and the
    asset files into `path` (which `staging_dir` made; it must not exist). A SINKS_HF_NAME
    tensor goes to SINKS_FILE instead of the shards."""
    from safetensors.torch import save_file

    path.mkdir()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        if name == SINKS_HF_NAME:
            save_file({name: tensor.detach().to(dtype).contiguous()}, str(path / SINKS_FILE), metadata={"format": "pt"})
            continue
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to(dtype).contiguous()
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        save_file(shard, str(path / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name))
    if len(shards) > 1:
        total = sum(t.numel() * dtype.itemsize for shard in shards for t in shard.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
    config.dtype = dtype
    config.save_pretrained(str(path))
    for asset in assets:
        shutil.copy2(asset, path / asset.name)
