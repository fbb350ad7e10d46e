"""examples/*.sh launch pretrain_focusft.py with flags it accepts.

A stand-in `torchrun` on PATH records the command line each launcher builds; the arguments after
the script name go through the entry point's own parser and validation (no training runs), as on
the machines they are for: the data file exists, CUDA is present and torchrun's WORLD_SIZE is
one data-parallel replica of the launcher's TP x PP x CP.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_focusft.training.arguments import parse_training_args

ROOT = Path(__file__).resolve().parents[1]


def _launched_args(tmp_path: Path, script: str, env: dict[str, str]) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DATA": "chats.jsonl",
                "TOKENIZER": "tokenizer-dir", **env}
    subprocess.run(["bash", str(ROOT / "examples" / script)], cwd=ROOT, env=full_env, check=True)
    argv = record.read_text().splitlines()
    return argv[argv.index("pretrain_focusft.py") + 1:]


@pytest.mark.parametrize("script, env, expected", [
    ("pretrain_focusft.sh", {}, {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                 "context_parallel_size": 1, "seq_length": 4096,
                                 "attention_metrics_interval": 100}),
    ("pretrain_focusft.sh", {"TP": "2", "PP": "2", "CP": "2"},
     {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "context_parallel_size": 2,
      "attention_metrics_interval": 0}),
    ("pretrain_focusft.sh", {"PRETRAINED": "ckpt/base"},
     {"pretrained_checkpoint": "ckpt/base", "finetune": True, "model_preset": None, "load": "runs/focusft/checkpoints"}),
    ("llama3_8b_32k.sh", {}, {"model_preset": "llama3-8b", "tensor_model_parallel_size": 4,
                              "context_parallel_size": 2, "sequence_parallel": True, "seq_length": 32768,
                              "recompute_granularity": "full", "recompute_num_layers": 1}),
])
def test_launcher_flags_parse(tmp_path, script, env, expected, monkeypatch):
    argv = _launched_args(tmp_path, script, env)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sizes = [int(argv[argv.index(flag) + 1]) if flag in argv else 1 for flag in
             ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size")]
    monkeypatch.setenv("WORLD_SIZE", str(math.prod(sizes)))
    args = parse_training_args(argv)
    assert args.data_path == ["chats.jsonl"] and args.tokenizer_model == "tokenizer-dir"
    assert {key: getattr(args, key) for key in expected} == expected
