"""Bad input to import / export: each a clear error naming the file and the problem, raised before
anything is written (no output directory, no partial one); sharded directories and Mistral
import; an existing output is replaced only with overwrite."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_focusft.convert.hf_config import UnsupportedModelError, shape_from_hf_config
from megatron_focusft.convert.hf_files import HFCheckpointError, open_hf_directory
from megatron_focusft.engine.setup import check_parallel_fit
from tests.convert.test_import_export import TOKENS, TOL, _import, _load, megatron_logits
from tests.helpers.hf_models import hf_logits, save_tiny_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    save_tiny_hf_model("llama", path)
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """The llama model saved in several shards with an index."""
    import transformers

    path = tmp_path_factory.mktemp("hf") / "sharded"
    src = tmp_path_factory.mktemp("hf") / "src"
    save_tiny_hf_model("llama", src, tokenizer=False)
    transformers.AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(path), max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(out):
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()


def test_sharded_directory_imports_with_the_same_logits(single_rank, llama_dir, sharded_dir, tmp_path):
    import transformers

    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(str(sharded_dir)).eval(), TOKENS)
    _import(str(sharded_dir), str(tmp_path / "ckpt"))
    torch.testing.assert_close(megatron_logits(_load(str(tmp_path / "ckpt")), TOKENS), reference, atol=TOL, rtol=0)


@pytest.mark.parametrize("family, overrides", [
    ("mistral", {}),
    ("llama", {"num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
], ids=["mistral-gqa", "llama2-mha"])
def test_single_rank_import(single_rank, tmp_path, family, overrides):
    model = save_tiny_hf_model(family, tmp_path / family, tokenizer=False, **overrides)
    _import(str(tmp_path / family), str(tmp_path / "ckpt"))
    torch.testing.assert_close(megatron_logits(_load(str(tmp_path / "ckpt")), TOKENS), hf_logits(model, TOKENS),
                               atol=TOL, rtol=0)


def test_missing_and_truncated_shards(single_rank, sharded_dir, tmp_path):
    bad = _copy(sharded_dir, tmp_path)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    (bad / shards[1]).unlink()
    with pytest.raises(HFCheckpointError, match=rf"shard\(s\) \['{shards[1]}'\] .* are missing"):
        open_hf_directory(bad)
    shutil.copy(sharded_dir / shards[1], bad / shards[1])
    data = (bad / shards[0]).read_bytes()
    (bad / shards[0]).write_bytes(data[:len(data) // 2])
    with pytest.raises(HFCheckpointError, match=rf"{shards[0]} is truncated"):
        open_hf_directory(bad)


def test_shape_disagreeing_with_config(single_rank, llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(HFCheckpointError, match=r"mlp.gate_proj.weight has shape \[96, 64\], but config.json "
                                                r"implies \[128, 64\]"):
        open_hf_directory(bad)
    (bad / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=5)))
    with pytest.raises(HFCheckpointError, match=r"missing, e.g. model.layers.4"):
        open_hf_directory(bad)
    (bad / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(HFCheckpointError, match=r"unexpected tensor\(s\) .* model.layers.3"):
        open_hf_directory(bad)


def test_unsupported_model_writes_nothing(single_rank, llama_dir, tmp_path):
    bad = _copy(llama_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, rope_parameters={"rope_type": "yarn", "factor": 2.0})))
    out = tmp_path / "out"
    with pytest.raises(UnsupportedModelError, match=r"rope_scaling type 'yarn'"):
        _import(str(bad), str(out))
    _assert_nothing_written(out)


def test_parallel_sizes_that_do_not_fit():
    shape = shape_from_hf_config(
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64})
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 4 does not divide the model's 6 attention"):
        check_parallel_fit(shape, 4, 1)
    with pytest.raises(ValueError, match=r"--pipeline-model-parallel-size 8 exceeds the model's 4 layers"):
        check_parallel_fit(shape, 1, 8)


def test_existing_output_needs_overwrite(single_rank, llama_dir, tmp_path):
    from megatron_focusft.convert.commands import export_hf

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        _import(str(llama_dir), str(out))
    assert (out / "keep.txt").read_text() == "mine"
    from megatron_focusft.convert.commands import import_hf

    import_hf(str(llama_dir), str(out), overwrite=True, log=lambda *a: None)
    assert not (out / "keep.txt").exists() and (out / "latest_checkpointed_iteration.txt").is_file()
    export = tmp_path / "export"
    export.mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_hf(str(out), str(export), log=lambda *a: None)
    with pytest.raises(Exception, match=r"holds no complete checkpoint"):
        export_hf(str(tmp_path / "nothing"), str(tmp_path / "export2"), log=lambda *a: None)
    _assert_nothing_written(tmp_path / "export2")
