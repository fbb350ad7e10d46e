"""The lm-evaluation-harness model `focusft`: on the same samples, it answers as lm-eval's own
`hf` model does on the same weights (a tiny HF model and its Megatron import): the same
generations (stop strings, max_gen_toks), log-likelihoods and greedy flags, rolling
log-likelihoods. Tolerance on log-likelihoods: sums of up to ~20 fp32 log-probabilities that
differ by the fp32 rounding of two implementations (see tests/convert/test_import_export.py), 1e-3."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from tests.helpers.hf_models import TOKENIZER_SIZE, WORDS, save_tiny_hf_model


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_focusft_model_answers_as_lm_evals_hf_model(single_rank, tmp_path):
    import megatron_focusft.evaluation.lm_eval_model  # noqa: F401 - registers "focusft"
    from megatron_focusft.runtime import release_model_parallel
    from tests.convert.test_import_export import _import

    save_tiny_hf_model("llama", tmp_path / "hf", vocab_size=TOKENIZER_SIZE)
    _import(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    release_model_parallel()
    hf = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1)
    ours = get_model("focusft")(load=str(tmp_path / "ckpt"), batch_size=2)

    contexts = [" ".join(WORDS[i:i + 9 + i]) for i in range(4)]
    generation = _requests("generate_until", [(c, {"until": ["seven"], "max_gen_toks": 6, "do_sample": False})
                                              for c in contexts])
    theirs_text = hf.generate_until(generation)
    assert ours.generate_until(generation) == theirs_text and any(theirs_text)

    pairs = _requests("loglikelihood", [(c, " " + " ".join(WORDS[j:j + 3])) for j, c in enumerate(contexts)])
    for (lp, greedy), (their_lp, their_greedy) in zip(ours.loglikelihood(pairs), hf.loglikelihood(pairs)):
        assert lp == pytest.approx(their_lp, abs=1e-3) and greedy == their_greedy
    rolling = _requests("loglikelihood_rolling", [(" ".join(WORDS[:12]),)])
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(hf.loglikelihood_rolling(rolling)[0], abs=1e-3)
    assert torch.isfinite(torch.tensor(ours.loglikelihood_rolling(rolling)))
