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

from megatron_focusft.cli import build_parser
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


_FAKE_PY = r'''#!/usr/bin/env bash
# Stand-in interpreter for examples/block_attention_evidence.sh: records each command, makes the
# files the real one would (data rows, a checkpoint marker, results.json); the table step runs.
if [[ "$1" == "-" || "$1" == "-c" ]]; then exec "$REAL_PY" "$@"; fi
printf '%s\x1f' "$@" >> "$RECORD"; printf '\x1e' >> "$RECORD"  # args may hold newlines
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --output) echo '{"blocks": ["The code of the red owl safe is 123456."], "messages": [{"role": "user",'\
            '"content": "What is the code of the red owl safe?"}, {"role": "assistant", "content": "123456"}],'\
            '"meta": {"answer_block": 0}}' > "${args[i+1]}" ;;
        --save) mkdir -p "${args[i+1]}"; echo 1 > "${args[i+1]}/latest_checkpointed_iteration.txt" ;;
        --output-dir) mkdir -p "${args[i+1]}"
            echo '{"results": {"rag": {"288": {"score": '"${FAKE_SCORE:-50.0}"', "ci95": [40.0, 60.0], "samples": 2}}}}' \
                > "${args[i+1]}/results.json" ;;
    esac
done
'''


def test_block_attention_evidence_commands(tmp_path, monkeypatch):
    """examples/block_attention_evidence.sh: every training and eval command it builds passes its
    parser; the fine-tunes share data, steps and LR; each ablation drops exactly one part."""
    import sys

    from megatron_focusft.evaluation.cli import parse_eval_args

    fake, record, out = tmp_path / "python", tmp_path / "argv.txt", tmp_path / "out"
    fake.write_text(_FAKE_PY)
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "REAL_PY": sys.executable, "RECORD": str(record), "OUT": str(out)}
    subprocess.run(["bash", str(ROOT / "examples" / "block_attention_evidence.sh")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    calls = [command.split("\x1f")[:-1] for command in record.read_text().split("\x1e")[:-1]]
    train = {Path(c[c.index("--save") + 1]).name: c[1:] for c in calls if c[0] == "pretrain_focusft.py"}
    evals = [c[3:] for c in calls if c[:3] == ["-m", "megatron_focusft.cli", "eval"]]
    assert sorted(train) == sorted(["base_copy", "base", "block_sft", "block_distill", "distill_no_sinks",
                                    "distill_no_dropout", "distill_no_weighting"])
    # 6 models x 2 attentions x 2 eval sets (the passages of training, longer prompts), then 3 models
    # x 4 segmenters (fixed16, fixed32, delimiter, learned)
    assert len(evals) == 24 + 12 and "| block-sft |" in (out / "table.md").read_text()
    assert sum(parse_eval_args(argv).rag_file == [str(out / "rag_eval_long.jsonl")] for argv in evals) == 12
    applies = [c[2:] for c in calls if c[:4] == ["-m", "megatron_focusft.cli", "segment", "apply"]]
    methods = []
    for argv in applies:
        args = build_parser().parse_args(argv)
        assert args.join_blocks == "\n" and args.tokenizer == str(out / "tokenizer")
        methods.append(args.method if args.method != "fixed" else f"fixed{args.max_block_tokens}")
    assert methods == ["fixed16", "fixed32", "delimiter", "learned"]
    parsed = {name: parse_training_args(argv) for name, argv in train.items()}
    assert all(parsed[n].training_mode == "sft" and parsed[n].sft_mask == "causal" for n in ("base_copy", "base"))
    assert parsed["base"].pretrained_checkpoint == str(out / "base_copy") and parsed["base"].finetune
    # the label form's base: a quarter copy rows, the rest questions (no fact-sentence rows)
    assert parsed["base"].data_path == ["0.25", str(out / "copy.jsonl"), "0.75", str(out / "rag_base.jsonl")]
    assert parsed["block_sft"].training_mode == "block-sft"
    parts = {name: (a.block_sink_tokens > 0, a.block_dropout > 0, a.distill_token_weighting)
             for name, a in parsed.items() if a.training_mode == "block-distill"}
    assert parts == {"block_distill": (True, True, True), "distill_no_sinks": (False, True, True),
                     "distill_no_dropout": (True, False, True), "distill_no_weighting": (True, True, False)}
    shared = {(tuple(a.data_path), a.train_iters, a.lr, a.micro_batch_size, a.seq_length, a.seed,
               a.pretrained_checkpoint, a.finetune) for name, a in parsed.items() if not name.startswith("base")}
    assert len(shared) == 1 and next(iter(shared))[-1] is True
    for argv in evals:
        args = parse_eval_args(argv)
        assert args.attention in ("full", "block") and args.rag_file
    assert all(a.tokenizer_model == str(out / "tokenizer") for a in parsed.values())


def test_block_attention_evidence_stops_on_a_base_that_does_not_retrieve(tmp_path):
    """Below MIN_BASE_SCORE the script evaluates the base, says why it stops, and trains no student."""
    import sys

    fake, record, out = tmp_path / "python", tmp_path / "argv.txt", tmp_path / "out"
    fake.write_text(_FAKE_PY)
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "REAL_PY": sys.executable, "RECORD": str(record), "OUT": str(out),
           "FAKE_SCORE": "5.0"}
    result = subprocess.run(["bash", str(ROOT / "examples" / "block_attention_evidence.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert "stop: the base answers 5.0% of the eval codes under full attention (MIN_BASE_SCORE=20)" in result.stdout
    saves = [c for c in record.read_text().split("\x1e") if "--save\x1f" in c]
    assert len(saves) == 2 and not (out / "block_sft").exists()  # the two base stages only
