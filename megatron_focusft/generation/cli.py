"""`focusft generate`: text from an HF directory or a checkpoint (launch under torchrun for TP > 1).

    focusft generate --load CKPT --prompt "..." --max-new-tokens 64
    focusft generate --hf-path DIR --input prompts.jsonl --output out.jsonl --prefill focusft
    focusft generate --load CKPT --input prompts.jsonl --test-time-adaptation

With --test-time-adaptation the inner loop runs on each prompt with the `context` objective
(`--focusft-*` flags; unset ones come from the checkpoint's training run, else the defaults),
and the reply is generated with the adapted fast weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_focusft.attention.backends import attention_backend_names
from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.focusft.config import FocusftConfig
from megatron_focusft.generation.decode import PREFILL_MODES, GenerationConfig
from megatron_focusft.generation.loading import InferenceModel
from megatron_focusft.generation.sampling import SamplingConfig

_GEN, _SAMPLING = GenerationConfig(), SamplingConfig()


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model to load (shared by `focusft generate`, `eval` and `analyze`)."""
    source = parser.add_argument_group("model")
    source.add_argument("--hf-path", default=None, help="a Hugging Face model directory")
    source.add_argument("--load", default=None, help="a checkpoint directory of this project")
    source.add_argument("--ckpt-step", type=int, default=None, help="the checkpoint iteration (default: latest)")
    source.add_argument("--tokenizer-model", default=None,
                        help="tokenizer directory (default: the model's own files, else the built-in byte tokenizer)")
    source.add_argument("--tensor-model-parallel-size", type=int, default=1)
    source.add_argument("--bf16", action="store_true")
    source.add_argument("--attention-backend", choices=attention_backend_names(), default="sdpa",
                        help="prefill attention backend (decoding steps always use the KV-cache path)")
    source.add_argument("--micro-batch-size", type=int, default=8, help="prompts per batch")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model to run and how (shared by `focusft generate` and `focusft eval`)."""
    add_model_source_arguments(parser)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prefill", choices=PREFILL_MODES, default=_GEN.prefill,
                     help="causal: the prompt under a causal mask; focusft: its context blocks bidirectional")
    gen.add_argument("--seed", type=int, default=_SAMPLING.seed)
    tta = parser.add_argument_group("test-time adaptation")
    tta.add_argument("--test-time-adaptation", action="store_true",
                     help="adapt fast weights to each prompt (FocuSFT inner loop, context objective) first")
    from megatron_focusft.focusft.method import add_focusft_arguments

    add_focusft_arguments(tta)
    # Unset --focusft-* flags come from the checkpoint's run (None marks them unset).
    parser.set_defaults(**{a.dest: None for a in tta._group_actions if a.dest.startswith("focusft_")})


def check_model_arguments(args: argparse.Namespace) -> None:
    if (args.hf_path is None) == (args.load is None):
        raise ValueError("give exactly one of --hf-path and --load")
    if args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.test_time_adaptation and args.focusft_inner_objective not in (None, "context"):
        raise ValueError("--test-time-adaptation runs the context objective; drop --focusft-inner-objective")


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser)
    io = parser.add_argument_group("prompts")
    io.add_argument("--prompt", action="append", default=[], help="a raw text prompt (repeatable)")
    io.add_argument("--input", default=None, help="JSONL of prompts (`messages`, `input_ids` or `prompt` per row)")
    io.add_argument("--output", default=None, help="JSONL of generations (default: stdout)")
    io.add_argument("--output-logits", default=None, help="save each prompt's per-step logits [steps, vocab] (torch.save)")
    io.add_argument("--blocks", action="store_true",
                    help="block attention with KV reuse: --input rows hold `blocks` and `global` (generation/prompts.py)")
    io.add_argument("--max-blocks", type=int, default=None, help="with --blocks: local blocks beyond this join the global one")
    gen = parser.add_argument_group("sampling")
    gen.add_argument("--max-new-tokens", type=int, default=_GEN.max_new_tokens)
    gen.add_argument("--temperature", type=float, default=_SAMPLING.temperature, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=_SAMPLING.top_k, help="0: off")
    gen.add_argument("--top-p", type=float, default=_SAMPLING.top_p, help="1: off")
    return parser


@dataclass
class LoadedForInference:
    """The model, its tokenizer, its stop tokens and the test-time-adaptation settings (or None)."""

    loaded: InferenceModel
    tokenizer: ChatTokenizer
    stop_token_ids: tuple[int, ...]
    test_time_adaptation: FocusftConfig | None


def load_for_inference(args: argparse.Namespace) -> LoadedForInference:
    """From add_model_arguments' flags (collective over TP)."""
    from megatron_focusft.data.tokenizer import load_chat_tokenizer
    from megatron_focusft.engine.checkpoint import read_checkpoint_info
    from megatron_focusft.focusft.method import focusft_config
    from megatron_focusft.generation.loading import load_inference_model
    from megatron_focusft.generation.prompts import stop_token_ids

    tta = None
    if args.test_time_adaptation:
        info = read_checkpoint_info(args.load, args.ckpt_step) if args.load else None
        trained = dict((info.run_config or {}) if info else {})
        flags = {k: v for k, v in vars(args).items() if k.startswith("focusft_") and v is not None}
        tta = dataclasses.replace(focusft_config({**trained, **flags}), inner_objective="context")
    loaded = load_inference_model(hf_path=args.hf_path, load=args.load, ckpt_step=args.ckpt_step,
                                  fast_weights=tta.fast_weights if tta else None, bf16=args.bf16,
                                  attention_backend=args.attention_backend)
    tokenizer_dir = args.tokenizer_model or (loaded.assets if (loaded.assets / "tokenizer.json").is_file() else None)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    return LoadedForInference(loaded, tokenizer, stop_token_ids(tokenizer, loaded.assets), tta)


