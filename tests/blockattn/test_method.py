"""Block fine-tuning and block distillation through `pretrain_focusft.py` on a tiny Qwen2 (tied,
QKV bias) built by transformers and imported.

Iteration 1's distillation loss is checked against an independent reference: the loaded model's
logits under the dense block mask (student) and a second model's under the causal mask
(teacher) on the same single sample, KL(T) written with log_softmax on the full vocabulary. fp32; the two sides differ only in
reduction order (relative ~1e-6), so rel = 1e-4. Sharded distillation runs (TP2 + SP, CP2,
PP2; sink tokens, block dropout and token weighting on) give iteration 1's loss of one rank (rel 1e-5, fp32 rounding of a forward of the same weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.pretrain import pretrain
from tests.convert.test_import_export import _load
from tests.helpers.hf_models import WORDS, import_tiny_model


def _rag_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        words = [WORDS[(i * 5 + j) % len(WORDS)] for j in range(9)]
        # Blocks as token ids (the row format takes texts or ids): 3 and 4 word ids.
        ids = [5 + (i * 3 + j) % 30 for j in range(7)]
        rows.append({"blocks": [ids[:3], ids[3:]],
                     "messages": [{"role": "user", "content": " ".join(words[6:])},
                                  {"role": "assistant", "content": " ".join(words[1:4])}]})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    hf, ckpt = import_tiny_model(root, "mcore")
    # A second model as the teacher of the loss check: the student's own weights under the
    # causal mask differ from it under the block mask by ~1e-6 in a random tiny model.
    import_tiny_model(root, "teacher", seed=1)
    data = root / "rag.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rag_rows(8)))
    return hf, ckpt, data


def _argv(base, mode: str, *extra: str) -> list[str]:
    hf, ckpt, data = base
    return ["--training-mode", mode, "--seq-length", "64", "--micro-batch-size", "2", "--lr", "1e-3",
            "--data-path", str(data), "--tokenizer-model", str(hf), "--pretrained-checkpoint", str(ckpt), "--finetune",
            *extra]


def _train(argv: list[str]) -> dict:
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    return pretrain(parse_training_args(argv))


def _losses(argv: list[str]) -> list[float]:
    return _train(argv)["losses"]


def test_distillation_loss_equals_a_plain_kl_of_teacher_and_student(single_rank, base, tmp_path):
    from megatron_focusft.blockattn.sample_forms import with_sinks
    from megatron_focusft.data.tokenizer import load_chat_tokenizer
    from megatron_focusft.masks import segment_mask
    from tests.helpers.distributed import init_model_parallel

    hf, ckpt, _ = base
    row = _rag_rows(1)[0]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(row) + "\n")
    teacher_ckpt = ckpt.parent / "teacher"  # the fixture's second model
    argv = _argv((hf, ckpt, one), "block-distill", "--micro-batch-size", "1", "--train-iters", "1",
                 "--distill-temperature", "2", "--teacher-checkpoint", str(teacher_ckpt))
    loss = _losses(argv)[0]

    tokenizer = load_chat_tokenizer(str(hf))
    blocks = row["blocks"]
    chat_ids = [i for ids, _ in tokenizer.render_chat(row["messages"]) for i in ids]
    chat_flags = [int(f) for ids, f in tokenizer.render_chat(row["messages"]) for _ in ids]
    ids = [t for b in blocks for t in b] + chat_ids
    response = [0] * (len(ids) - len(chat_ids)) + chat_flags
    form = with_sinks(ids, response, [0, len(blocks[0]), len(blocks[0]) + len(blocks[1])], 0)
    tokens = torch.tensor([form.ids])
    doc = torch.zeros_like(tokens)
    init_model_parallel()
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        student = _load(str(ckpt))(tokens, positions, segment_mask("block", doc_ids=doc,
                                                                   block_ids=torch.tensor([form.block_ids])))
        teacher = _load(str(teacher_ckpt))(tokens, positions, segment_mask("causal", doc_ids=doc))
    t = 2.0
    kl = (torch.softmax(teacher / t, -1) * (torch.log_softmax(teacher / t, -1) - torch.log_softmax(student / t, -1))
          ).sum(-1)[0] * t * t
    # Distilled: global block and response positions (block 2) whose next token is in the sample.
    distilled = torch.tensor(form.block_ids) == 2
    distilled[-1] = False
    assert loss == pytest.approx(float(kl[distilled].mean()), rel=1e-4)
    assert float(kl[distilled].mean()) > 1e-3


def test_block_sft_and_distill_train_resume_and_keep_their_sinks(single_rank, base, tmp_path):
    from megatron_focusft.engine.checkpoint import read_checkpoint_info

    run = tmp_path / "sft"
    sft = _train(_argv(base, "block-sft", "--train-iters", "2", "--block-sink-tokens", "2", "--save", str(run)))
    assert len(sft["losses"]) == 2 and all(x == x and x > 0 for x in sft["losses"])
    assert read_checkpoint_info(run).shape.block_sink_tokens == 2
    resumed = _train(_argv(base, "block-sft", "--train-iters", "3", "--block-sink-tokens", "2", "--save", str(run),
                           "--load", str(run), "--override-opt_param-scheduler"))
    assert resumed["start_iteration"] == 2 and len(resumed["losses"]) == 1
    _check_sinks_export(run, tmp_path / "export")
    distill = _train(_argv(base, "block-distill", "--train-iters", "2", "--block-sink-tokens", "1",
                           "--block-dropout", "0.5", "--distill-token-weighting", "--distill-ce-weight", "0.5"))
    assert len(distill["losses"]) == 2 and all(x == x and x > 0 for x in distill["losses"])
    assert {"kd_loss", "ce_loss"} <= set(distill["history"][0])


def _check_sinks_export(run: Path, export: Path) -> None:
    """The sinks leave in a file of their own with a note in config.json; transformers loads the
    export without unexpected keys; loading the export for generation restores the same sinks,
    and block generation from it equals block generation from the checkpoint."""
    import transformers

    from megatron_focusft.cli import main as cli_main
    from megatron_focusft.convert.hf_config import SINK_TOKENS_KEY
    from megatron_focusft.generation.blocks import BlockKVCache, BlockPrompt, generate_with_blocks
    from megatron_focusft.generation.decode import GenerationConfig
    from megatron_focusft.generation.loading import load_inference_model
    from megatron_focusft.models.block_sinks import block_sinks_of
    from megatron_focusft.runtime import release_model_parallel
    from tests.helpers.distributed import init_model_parallel

    release_model_parallel()
    assert cli_main(["convert", "export-hf", "--megatron-path", str(run), "--hf-path", str(export)]) == 0
    assert (export / "block_sinks.safetensors").is_file()
    assert json.loads((export / "config.json").read_text())[SINK_TOKENS_KEY] == 2
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    init_model_parallel()
    from_hf, from_ckpt = load_inference_model(hf_path=export).model, load_inference_model(load=run).model
    torch.testing.assert_close(block_sinks_of(from_hf).weight, block_sinks_of(from_ckpt).weight, atol=0, rtol=0)
    assert block_sinks_of(from_hf).weight.abs().max() > 0
    prompt, config = BlockPrompt(((5, 6, 7), (8, 9)), (10, 11)), GenerationConfig(max_new_tokens=3, keep_logits=True)
    a = generate_with_blocks(from_hf, prompt, config, BlockKVCache())
    b = generate_with_blocks(from_ckpt, prompt, config, BlockKVCache())
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    import shutil

    from megatron_focusft.convert.hf_files import HFCheckpointError, open_hf_directory

    shutil.copytree(export, export.with_name("no-sinks"))
    (export.with_name("no-sinks") / "block_sinks.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="names 2 block sink tokens but block_sinks.safetensors is missing"):
        open_hf_directory(export.with_name("no-sinks"))


def test_a_teacher_of_another_vocabulary_or_tokenizer_is_refused_before_training(single_rank, base, tmp_path):
    from megatron_focusft.blockattn.teacher import TeacherMismatch, check_teacher
    from megatron_focusft.engine.checkpoint import read_checkpoint_info

    hf, ckpt, _ = base
    _, wide = import_tiny_model(tmp_path, "wide", vocab_size=256)
    with pytest.raises(TeacherMismatch, match="vocabulary of 256 tokens, the student 128"):
        _train(_argv(base, "block-distill", "--train-iters", "1", "--teacher-checkpoint", str(wide)))
    shape = read_checkpoint_info(ckpt).shape
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    (other / "tokenizer.json").write_text((hf / "tokenizer.json").read_text().replace("river", "ocean"))
    check_teacher(str(ckpt), shape, shape, str(hf))  # the same files: accepted
    with pytest.raises(TeacherMismatch, match="other tokenizer files"):
        check_teacher(str(ckpt), shape, shape, str(other))


def test_block_flags_are_checked_before_anything_starts(base):
    with pytest.raises(SystemExit):
        parse_training_args(_argv(base, "block-sft", "--block-ratio", "1.5"))
    with pytest.raises(SystemExit):
        parse_training_args(["--training-mode", "block-distill", "--mock-data"])
    with pytest.raises(SystemExit):
        parse_training_args(_argv(base, "block-sft", "--block-segmenter", "delimiter",
                                  "--block-segmenter-max-tokens", "4"))


@pytest.mark.distributed
@pytest.mark.parametrize("mode, layout", [
    ("block-distill", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("block-distill", ["--context-parallel-size", "2"]), ("block-distill", ["--pipeline-model-parallel-size", "2"]),
    ("block-distill", ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]),
    ("block-sft", ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"])],
    ids=["tp2-sp", "cp2", "pp2", "pp2-two-chunks-per-rank", "block-sft-pp2-two-chunks-per-rank"])
def test_block_training_is_the_same_under_tp_sp_cp_and_pp(single_rank, worker_pool, base, mode, layout):
    # Two micro-batches: under PP the teacher's forward-only schedule and the student's 1F1B
    # both pipeline them; with two model chunks per rank (four one-layer stages, sinks on the
    # first) both are Megatron's interleaved schedule, the teacher in chunks of its own.
    # Two iterations: the second loss follows the first update, so it checks the gradients too.
    # Tolerance: the layouts only reorder fp32 sums (~1e-7 relative); Adam's first step is
    # lr x sign(g) per element, which such noise flips only where |g| is itself at noise level,
    # so the second loss moves by orders of magnitude less than 1e-5 of its value, while a wrong
    # or missing gradient (a swapped message, a chunk without its update) moves it by ~lr.
    extra = ["--block-dropout", "0.5", "--distill-token-weighting"] if mode == "block-distill" else []
    argv = _argv(base, mode, "--train-iters", "2", "--block-sink-tokens", "1", "--global-batch-size", "4", *extra)
    single = _train(argv)["losses"]
    for losses in worker_pool(2).run(_losses, [*argv, *layout]):
        assert losses == pytest.approx(single, rel=1e-5), layout
