"""The standard workflow on a tiny Qwen2 (QKV bias, tied embeddings, GQA) built by transformers:
`focusft convert import-hf` -> `pretrain_focusft.py --pretrained-checkpoint --finetune` (FocuSFT,
2 iterations) -> `focusft convert export-hf` -> transformers loads it and generates, and so does
`focusft generate` (also with test-time adaptation). Fine-tuning loads the weights at any TP /
PP / CP, a restarted fine-tuning run resumes, and flags that disagree with the checkpoint are
errors naming both values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_focusft.cli import main as cli_main
from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.pretrain import pretrain
from tests.convert.test_import_export import TOKENS, TOL, _load, megatron_logits
from tests.helpers.hf_models import WORDS, hf_logits, import_tiny_model

TRAIN = ["--seq-length", "64", "--micro-batch-size", "2", "--lr", "1e-3", "--training-mode", "focusft",
         "--focusft-inner-objective", "context"]


def _chats(path: Path) -> Path:
    rows = []
    for i in range(16):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)]
        rows.append({"messages": [{"role": "user", "content": " ".join(words)},
                                  {"role": "assistant", "content": " ".join(words[3:6])}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(HF directory, its import, chat data)."""
    root = tmp_path_factory.mktemp("workflow")
    hf, ckpt = import_tiny_model(root, "mcore")
    return hf, ckpt, _chats(root / "chats.jsonl")


def _finetune(hf: Path, ckpt: Path, data: Path, *extra: str) -> dict:
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    return pretrain(parse_training_args([*TRAIN, "--data-path", str(data), "--tokenizer-model", str(hf),
                                         "--pretrained-checkpoint", str(ckpt), "--finetune", *extra]))


def test_import_finetune_export_generate(single_rank, imported, tmp_path, capsys):
    import transformers

    hf, ckpt, data = imported
    ft, export = tmp_path / "ft", tmp_path / "export"
    summary = _finetune(hf, ckpt, data, "--train-iters", "2", "--save", str(ft))
    assert summary["start_iteration"] == 0 and len(summary["losses"]) == 2
    assert all(math.isfinite(x) for x in summary["losses"])
    assert cli_main(["convert", "export-hf", "--megatron-path", str(ft), "--hf-path", str(export)]) == 0

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    exported_logits = hf_logits(model, TOKENS)
    assert (exported_logits - hf_logits(original, TOKENS)).abs().max() > 1e-3  # fine-tuning changed it
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel()
    torch.testing.assert_close(megatron_logits(_load(str(ft)), TOKENS), exported_logits, atol=TOL, rtol=0)
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer_config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    prompt = tokenizer("what is the key", return_tensors="pt").input_ids
    reply = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert reply.shape[1] == prompt.shape[1] + 4 or reply[0, -1] == tokenizer.eos_token_id

    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "what is the key of the city"}]}) + "\n")
    assert cli_main(["generate", "--hf-path", str(export), "--input", str(prompts), "--max-new-tokens", "4"]) == 0
    from_hf = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(["generate", "--load", str(ft), "--input", str(prompts), "--max-new-tokens", "4",
                     "--output-logits", str(tmp_path / "logits.pt")]) == 0
    from_ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_hf["output_ids"] == from_ckpt["output_ids"] and from_hf["prompt_tokens"] > 5
    (logits,) = torch.load(tmp_path / "logits.pt")
    assert logits.shape == (len(from_ckpt["output_ids"]), 128)
    assert logits[0].argmax().item() == from_ckpt["output_ids"][0]
    assert cli_main(["generate", "--load", str(ft), "--input", str(prompts), "--max-new-tokens", "4",
                     "--test-time-adaptation", "--prefill", "focusft"]) == 0
    adapted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert adapted["index"] == 0 and 1 <= len(adapted["output_ids"]) <= 4


def _first_loss(argv: list[str]) -> float:
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    return pretrain(parse_training_args(argv))["losses"][0]


@pytest.mark.distributed
def test_finetune_loads_the_weights_at_any_layout(single_rank, worker_pool, imported, tmp_path):
    # Iteration 1's loss is a forward of the loaded weights before any update: sharded runs
    # differ from the one-rank run only by fp32 rounding (relative ~1e-6 for this model).
    # A checkpoint saved at TP = 2 or PP = 2 exports like any other: the export's logits equal
    # those of the same checkpoint loaded on one rank.
    import transformers

    from megatron_focusft.convert.commands import export_hf
    from tests.helpers.distributed import init_model_parallel

    hf, ckpt, data = imported
    argv = [*TRAIN, "--data-path", str(data), "--tokenizer-model", str(hf), "--pretrained-checkpoint", str(ckpt),
            "--finetune", "--train-iters", "1"]
    single = _first_loss(argv)
    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2"]), ("pp2", ["--pipeline-model-parallel-size", "2"]),
                         ("cp2", ["--context-parallel-size", "2"])):
        saved = tmp_path / name
        for loss in worker_pool(2).run(_first_loss, [*argv, *layout, "--save", str(saved)]):
            assert loss == pytest.approx(single, rel=1e-5), layout
        init_model_parallel()
        export_hf(saved, tmp_path / f"{name}-hf", tokenizer_model=str(hf), log=lambda *a: None)
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{name}-hf")).eval()
        torch.testing.assert_close(hf_logits(exported, TOKENS), megatron_logits(_load(str(saved)), TOKENS),
                                   atol=TOL, rtol=0)
        assert (tmp_path / f"{name}-hf" / "tokenizer.json").is_file()


