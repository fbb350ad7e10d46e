"""`focusft analyze` on a tiny HF model: per layer x head metrics, their pooled mean equal to the
training log's metric on the same probe, the JSON and the heatmap."""

from __future__ import annotations

import json

import torch

from megatron_focusft.cli import main as cli_main


def test_analyze_writes_the_per_head_profile(single_rank, tmp_path):
    from megatron_focusft.analysis.attention_metrics import attention_metrics
    from megatron_focusft.data.batch import make_batch
    from megatron_focusft.data.tokenizer import flatten_segments, load_chat_tokenizer
    from megatron_focusft.generation.loading import load_inference_model
    from megatron_focusft.runtime import release_model_parallel
    from tests.helpers.distributed import init_model_parallel
    from tests.helpers.hf_models import save_tiny_hf_model

    save_tiny_hf_model("qwen2", tmp_path / "hf")
    chats = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "what is the key of the city river"}, {"role": "assistant",
                                                                                   "content": "blue red green"}]
    chats.write_text(json.dumps({"messages": messages}) + "\n")
    release_model_parallel()
    assert cli_main(["analyze", "--hf-path", str(tmp_path / "hf"), "--data-path", str(chats),
                     "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert report["layers"] == [1, 2, 3, 4] and report["heads"] == 4 and report["probes"] == 1
    grid = torch.tensor(report["per_layer_head"]["sink_mass"])
    assert grid.shape == (4, 4) and bool(((grid >= 0) & (grid <= 1)).all())
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 1000
    # The training log's metric on the same probe batch.
    init_model_parallel()
    model = load_inference_model(hf_path=tmp_path / "hf").model
    tokenizer = load_chat_tokenizer(tmp_path / "hf")
    ids, response = flatten_segments(tokenizer.render_chat(messages))
    tokens = torch.tensor([ids])
    logged = attention_metrics(model, make_batch(tokens, torch.zeros_like(tokens), torch.tensor([response])))
    for name, value in logged.items():
        assert abs(report["pooled"][name] - value) < 1e-9, name
