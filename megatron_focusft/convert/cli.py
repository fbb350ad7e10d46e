"""`focusft convert import-hf | export-hf` (import under torchrun for TP x PP > 1).

    focusft convert import-hf --hf-path DIR --megatron-path OUT [--tensor-model-parallel-size N]
                              [--pipeline-model-parallel-size N] [--overwrite]
    focusft convert export-hf --megatron-path CKPT --hf-path OUT [--tokenizer-model DIR] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from megatron_focusft.convert.commands import DTYPES


def build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="focusft convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="direction", required=True, metavar="{import-hf,export-hf}")
    imp = commands.add_parser("import-hf", help="a Hugging Face directory -> a Megatron distributed checkpoint")
    imp.add_argument("--hf-path", required=True, help="directory with config.json and safetensors weights")
    imp.add_argument("--megatron-path", required=True, help="the checkpoint directory to write")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="ranks that each read and write their own shard (launch that many processes)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--bf16", action="store_true", help="store bf16 parameters (default: fp32, as training keeps them)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --megatron-path")
    exp = commands.add_parser("export-hf", help="a checkpoint of this project -> a Hugging Face directory")
    exp.add_argument("--megatron-path", required=True, help="a checkpoint directory (imported or saved by training)")
    exp.add_argument("--hf-path", required=True, help="the directory to write")
    exp.add_argument("--ckpt-step", type=int, default=None, help="the iteration to export (default: latest)")
    exp.add_argument("--tokenizer-model", default=None,
                     help="tokenizer directory to copy (default: the tokenizer files the checkpoint keeps)")
    exp.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="weights dtype; auto: the source model's, else float32")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --hf-path")
    return parser


def main(argv: Sequence[str]) -> int:
    from megatron_focusft.convert.commands import export_hf, import_hf
    from megatron_focusft.runtime import megatron_session, quiet_megatron_import_warnings

    parser = build_convert_parser()
    args = parser.parse_args(argv)
    quiet_megatron_import_warnings()
    if args.direction == "import-hf":
        for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(args, flag) < 1:
                parser.error(f"--{flag.replace('_', '-')} must be >= 1")
        check_world_size(parser, args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
        with megatron_session(args.tensor_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size):
            import_hf(args.hf_path, args.megatron_path, overwrite=args.overwrite, bf16=args.bf16)
    else:
        check_world_size(parser, 1)
        with megatron_session():
            export_hf(args.megatron_path, args.hf_path, tokenizer_model=args.tokenizer_model, overwrite=args.overwrite,
                      dtype=args.dtype, ckpt_step=args.ckpt_step)
    return 0


def check_world_size(parser: argparse.ArgumentParser, ranks: int) -> None:
    """A usage error unless this launch has `ranks` processes (torchrun's WORLD_SIZE, else 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != ranks:
        parser.error(f"this command needs {ranks} process(es) (TP x PP), but {world} run: launch with "
                     f"torchrun --nproc-per-node {ranks} $(which focusft) {parser.prog.split()[-1]} ...")
