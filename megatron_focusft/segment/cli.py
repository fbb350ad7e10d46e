"""``focusft segment``: apply, train, eval, bench and synthetic (the flags; the work is elsewhere
in this package).

apply      the rows of --input with their block boundaries, by any registered method
train      a learned segmenter from a gold JSONL file, saved as a model directory
eval       P/R/F1 (exact and within w tokens), Pk and WindowDiff of --pred against --gold
bench      the README table: learned vs each baseline on held-out synthetic data
synthetic  write synthetic texts with gold boundaries (levels 1 and 2) as JSONL
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_focusft.data.tokenizer import load_chat_tokenizer
from megatron_focusft.segment.corpus import (
    SegmentDataError,
    document_from_row,
    document_row,
    iter_rows,
    read_documents,
    write_rows,
)
from megatron_focusft.segment.registry import SegmenterSettings, build_segmenter, segmenter_method, segmenter_names


def _tokenizer_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="Hugging Face tokenizer directory (with a chat template) whose tokens budgets and "
                             "metrics count; default: the built-in byte tokenizer (one token per UTF-8 byte)")


def add_segment_commands(commands: Any) -> None:
    """Add ``segment`` and its subcommands to the ``focusft`` subparsers `commands`."""
    from megatron_focusft.segment.bench import SegmentBenchConfig
    from megatron_focusft.segment.learned import BoundaryModelConfig, TrainConfig
    from megatron_focusft.segment.synthetic import SyntheticConfig

    segment = commands.add_parser("segment", help="automatic segmentation into blocks (apply, train, eval, bench)")
    sub = segment.add_subparsers(dest="segment", required=True, metavar="{apply,train,eval,bench,synthetic}")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    apply = sub.add_parser("apply", help="add block boundaries to the rows of a JSONL file", formatter_class=defaults,
                           description="Writes each row of --input with 'boundaries' (character offsets where a "
                                       "block starts; a gold 'levels' key is dropped), 'segmenter' (the method's "
                                       "identity) and, with --tokenizer, 'token_boundaries'.")
    apply.add_argument("--method", required=True, choices=segmenter_names(),
                       help="; ".join(f"{n}: {segmenter_method(n).help}" for n in segmenter_names()))
    apply.add_argument("--input", required=True, help="JSONL rows with a 'text'")
    apply.add_argument("--output", required=True, help="JSONL file to write")
    apply.add_argument("--max-block-tokens", type=int, default=None, help="token budget per block")
    apply.add_argument("--threshold", type=float, default=None,
                       help="learned: boundary probability (0.5); texttiling: valley depth (Hearst's cutoff)")
    apply.add_argument("--level", type=int, default=None, help="learned: granularity level, 1 coarsest (finest)")
    apply.add_argument("--model", default=None, help="learned: model directory from `focusft segment train`")
    apply.add_argument("--batch-size", type=int, default=SegmenterSettings.batch_size, help="texts per batch")
    apply.add_argument("--no-progress", action="store_true", help="no progress bar")
    apply.add_argument("--join-blocks", default=None, metavar="SEP",
                       help="block rows (`blocks` texts, e.g. `focusft data rag`): the text is the blocks joined by "
                            "SEP, and the method's blocks (stripped of surrounding whitespace) replace them; "
                            "meta.answer_block is dropped")
    _tokenizer_flag(apply)

    train_defaults = TrainConfig()
    train = sub.add_parser("train", help="train the learned segmenter on gold boundaries", formatter_class=defaults)
    train.add_argument("--train", required=True, help="gold JSONL (text, boundaries, optional levels)")
    train.add_argument("--output", required=True, help="model directory to write")
    train.add_argument("--separator", default=BoundaryModelConfig.separator,
                       help="regular expression of the separators: a candidate cut follows each match")
    train.add_argument("--epochs", type=int, default=train_defaults.epochs)
    train.add_argument("--batch-size", type=int, default=train_defaults.batch_size, help="candidates per step")
    train.add_argument("--lr", type=float, default=train_defaults.lr)
    train.add_argument("--seed", type=int, default=train_defaults.seed)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("eval", help="score predicted boundaries against gold ones", formatter_class=defaults)
    evaluate.add_argument("--gold", required=True, help="gold JSONL")
    evaluate.add_argument("--pred", required=True, help="predicted JSONL, same texts in the same order")
    evaluate.add_argument("--level", type=int, default=None, help="gold granularity level (default: all boundaries)")
    evaluate.add_argument("--tolerance", type=int, default=16, help="w of the tolerant F1, in tokens")
    evaluate.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _tokenizer_flag(evaluate)

    bench_defaults = SegmentBenchConfig()
    bench = sub.add_parser("bench", help="learned vs each baseline on held-out synthetic data (README table)",
                           formatter_class=defaults)
    bench.add_argument("--train-documents", type=int, default=bench_defaults.train_documents)
    bench.add_argument("--test-documents", type=int, default=bench_defaults.test_documents)
    bench.add_argument("--seed", type=int, default=bench_defaults.seed)
    bench.add_argument("--epochs", type=int, default=bench_defaults.epochs)
    bench.add_argument("--tolerance", type=int, default=bench_defaults.tolerance, help="w of the tolerant F1")
    bench.add_argument("--json", action="store_true", help="one JSON object per row on stdout")

    synthetic_defaults = SyntheticConfig()
    synthetic = sub.add_parser("synthetic", help="write synthetic texts with gold boundaries", formatter_class=defaults)
    synthetic.add_argument("--output", required=True, help="JSONL file to write")
    synthetic.add_argument("--documents", type=int, default=synthetic_defaults.documents)
    synthetic.add_argument("--seed", type=int, default=synthetic_defaults.seed)


def run_apply(args: argparse.Namespace) -> None:
    from megatron_focusft.segment.tokens import chars_to_tokens, token_starts

    settings = SegmenterSettings(max_block_tokens=args.max_block_tokens, threshold=args.threshold, level=args.level,
                                 model=args.model, batch_size=args.batch_size, progress=not args.no_progress)
    tokenizer = load_chat_tokenizer(args.tokenizer)
    segmenter = build_segmenter(args.method, settings, tokenizer)
    rows = [(row, record) for row, record in iter_rows(args.input)]
    if args.join_blocks is not None:
        texts = [joined_blocks(record, args.input, row, args.join_blocks) for row, record in rows]
    else:
        texts = [document_from_row(record, args.input, row, gold=False).text for row, record in rows]
    out = []
    for (_, record), text, boundaries in zip(rows, texts, segmenter.segment(texts)):
        result = {k: v for k, v in record.items() if k != "levels"}
        if args.join_blocks is not None:
            result["blocks"] = split_blocks(text, boundaries)
            if isinstance(record.get("meta"), dict):
                result["meta"] = {k: v for k, v in record["meta"].items() if k != "answer_block"}
        result.update(boundaries=boundaries, segmenter=segmenter.identity)
        if args.tokenizer is not None:
            result["token_boundaries"] = chars_to_tokens(token_starts(tokenizer, text), boundaries)
        out.append(result)
    write_rows(args.output, out)
    print(f"{len(out)} rows -> {args.output} ({segmenter.identity})", file=sys.stderr)


def joined_blocks(record: dict, path: str, row: int, separator: str) -> str:
    """The text of a block row for --join-blocks: its `blocks` texts joined by `separator`."""
    blocks = record.get("blocks")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) and b for b in blocks):
        raise SegmentDataError(path, row, "--join-blocks needs 'blocks': a non-empty list of non-empty texts")
    return separator.join(blocks)


def split_blocks(text: str, boundaries: list[int]) -> list[str]:
    """The blocks of `text` cut at `boundaries`, each stripped of surrounding whitespace, empty ones
    dropped (a cut inside a separator leaves nothing of it)."""
    edges = [0, *boundaries, len(text)]
    return [block for a, b in zip(edges, edges[1:]) if (block := text[a:b].strip())]


def run_train(args: argparse.Namespace) -> None:
    from megatron_focusft.segment.learned import (
        BoundaryModelConfig,
        TrainConfig,
        save_boundary_model,
        train_boundary_model,
    )

    documents = read_documents(args.train)
    levels = max([1, *(lv for d in documents for lv in (d.levels or ()))])
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        progress=not args.no_progress)
    model, summary = train_boundary_model(documents, BoundaryModelConfig(separator=args.separator, levels=levels),
                                          train)
    save_boundary_model(model, args.output, summary)
    print(f"trained on {summary.documents} texts, {summary.candidates} candidates ({summary.unreachable} gold "
          f"boundaries are no candidate), final loss {summary.losses[-1]:.4f} -> {args.output}", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> None:
    from megatron_focusft.segment.evaluate import score_files

    scores = score_files(args.gold, args.pred, load_chat_tokenizer(args.tokenizer), level=args.level,
                         tolerance=args.tolerance)
    if args.json:
        print(json.dumps(scores.as_dict()))
        return
    print(f"{scores.documents} texts, {scores.reference_boundaries} gold / {scores.predicted_boundaries} predicted "
          f"boundaries\nP {scores.precision:.4f}  R {scores.recall:.4f}  F1 {scores.f1:.4f}\n"
          f"within {scores.tolerance} tokens: P {scores.tolerant_precision:.4f}  R {scores.tolerant_recall:.4f}  "
          f"F1 {scores.tolerant_f1:.4f}\nPk {scores.pk:.4f}  WindowDiff {scores.windowdiff:.4f}")


def run_bench(args: argparse.Namespace) -> None:
    from megatron_focusft.segment.bench import SegmentBenchConfig, print_segment_bench

    print_segment_bench(SegmentBenchConfig(train_documents=args.train_documents, test_documents=args.test_documents,
                                           seed=args.seed, epochs=args.epochs, tolerance=args.tolerance),
                        as_json=args.json)


def run_synthetic(args: argparse.Namespace) -> None:
    from megatron_focusft.segment.synthetic import SyntheticConfig, synthetic_documents

    documents = synthetic_documents(SyntheticConfig(documents=args.documents, seed=args.seed))
    write_rows(args.output, [document_row(d) for d in documents])
    print(f"{len(documents)} texts -> {args.output}", file=sys.stderr)


COMMANDS = {"apply": run_apply, "train": run_train, "eval": run_eval, "bench": run_bench, "synthetic": run_synthetic}


def run_segment_command(args: argparse.Namespace) -> None:
    """Run ``focusft segment <args.segment>``; bad settings and bad rows raise ValueError."""
    COMMANDS[args.segment](args)
