"""`focusft eval` on the RAG-style block tasks, on a tiny random model with the byte tokenizer.

- `--attention block` (block attention with KV reuse, one cache for the run) predicts what a
  greedy decode through full forwards under the block mask predicts, token for token (checked
  teacher-forced: one full forward per reply, every greedy choice along it); the cache's hits
  are every repeated block of the run.
- `--attention full` predicts what `focusft generate` does on the concatenated prompt (blocks'
  tokens, then the global block), bit for bit (same batches, same computation), and what full
  causal forwards pick.
- The two modes differ on this model, so the first comparison does tell them apart.
The KV-cache paths agree with full forwards to TOL on fp32 logits (test_decode.py,
test_blocks.py), so their greedy tokens must agree wherever the top-2 margin exceeds 2 x TOL;
the references' margins are checked to exceed 10 x TOL, so no comparison rests on a near tie.

Without a model: `focusft data rag` rows read as the same samples the eval generates; the
reader's and the flags' bad input are errors naming the row or the flag.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.tokenizer import ByteChatTokenizer, flatten_segments
from megatron_focusft.evaluation.long_context_tasks import TASKS, generate_samples
from megatron_focusft.evaluation.samples import SampleFileError, read_rag_jsonl
from tests.generation.test_decode import TOL

TOKENIZER = ByteChatTokenizer()
LENGTH, SAMPLES, SEED = 640, 3, 0
VOCAB = 272  # the byte tokenizer's 264 ids, rounded up


def count(text: str) -> int:
    return len(TOKENIZER.encode(text))


def _prompt_parts(sample) -> tuple[list[list[int]], list[int]]:
    """The row format's tokens, written out here: each block encoded alone, then the rendered question."""
    question, _ = flatten_segments(TOKENIZER.render_prompt([{"role": "user", "content": sample.prompt}]))
    return [TOKENIZER.encode(b) for b in sample.blocks], question


@torch.no_grad()
def _choices(model, blocks: list[list[int]], question: list[int], reply: list[int], mask_kind: str):
    """Greedy choices along `reply` from ONE full forward (no KV cache) under `mask_kind` over the
    prompt and the reply, the reply continuing the global block: choice i is the argmax after
    prompt + reply[:i]. A greedy decode through full forwards produces `reply` exactly when every
    choice equals its reply token (by induction over the steps). Also the smallest top-2 margin."""
    from megatron_focusft.masks import segment_mask

    tokens = [t for b in blocks for t in b] + question + reply
    block_ids = [i for i, b in enumerate(blocks) for _ in b] + [len(blocks)] * (len(question) + len(reply))
    ids = torch.tensor([tokens])
    mask = (segment_mask("block", doc_ids=torch.zeros_like(ids), block_ids=torch.tensor([block_ids]))
            if mask_kind == "block" else segment_mask("causal", doc_ids=torch.zeros_like(ids)))
    logits = model(ids, torch.arange(len(tokens))[None], attention_mask=mask)[0].float()
    steps = logits[len(tokens) - len(reply) - 1:len(tokens) - 1]  # [len(reply), vocab]: the logit at t picks t + 1
    top = steps.topk(2, dim=-1).values
    return steps.argmax(dim=-1).tolist(), float((top[:, 0] - top[:, 1]).min())


def _eval(tmp_path, name: str, *extra: str) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    assert cli_main(["eval", "--hf-path", str(tmp_path / "llama"), "--tasks", "rag_shared", "--lengths", str(LENGTH),
                     "--samples", str(SAMPLES), "--seed", str(SEED), "--output-dir", str(out), *extra]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), rows