def parse_generate_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = add_generate_arguments(argparse.ArgumentParser(
        prog="focusft generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        check_model_arguments(args)
        if bool(args.prompt) == (args.input is not None):
            raise ValueError("give --prompt TEXT (repeatable) or --input FILE.jsonl")
        if args.input is not None and not Path(args.input).is_file():
            raise ValueError(f"--input {args.input} does not exist")
        if args.blocks and (args.input is None or args.test_time_adaptation or args.prefill != "causal"):
            raise ValueError("--blocks needs --input FILE.jsonl and runs the block mask (no --prefill focusft, "
                             "no --test-time-adaptation)")
        args.generation = GenerationConfig(
            max_new_tokens=args.max_new_tokens, prefill=args.prefill,
            sampling=SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed),
            keep_logits=args.output_logits is not None)
    except ValueError as e:
        parser.error(str(e))
    return args


def run_generate(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_focusft.generation.decode import generate
    from megatron_focusft.generation.prompts import prompt_of_row, read_prompts, write_generations
    from megatron_focusft.generation.test_time import adapt_prompts

    rank0 = dist.get_rank() == 0
    setup = load_for_inference(args)
    tokenizer, tta, model = setup.tokenizer, setup.test_time_adaptation, setup.loaded.model
    vocab = setup.loaded.shape.vocab_size
    if args.blocks:
        _run_blocks(args, setup, read_prompts(args.input, tokenizer, vocab, blocks=True))
        return
    if args.input:
        prompts = read_prompts(args.input, tokenizer, vocab)
    else:
        prompts = [prompt_of_row({"prompt": text}, tokenizer, vocab, f"--prompt {i + 1}")
                   for i, text in enumerate(args.prompt)]
    config = dataclasses.replace(args.generation, stop_token_ids=setup.stop_token_ids)
    generator = torch.Generator().manual_seed(config.sampling.seed)
    out = open(args.output, "w", encoding="utf-8") if args.output and rank0 else contextlib.nullcontext(sys.stdout)
    logits = []
    size = args.micro_batch_size
    with out as stream:
        batches = range(0, len(prompts), size)
        for start in tqdm(batches, desc="generate", unit="batch", disable=not rank0, file=sys.stderr):
            chunk = prompts[start:start + size]
            fast = None
            if tta is not None:
                fast = adapt_prompts(model, chunk, tta, seeds=range(start, start + len(chunk)), seed=args.seed,
                                     pad_id=tokenizer.pad_id)
            results = generate(model, chunk, config, pad_id=tokenizer.pad_id, fast_weights=fast, generator=generator)
            if rank0:
                write_generations(stream, chunk, results, tokenizer, first_index=start)
            logits += [r.logits for r in results]
    if args.output_logits and rank0:
        torch.save(logits, args.output_logits)


def _run_blocks(args: argparse.Namespace, setup: LoadedForInference, prompts: list) -> None:
    """One prompt at a time through one block KV cache shared by all of them."""
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_focusft.generation.blocks import BlockKVCache, generate_with_blocks
    from megatron_focusft.generation.prompts import write_generations

    rank0 = dist.get_rank() == 0
    config = dataclasses.replace(args.generation, stop_token_ids=setup.stop_token_ids)
    generator = torch.Generator().manual_seed(config.sampling.seed)
    cache = BlockKVCache()
    out = open(args.output, "w", encoding="utf-8") if args.output and rank0 else contextlib.nullcontext(sys.stdout)
    logits = []
    with out as stream:
        for index, prompt in enumerate(tqdm(prompts, desc="generate", unit="prompt", disable=not rank0,
                                            file=sys.stderr)):
            prompt = prompt.folded(args.max_blocks)
            result = generate_with_blocks(setup.loaded.model, prompt, config, cache, generator)
            if rank0:
                write_generations(stream, [prompt], [result], setup.tokenizer, first_index=index)
            logits.append(result.logits)
    if rank0:
        print(f"block cache: {cache.hits} hits, {cache.misses} blocks encoded", file=sys.stderr)
    if args.output_logits and rank0:
        torch.save(logits, args.output_logits)


def run_inference_command(prog: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], object]) -> int:
    """The main() of an inference command (generate, eval, analyze): the launch's world size must
    be the TP size, then `run(args)` inside one Megatron session."""
    from megatron_focusft.convert.cli import check_world_size
    from megatron_focusft.runtime import megatron_session, quiet_megatron_import_warnings

    check_world_size(argparse.ArgumentParser(prog=prog), args.tensor_model_parallel_size)
    quiet_megatron_import_warnings()
    with megatron_session(args.tensor_model_parallel_size, args.seed):
        run(args)
    return 0


def main(argv: Sequence[str]) -> int:
    return run_inference_command("focusft generate", parse_generate_args(argv), run_generate)
