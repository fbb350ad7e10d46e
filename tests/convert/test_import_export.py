"""HF -> Megatron -> HF on tiny models built by transformers (Llama with llama3 RoPE scaling,
Qwen2 with QKV bias and tied embeddings, both GQA): the logits of the HF model, of the imported
model at TP = 1, TP = 2 and PP = 2 and of the re-exported HF model agree, and the export loads in
transformers with no missing or unexpected keys.

Tolerance: every path computes the same fp32 arithmetic in a different order (fused QKV,
sharded matmuls, SDPA with a boolean mask against HF's eager attention). Each of the 4 layers'
matmuls (inner size <= 96) rounds with relative error ~sqrt(96) * 6e-8 ~ 6e-7 per entry, so
the logits (magnitude ~1-5 here) may differ by a few 1e-6; TOL = 1e-4 is 20x that, and far
below any real mistake (a wrong head order or a missing bias moves logits by > 0.1).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.hf_models import VOCAB, hf_logits, save_tiny_hf_model

TOL = 1e-4
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Causal logits [b, s, vocab] of a GPTModel stage set: gathers over TP; under PP = 2 stage 0
    sends its hidden states to stage 1 (returns None on stage 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return gather_from_tensor_model_parallel_region(model(tokens, positions, None)).float()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        if stage == 0:
            dist.send(model(tokens, positions, None).contiguous(), dst=1)
            return None
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        return model(None, positions, None).float()


def _load(path: str, tp: int = 1, pp: int = 1):
    from megatron_focusft.engine.checkpoint import load_checkpoint, read_checkpoint_info
    from megatron_focusft.engine.setup import ModelSetup, build_gpt

    shape = read_checkpoint_info(path).shape
    model, _ = build_gpt(ModelSetup(preset=shape, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    load_checkpoint(path, model, None, None, restore_rng=False)
    return model.eval()


def _import(hf_dir: str, out: str, tp: int = 1, pp: int = 1) -> None:
    from megatron_focusft.convert.commands import import_hf
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel(tp=tp, pp=pp)
    import_hf(hf_dir, out, log=lambda *a: None)


def _tp1(hf_dir: str, ckpt: str, export_dir: str) -> torch.Tensor:
    from megatron_focusft.convert.commands import export_hf

    _import(hf_dir, ckpt)
    logits = megatron_logits(_load(ckpt), TOKENS)
    export_hf(ckpt, export_dir, log=lambda *a: None)
    return logits


def _tp2(hf_dir: str, ckpt: str) -> torch.Tensor:
    _import(hf_dir, ckpt, tp=2)
    return megatron_logits(_load(ckpt, tp=2), TOKENS)


def _pp2(ckpt: str) -> torch.Tensor | None:
    from tests.helpers.distributed import init_model_parallel

    init_model_parallel(pp=2)
    return megatron_logits(_load(ckpt, pp=2), TOKENS)


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_round_trip_logits(single_rank, worker_pool, tmp_path, family):
    import transformers

    hf_dir, ckpt, export = tmp_path / "hf", tmp_path / "mcore", tmp_path / "export"
    reference = hf_logits(save_tiny_hf_model(family, hf_dir), TOKENS)
    imported = _tp1(str(hf_dir), str(ckpt), str(export))
    torch.testing.assert_close(imported, reference, atol=TOL, rtol=0)

    tp2 = worker_pool(2).run(_tp2, str(hf_dir), str(tmp_path / "mcore_tp2"))
    pp2 = worker_pool(2).run(_pp2, str(ckpt))
    for logits in (*tp2, pp2[1]):
        torch.testing.assert_close(logits, reference, atol=TOL, rtol=0)

    exported, info = transformers.AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.testing.assert_close(hf_logits(exported.eval(), TOKENS), reference, atol=TOL, rtol=0)
    assert json.loads((export / "config.json").read_text())["model_type"] == family
    assert (export / "tokenizer.json").is_file()