def test_restarted_finetune_run_resumes(single_rank, imported, tmp_path):
    hf, ckpt, data = imported
    run = tmp_path / "run"
    flags = ["--train-iters", "2", "--save", str(run), "--load", str(run)]
    first = pretrain(parse_training_args([*TRAIN, "--data-path", str(data), "--tokenizer-model", str(hf),
                                          "--pretrained-checkpoint", str(ckpt), *flags, "--exit-interval", "1"]))
    assert first["start_iteration"] == 0 and len(first["losses"]) == 1
    again = _finetune(hf, ckpt, data, *flags)
    assert again["start_iteration"] == 1 and len(again["losses"]) == 1
    assert (run / "model_assets" / "tokenizer.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "128"], r"--hidden-size 128 but the checkpoint has hidden_size = 64"),
    (["--num-query-groups", "4", "--vocab-size", "256"],
     r"--num-query-groups 4 but the checkpoint has num_query_groups = 2; --vocab-size 256 .* vocab_size = 128"),
    (["--untie-embeddings-and-output-weights"], r"share_embeddings_and_output_weights = True"),
    (["--model-preset", "tiny"], r"--model-preset tiny has hidden_size = 256 but the checkpoint has 64"),
])
def test_flags_that_disagree_with_the_checkpoint(single_rank, imported, flags, message):
    hf, ckpt, data = imported
    with pytest.raises(ValueError, match=message):
        _finetune(hf, ckpt, data, "--train-iters", "1", *flags)


def test_finetune_needs_a_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_training_args([*TRAIN, "--mock-data", "--train-iters", "1", "--finetune"])
    assert "--finetune needs --pretrained-checkpoint" in capsys.readouterr().err
    from megatron_focusft.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        pretrain(parse_training_args([*TRAIN, "--mock-data", "--train-iters", "1", "--pretrained-checkpoint",
                                      str(tmp_path)]))


def test_shape_flags_from_scratch():
    from megatron_focusft.models.presets import Llama3RopeScaling
    from megatron_focusft.training.starting_point import starting_point

    args = parse_training_args([*TRAIN, "--mock-data", "--train-iters", "1", "--add-qkv-bias", "--use-rope-scaling",
                                "--rope-scaling-factor", "4", "--norm-epsilon", "1e-6", "--rotary-base", "500000",
                                "--kv-channels", "32"])
    shape = starting_point(args).shape
    assert shape.add_qkv_bias and shape.rope_scaling == Llama3RopeScaling(factor=4.0)
    assert (shape.norm_epsilon, shape.rotary_base, shape.head_dim) == (1e-6, 500000.0, 32)


def test_sft_finetunes_from_the_pretrained_weights(single_rank, imported):
    """SFT (causal mask) starts from the checkpoint too: its first loss is the pretrained model's,
    not a fresh model's (a loaded model scores the same batch differently from a random one)."""
    hf, ckpt, data = imported
    sft = ["--training-mode", "sft", "--train-iters", "1"]
    from_pretrained = _finetune(hf, ckpt, data, *sft)
    assert from_pretrained["start_iteration"] == 0
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    scratch = pretrain(parse_training_args([*TRAIN, "--data-path", str(data), "--tokenizer-model", str(hf), *sft,
                                            "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "96",
                                            "--num-attention-heads", "4", "--num-query-groups", "2",
                                            "--vocab-size", "128", "--add-qkv-bias"]))
    assert abs(from_pretrained["losses"][0] - scratch["losses"][0]) > 0.1


def test_resume_with_the_launchers_preset_flag(tmp_path):
    """A launcher that names its preset resumes when re-run with the same flags."""
    flags = [*TRAIN, "--mock-data", "--model-preset", "tiny", "--train-iters", "2", "--save", str(tmp_path),
             "--load", str(tmp_path)]
    assert pretrain(parse_training_args([*flags, "--exit-interval", "1"]))["start_iteration"] == 0
    assert pretrain(parse_training_args(flags))["start_iteration"] == 1


def test_finetune_uses_the_checkpoints_tokenizer(single_rank, imported, capsys):
    """Without --tokenizer-model the run tokenises with the tokenizer the import carries (the byte
    tokenizer would not even fit this model's 128-token vocabulary): the same losses as naming it."""
    from megatron_focusft.runtime import release_model_parallel

    hf, ckpt, data = imported
    named = _finetune(hf, ckpt, data, "--train-iters", "1")
    release_model_parallel()
    capsys.readouterr()
    carried = pretrain(parse_training_args([*TRAIN, "--data-path", str(data), "--pretrained-checkpoint", str(ckpt),
                                            "--finetune", "--train-iters", "1"]))
    assert carried["losses"] == named["losses"]
    assert f"tokenizer: {ckpt / 'model_assets'} (the starting checkpoint's" in capsys.readouterr().out
