"""An lm-evaluation-harness model (`--model focusft`) over this project's models and generation.

    lm_eval --model focusft --model_args load=CKPT,prefill=focusft --tasks niah_single_1 \\
        --metadata '{"max_seq_lengths": [4096], "tokenizer": "/path/to/tokenizer"}' --batch_size 8

Optional extra `eval` (lm-eval, accelerate); importing this module registers the model.
`generate_until` runs `generation.decode.generate` (greedy unless the request samples; any
prefill mode; with test_time_adaptation=true the prompts are adapted first), cutting the text
at the first stop string as lm-eval's own `hf` model does; `loglikelihood` and
`loglikelihood_rolling` score with one causal forward per sequence (rolling windows of
max_length, lm-eval's own windowing). Tokenisation is the checkpoint's HF tokenizer, as
lm-eval's `hf` model uses it (no BOS unless add_bos_token=true).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_focusft.generation.decode import GenerationConfig, Prompt, generate
from megatron_focusft.generation.sampling import SamplingConfig
from megatron_focusft.generation.test_time import adapt_prompts


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("focusft")
class FocusftLM(TemplateLM):
    def __init__(self, load: str | None = None, hf_path: str | None = None, tokenizer: str | None = None,
                 ckpt_step: int | None = None, prefill: str = "causal", batch_size: int | str = 8,
                 max_gen_toks: int = 256, max_length: int | None = None, add_bos_token: bool | str = False,
                 test_time_adaptation: bool | str = False, tensor_model_parallel_size: int = 1, bf16: bool | str = False,
                 seed: int = 1234, **_: Any) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        from megatron_focusft.engine.checkpoint import read_checkpoint_info
        from megatron_focusft.focusft.method import focusft_config
        from megatron_focusft.generation.loading import load_inference_model
        from megatron_focusft.runtime import megatron_session

        self._session = contextlib.ExitStack()
        self._session.enter_context(megatron_session(int(tensor_model_parallel_size), int(seed)))
        self.tta = None
        if _flag(test_time_adaptation):
            info = read_checkpoint_info(load, ckpt_step) if load else None
            self.tta = dataclasses.replace(focusft_config((info.run_config or {}) if info else {}),
                                           inner_objective="context")
        self.loaded = load_inference_model(hf_path=hf_path, load=load, ckpt_step=None if ckpt_step is None else int(ckpt_step),
                                           fast_weights=self.tta.fast_weights if self.tta else None, bf16=_flag(bf16))
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or Path(hf_path or self.loaded.assets)),
                                                       local_files_only=True)
        self.prefill = prefill
        self.batch_size = 8 if str(batch_size) == "auto" else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(max_length or self.loaded.shape.max_position_embeddings)
        self.add_bos_token = _flag(add_bos_token)
        self.seed = int(seed)
        self._adapted = 0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is (lm-eval's `hf` model: BOS when the tokenizer has one)."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=special)

    def _logprobs(self, tokens: list[int]) -> torch.Tensor:
        """log-softmax [len(tokens), vocab] of a causal forward over `tokens`."""
        device = next(self.loaded.model.parameters()).device
        ids = torch.tensor([tokens], device=device)
        with torch.no_grad():
            logits = self.loaded.model(ids, torch.arange(len(tokens), device=device)[None], None)
        return gather_from_tensor_model_parallel_region(logits)[0].float().log_softmax(-1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        tokens = (context + continuation)[-(self.max_length + 1):]
        logprobs = self._logprobs(tokens[:-1])[-len(continuation):]
        target = torch.tensor(continuation, device=logprobs.device)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(logprobs.gather(-1, target[:, None]).sum()), greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        return [self._score(context, continuation) for _, context, continuation in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [req.args for req in requests]:
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            out.append(sum(self._score(context, continuation)[0] for context, continuation in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(args[indices[0]][1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampled = _flag(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 0.0)) > 0
            sampling = SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                                      top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=self.seed)
            config = GenerationConfig(max_new_tokens=max_new, prefill=self.prefill, sampling=sampling,
                                      stop_token_ids=(self.eot_token_id,))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [Prompt.of_tokens(self.tok_encode(args[i][0])[-(self.max_length - max_new):]) for i in batch]
                fast = None
                if self.tta is not None:
                    fast = adapt_prompts(self.loaded.model, prompts, self.tta, seed=self.seed,
                                         seeds=range(self._adapted, self._adapted + len(prompts)),
                                         pad_id=self.tokenizer.pad_token_id or 0)
                    self._adapted += len(prompts)
                generated = generate(self.loaded.model, prompts, config, pad_id=self.tokenizer.pad_token_id or 0,
                                     fast_weights=fast)
                for i, result in zip(batch, generated):
                    ids = [t for t in result.token_ids if t != self.eot_token_id]
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
        return results
