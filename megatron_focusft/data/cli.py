"""``focusft data``: write synthetic data sets and their tokenizer (the flags; the work is in
rag_task.py, copy_task.py and word_tokenizer.py).

rag        the RAG-style block-attention task (block rows)
copy       repeat a random sequence of the task's words, or continue it after a key (copy practice from random init)
tokenizer  a word-level Hugging Face tokenizer of a corpus or of the RAG task's words
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_data_commands(commands: Any) -> None:
    """Add ``data`` with its subcommands to the ``focusft`` subparsers `commands`."""
    from megatron_focusft.data.copy_task import COPY_FORMS, CopyTaskConfig
    from megatron_focusft.data.rag_task import ANSWER_FORMS, RagTaskConfig

    rag_defaults = RagTaskConfig()
    data = commands.add_parser("data", help="write synthetic data sets")
    data_commands = data.add_subparsers(dest="data", required=True, metavar="{rag,copy,tokenizer}")
    rag = data_commands.add_parser(
        "rag", help="the RAG-style block-attention task: passages as local blocks, a question as the global block",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="JSONL block rows {blocks, messages, meta} for block fine-tuning and `focusft eval --rag-file` "
                    "(megatron_focusft/data/rag_task.py).")
    rag.add_argument("--output", required=True, help="JSONL file to write")
    rag.add_argument("--num-samples", type=int, default=rag_defaults.num_samples)
    rag.add_argument("--passages", type=int, default=rag_defaults.passages,
                     help="passages (local blocks) per sample, one of them holding the answer")
    rag.add_argument("--target-tokens", type=int, default=rag_defaults.target_tokens,
                     help="tokens per sample (blocks and question text; the chat template adds its few)")
    rag.add_argument("--pool-size", type=int, default=rag_defaults.pool_size,
                     help="draw every sample's passages from one pool of this many (default: passages of its own)")
    rag.add_argument("--no-header", action="store_true", help="no instruction-header block")
    rag.add_argument("--answer-form", choices=ANSWER_FORMS, default=rag_defaults.answer_form,
                     help="code: the answer is the code alone; sentence: repeat the passage's fact sentence")
    rag.add_argument("--questions", type=int, default=rag_defaults.questions,
                     help="questions per sample about distinct passages, each answered (training rows)")
    rag.add_argument("--distinct-words", action="store_true",
                     help="the entities of a sample share no word (an easier look-up; at most 8 passages, no pool)")
    rag.add_argument("--seed", type=int, default=rag_defaults.seed)
    rag.add_argument("--tokenizer-model", "--tokenizer", dest="tokenizer_model", default=None, metavar="DIR",
                     help="Hugging Face tokenizer directory whose tokens size the samples (default: the built-in "
                          "byte tokenizer)")
    words = data_commands.add_parser(
        "tokenizer", help="a word-level Hugging Face tokenizer of a corpus, for tiny models of synthetic tasks",
        description="Writes a tokenizer directory (tokenizer.json, tokenizer_config.json with a chat template) whose "
                    "vocabulary is the words of the given JSONL rows and, with --rag-vocabulary, every word of the "
                    "RAG task (megatron_focusft/data/word_tokenizer.py). Use it with --tokenizer-model.")
    words.add_argument("--output", required=True, metavar="DIR", help="tokenizer directory to write")
    words.add_argument("--input", nargs="*", default=[], metavar="JSONL",
                       help="rows whose blocks, global and message texts the vocabulary must cover")
    words.add_argument("--rag-vocabulary", action="store_true", help="also every word `focusft data rag` can write")
    copy_defaults = CopyTaskConfig()
    copy = data_commands.add_parser(
        "copy", help="repeat a random sequence of words: copy practice for a model trained from random init",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="JSONL chat rows whose reply repeats the user's random words (drawn from the RAG task's words), "
                    "or continues them after a key word given at the end (megatron_focusft/data/copy_task.py).")
    copy.add_argument("--output", required=True, help="JSONL file to write")
    copy.add_argument("--num-samples", type=int, default=copy_defaults.num_samples)
    copy.add_argument("--form", choices=COPY_FORMS, default=copy_defaults.form,
                      help="repeat: the reply repeats the sequence; continue: 'The <key> <next words>'")
    copy.add_argument("--words", type=int, default=copy_defaults.words,
                      help="the most words per sequence (a row's number is drawn in [--min-words, --words])")
    copy.add_argument("--min-words", type=int, default=copy_defaults.min_words,
                      help="the fewest words per sequence (= --words: one length, which a fixed offset answers)")
    copy.add_argument("--span", type=int, default=copy_defaults.span, help="continue: reply words from the key on")
    copy.add_argument("--seed", type=int, default=copy_defaults.seed)


def run_copy(args: argparse.Namespace) -> None:
    from megatron_focusft.data.copy_task import CopyTaskConfig, copy_rows

    rows = copy_rows(CopyTaskConfig(num_samples=args.num_samples, words=args.words, seed=args.seed, form=args.form,
                                    min_words=args.min_words, span=args.span))
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} {args.form} rows -> {args.output}", file=sys.stderr)


def run_tokenizer(args: argparse.Namespace) -> None:
    from megatron_focusft.data.rag_task import vocabulary_texts
    from megatron_focusft.data.word_tokenizer import save_word_tokenizer

    size = save_word_tokenizer(args.output, args.input, vocabulary_texts() if args.rag_vocabulary else ())
    print(f"word-level tokenizer of {size} tokens -> {args.output}", file=sys.stderr)


def run_rag(args: argparse.Namespace) -> None:
    from megatron_focusft.data.rag_task import RagTaskConfig, rag_samples, write_rag_jsonl
    from megatron_focusft.data.tokenizer import load_chat_tokenizer

    config = RagTaskConfig(num_samples=args.num_samples, passages=args.passages, target_tokens=args.target_tokens,
                           pool_size=args.pool_size, header=not args.no_header, seed=args.seed,
                           answer_form=args.answer_form, questions=args.questions,
                           distinct_words=args.distinct_words)
    tokenizer = load_chat_tokenizer(args.tokenizer_model)
    samples = rag_samples(config, lambda text: len(tokenizer.encode(text)))
    write_rag_jsonl(args.output, samples)
    print(f"{len(samples)} samples ({config.passages} passages each) -> {args.output}", file=sys.stderr)


COMMANDS = {"rag": run_rag, "copy": run_copy, "tokenizer": run_tokenizer}


def run_data_command(args: argparse.Namespace) -> None:
    """Run the parsed ``focusft data`` subcommand; bad settings raise ValueError / OSError."""
    COMMANDS[args.data](args)