def test_block_and_full_attention_eval(single_rank, tmp_path, capsys):
    from megatron_focusft.generation.loading import load_inference_model
    from megatron_focusft.runtime import release_model_parallel
    from tests.helpers.distributed import init_model_parallel
    from tests.helpers.hf_models import save_tiny_hf_model

    save_tiny_hf_model("llama", tmp_path / "llama", tokenizer=False, vocab_size=VOCAB)  # no tokenizer: byte tokens
    release_model_parallel()
    block_results, block_rows = _eval(tmp_path, "block", "--attention", "block")
    assert "block cache:" in capsys.readouterr().err
    full_results, full_rows = _eval(tmp_path, "full")

    samples = generate_samples("rag_shared", LENGTH, SAMPLES, count, SEED)
    parts = [_prompt_parts(s) for s in samples]
    init_model_parallel()
    model = load_inference_model(hf_path=tmp_path / "llama").model
    block_replies, full_replies = [r["output_ids"] for r in block_rows], [r["output_ids"] for r in full_rows]
    assert all(len(r) == TASKS["rag_shared"].max_new_tokens or r[-1] == TOKENIZER.eos_id
               for r in block_replies + full_replies)
    for (blocks, question), block_reply, full_reply in zip(parts, block_replies, full_replies):
        choices, margin = _choices(model, blocks, question, block_reply, "block")
        assert choices == block_reply and margin > 10 * TOL, (choices, block_reply, margin)
        choices, margin = _choices(model, blocks, question, full_reply, "causal")
        assert choices == full_reply and margin > 10 * TOL, (choices, full_reply, margin)
    # The modes differ here: the block replies are not what causal attention over the same tokens picks.
    assert any(_choices(model, blocks, question, reply, "causal")[0] != reply
               for (blocks, question), reply in zip(parts, block_replies))

    # The cache: a block's first use encodes it, every later use (at any offset) is a hit.
    uses = [tuple(b) for blocks, _ in parts for b in blocks]
    assert block_results["meta"]["block_cache"] == {"hits": len(uses) - len(set(uses)), "misses": len(set(uses))}
    assert len(uses) - len(set(uses)) > SAMPLES - 1  # the header and some pooled passages
    assert block_results["meta"]["attention"] == "block" and full_results["meta"]["attention"] == "full"
    assert "block_cache" not in full_results["meta"]
    sizes = [sum(map(len, blocks)) + len(question) for blocks, question in parts]
    for results in (block_results, full_results):
        summary = results["results"]["rag_shared"][str(LENGTH)]
        assert set(summary) == {"score", "ci95", "samples", "mean_prompt_tokens"} and summary["samples"] == SAMPLES
        assert summary["mean_prompt_tokens"] == pytest.approx(sum(sizes) / SAMPLES)
    assert [r["references"] for r in block_rows] == [list(s.references) for s in samples]

    # Full attention is `focusft generate` on the concatenated prompt.
    release_model_parallel()
    rows = tmp_path / "concatenated.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": [t for b in blocks for t in b] + question}) + "\n"
                            for blocks, question in parts))
    assert cli_main(["generate", "--hf-path", str(tmp_path / "llama"), "--input", str(rows), "--output",
                     str(tmp_path / "generated.jsonl"), "--max-new-tokens", str(TASKS["rag_shared"].max_new_tokens)]) == 0
    generated = [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()]
    assert [g["output_ids"] for g in generated] == [r["output_ids"] for r in full_rows]


def test_rag_files_read_as_the_generated_samples(tmp_path):
    path = tmp_path / "rag.jsonl"
    assert cli_main(["data", "rag", "--output", str(path), "--num-samples", "3", "--target-tokens", "700",
                     "--passages", "8", "--pool-size", "32", "--seed", "4"]) == 0
    spec = TASKS["rag_shared"]
    read = read_rag_jsonl(path, "rag_shared", spec.metric, spec.max_new_tokens)
    assert read == generate_samples("rag_shared", 700, 3, count, seed=4)
    assert [s.length for s in read] == [700] * 3 and [s.index for s in read] == [0, 1, 2]


def test_analyze_probes_a_block_task_in_its_full_form():
    from megatron_focusft.analysis.cli import _probe_chats

    args = argparse.Namespace(data_path=None, tasks=("rag",), lengths=(700,), samples=2, seed=0)
    for chat, sample in zip(_probe_chats(args, TOKENIZER), generate_samples("rag", 700, 2, count)):
        assert chat[0]["content"] == "\n\n".join((*sample.blocks, sample.prompt))
        assert chat[1]["content"] == sample.references[0]


@pytest.mark.parametrize("row, message", [
    ({"blocks": ["p"], "messages": [{"role": "user", "content": "q"}]}, r"rag.jsonl:2: 'messages' must be a user"),
    ({"blocks": [[5, 6]], "messages": []}, r"rag.jsonl:2: block 1 must be a non-empty text"),
    ({"messages": []}, r"rag.jsonl:2: missing field 'blocks'"),
    ({"blocks": ["p"], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "1"}],
      "meta": {"target_tokens": "many"}}, r"rag.jsonl:2: 'meta' must be an object"),
])
def test_bad_rag_rows_name_the_row(tmp_path, row, message):
    path = tmp_path / "rag.jsonl"
    good = {"blocks": ["p"], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "1"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SampleFileError, match=message):
        read_rag_jsonl(path, "rag", "part", 16)


def test_eval_flags_for_block_tasks(capsys):
    for argv, message in ((["--attention", "block", "--prefill", "focusft"], "--attention block runs the block mask"),
                          (["--attention", "block", "--test-time-adaptation"], "--attention block runs the block mask"),
                          (["--tasks", "rag", "--prompt-format", "raw"], "--prompt-format raw: the block tasks"),
                          (["--rag-file", "absent.jsonl"], "absent.jsonl does not exist")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["eval", "--load", "x", *argv, "--output-dir", "out"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
