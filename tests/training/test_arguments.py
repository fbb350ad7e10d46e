"""Every flag combination the entry point cannot run is a usage error before anything starts:
exit 2, one `error:` line naming the flag, no process group, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import megatron_focusft.training.pretrain as pretrain_module
from megatron_focusft.training.pretrain import main

BASE = ["--mock-data", "--train-iters", "3", "--seq-length", "64", "--micro-batch-size", "2"]

# (flags, environment, the error line's text after "pretrain_focusft.py: error: ")
CASES = [
    (["--focusft-layer-fraction", "0"], {}, "--focusft-layer-fraction must be in (0, 1], got 0.0"),
    (["--focusft-layer-fraction", "1.5"], {}, "--focusft-layer-fraction must be in (0, 1], got 1.5"),
    (["--focusft-inner-lr", "0"], {}, "--focusft-inner-lr must be > 0, got 0.0"),
    (["--focusft-inner-lr", "-1"], {}, "--focusft-inner-lr must be > 0, got -1.0"),
    (["--focusft-inner-steps", "0"], {}, "--focusft-inner-steps must be >= 1, got 0 (the plain SFT step under the "
                                         "FocuSFT mask is --training-mode sft --sft-mask focusft)"),
    (["--focusft-max-update-norm", "0"], {}, "--focusft-max-update-norm must be > 0 (inf: no bound), got 0.0"),
    (["--global-batch-size", "3"], {}, "--global-batch-size 3 is not a positive multiple of --micro-batch-size 2 x "
                                       "data-parallel size 1 (WORLD_SIZE 1 / model-parallel size 1)"),
    # torchrun's WORLD_SIZE gives the data-parallel size before any process group exists.
    (["--global-batch-size", "6", "--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "4"},
     "--global-batch-size 6 is not a positive multiple of --micro-batch-size 2 x data-parallel size 2 (WORLD_SIZE 4 / "
     "model-parallel size 2)"),
    (["--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "3"},
     "WORLD_SIZE 3 is not a multiple of --tensor-model-parallel-size x --pipeline-model-parallel-size x "
     "--context-parallel-size = 2"),
    (["--attention-backend", "flex"], {}, "--attention-backend flex has no backward pass on the CPU and no CUDA device "
                                          "is present: train on the CPU with --attention-backend sdpa"),
    (["--lr=-1e-4"], {}, "--lr must be >= 0, got -0.0001"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], {}, "--min-lr 0.001 exceeds --lr 0.0001"),
    (["--lr-warmup-iters", "100"], {}, "the warmup (100 iterations) must be shorter than the decay (--train-iters 3)"),
    (["--lr-warmup-fraction", "1.5"], {}, "--lr-warmup-fraction must be in [0, 1), got 1.5"),
    (["--max-position-embeddings", "32"], {}, "--seq-length 64 exceeds --max-position-embeddings 32"),
    (["--seq-length", "16384"], {}, "--seq-length 16384 exceeds the tiny preset's max_position_embeddings 8192"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], {},
     "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive"),
    (["--ckpt-step", "2"], {}, "--ckpt-step needs --load DIR or --pretrained-checkpoint DIR"),
    (["--pipeline-balance", "auto"], {}, "--pipeline-balance auto needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-balance", "auto", "--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "1"],
     {"WORLD_SIZE": "2"}, "--pipeline-balance auto chooses the stage sizes itself: drop "
                          "--decoder-last-pipeline-num-layers"),
    (["--pipeline-balance", "auto", "--pipeline-model-parallel-size", "2", "--training-mode", "sft"],
     {"WORLD_SIZE": "2"}, "--pipeline-balance auto has no cost model for --training-mode sft"),
    (["--pipeline-model-parallel-layout", "Et|tttL"], {},
     "--pipeline-model-parallel-layout needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-layout", "Et|tttL", "--pipeline-model-parallel-size", "2",
      "--decoder-first-pipeline-num-layers", "1"], {"WORLD_SIZE": "2"},
     "--pipeline-model-parallel-layout places every stage's layers: drop --decoder-first-pipeline-num-layers"),
    (["--pipeline-model-parallel-layout", "Et|t|ttL", "--pipeline-model-parallel-size", "2"], {"WORLD_SIZE": "2"},
     "--pipeline-model-parallel-layout 'Et|t|ttL' has 3 stages, not a multiple of --pipeline-model-parallel-size 2 "
     "(V x P stages give V virtual stages per rank)"),
    (["--pipeline-model-parallel-layout", "Et|t|t|tL", "--pipeline-model-parallel-size", "2", "--training-mode",
      "block-sft"], {"WORLD_SIZE": "2"},
     "virtual pipeline stages with --training-mode block-sft run Megatron's interleaved 1F1B, which needs the "
     "micro-batches per iteration to be a multiple of --pipeline-model-parallel-size 2: 1 (without "
     "--global-batch-size)"),
    (["--pipeline-model-parallel-layout", "Et|t|t|tL", "--pipeline-model-parallel-size", "2", "--training-mode",
      "sft", "--global-batch-size", "6"], {"WORLD_SIZE": "2"},
     "virtual pipeline stages with --training-mode sft run Megatron's interleaved 1F1B, which needs the "
     "micro-batches per iteration to be a multiple of --pipeline-model-parallel-size 2: 3 (--global-batch-size 6 / "
     "(--micro-batch-size 2 x data-parallel size 1))"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], {},
     "--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size > 1"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--num-layers-per-virtual-pipeline-stage", "1"], {},
     "give --num-virtual-stages-per-pipeline-rank or --num-layers-per-virtual-pipeline-stage, not both"),
    (["--num-layers-per-virtual-pipeline-stage", "0", "--pipeline-model-parallel-size", "2"], {"WORLD_SIZE": "2"},
     "--num-layers-per-virtual-pipeline-stage must be >= 1, got 0"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--pipeline-model-parallel-size", "2",
      "--pipeline-model-parallel-layout", "Et|tttL"], {"WORLD_SIZE": "2"},
     "--num-virtual-stages-per-pipeline-rank splits the layers into even chunks; a layout of V x P stages sizes "
     "each chunk itself: drop one of them"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--pipeline-model-parallel-size", "2",
      "--decoder-first-pipeline-num-layers", "1"], {"WORLD_SIZE": "2"},
     "--num-virtual-stages-per-pipeline-rank splits the layers into even chunks: drop "
     "--decoder-first-pipeline-num-layers"),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--pipeline-model-parallel-size", "2",
      "--focusft-pipeline-schedule", "sequential"],
     {"WORLD_SIZE": "2"}, "--num-virtual-stages-per-pipeline-rank: FocuSFT runs virtual pipeline stages with its "
                          "interleaved schedule (--focusft-pipeline-schedule interleaved) only"),
    (["--pipeline-balance", "auto", "--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout",
      "Et|tttL"], {"WORLD_SIZE": "2"},
     "--pipeline-balance auto chooses the stage sizes itself: drop --pipeline-model-parallel-layout"),
    (["--focusft-pipeline-schedule", "zigzag"], {},
     "argument --focusft-pipeline-schedule: invalid choice: 'zigzag' (choose from 'interleaved', 'sequential')"),
]


@pytest.mark.parametrize("flags, environment, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_flags_that_cannot_run_are_usage_errors_before_anything_starts(flags, environment, message, tmp_path: Path,
                                                                       monkeypatch, capsys):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU training, on any machine

    def no_session(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(pretrain_module, "megatron_session", no_session)
    outputs = [tmp_path / "ckpt", tmp_path / "tb"]
    with pytest.raises(SystemExit) as exit_info:
        main([*BASE, *flags, "--save", str(outputs[0]), "--tensorboard-dir", str(outputs[1])])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"pretrain_focusft.py: error: {message}"]
    assert not any(path.exists() for path in outputs)


@pytest.mark.parametrize("path, message", [
    ("missing.jsonl", "chat data file '{tmp}/missing.jsonl' does not exist"),
    ("export", "{tmp}/export: a data file without a suffix; name it for its format, JSON Lines (.jsonl, .ndjson, "
               ".json) or Parquet (.parquet)"),
    ("empty_dir", "directory {tmp}/empty_dir holds no chat data files (.jsonl, .ndjson, .json, .parquet)"),
], ids=["missing", "no-suffix", "empty-directory"])
def test_data_paths_are_checked_with_the_flags(path, message, tmp_path: Path, capsys):
    (tmp_path / "export").write_text("{}\n")
    (tmp_path / "empty_dir").mkdir()
    flags = [f for f in BASE if f != "--mock-data"]
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--data-path", str(tmp_path / path)])
    assert exit_info.value.code == 2
    assert f"pretrain_focusft.py: error: {message.format(tmp=tmp_path)}" in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("flags, message", [
    (["--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage 3: 4 layers do not split into PP 2 x chunks of that many"),
    (["--num-virtual-stages-per-pipeline-rank", "4"],
     "--num-virtual-stages-per-pipeline-rank 4: 4 layers do not split into PP 2 x 4 even chunks"),
], ids=["layers-per-stage", "stages-per-rank"])
def test_virtual_stages_that_do_not_split_the_model_are_errors_before_any_process_group(flags, message, monkeypatch,
                                                                                       capsys):
    # The model's layer count is known from its shape (the tiny preset: 4 layers), after parsing.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    def no_session(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(pretrain_module, "megatron_session", no_session)
    code = main([*BASE, "--pipeline-model-parallel-size", "2", *flags])
    assert code == 1 and f"pretrain_focusft.py: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, virtual", [
    (["--pipeline-model-parallel-layout", "Et|tt|t|tL"], 2),
    (["--pipeline-model-parallel-layout", "Ett|ttL"], None),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--pipeline-balance", "auto"], 2),
    (["--num-virtual-stages-per-pipeline-rank", "2", "--training-mode", "sft", "--global-batch-size", "4"], 2),
], ids=["layout-of-virtual-stages", "layout", "auto-balanced-chunks", "sft-four-micro-batches"])
def test_virtual_stages_from_a_layout_or_balanced_automatically_are_accepted(flags, virtual, monkeypatch):
    # A layout of V x P stages gives V chunks per rank of its sizes (Megatron's reading); with
    # --pipeline-balance auto the even chunks are only the start: the chunk sizes are measured.
    from megatron_focusft.engine.setup import virtual_stages_per_rank
    from megatron_focusft.training.arguments import parse_training_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_training_args([*BASE, "--pipeline-model-parallel-size", "2", *flags])
    assert virtual_stages_per_rank(args, num_layers=4) == virtual
