"""``make demo`` / ``focusft demo``: FocuSFT against SFT from a pretrained base, end to end on CPU.

Through the product's own commands (demo/commands.py): a base model (the tiny preset, trained
once as a causal LM on short task chats, corpus text and copy chats), four fine-tuning arms from
it with ``--finetune`` and identical data and steps (SFT under the causal mask; SFT under the
FocuSFT mask; FocuSFT with the response and with the context inner objective), each exported
to HF, evaluated with ``focusft eval`` at 1x / 2x / 4x the training length in the causal and
focusft prefill modes (the context arm also with ``--test-time-adaptation``) and analysed with
``focusft analyze``. Outputs under ``--output-dir`` (default runs/demo): results.json (every
number and command), table.md, scores_<mode>.png, and each step's own outputs (commands.py).

``focusft demo --seeds 3`` is the full experiment (mean, interval and spread over seeds);
``--sweep 0.3,1,3`` adds FocuSFT arms at those inner learning rates.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from megatron_focusft.demo.config import DemoConfig


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="focusft demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--seeds", type=int, default=len(d.seeds), help="fine-tuning seeds per arm (seeds 1..N)")
    p.add_argument("--steps", type=int, default=None, help=f"fine-tuning steps per arm (default {d.steps})")
    p.add_argument("--base-steps", type=int, default=None, help=f"base model steps (default {d.base_steps})")
    p.add_argument("--eval-samples", type=int, default=None,
                   help=f"samples per task, length and mode (default {d.eval_samples})")
    p.add_argument("--tasks", default=None, help=f"comma-separated eval tasks (default {','.join(d.tasks)})")
    p.add_argument("--sweep", type=_floats, default=(), metavar="INNER_LRS",
                   help="extra FocuSFT arms at these inner learning rates (comma-separated)")
    p.add_argument("--short", action="store_true", help="CI-sized variant (about a minute)")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    overrides: dict[str, Any] = {"output_dir": args.output_dir, "seeds": tuple(range(1, args.seeds + 1)),
                                 "inner_lrs": args.sweep}
    for name in ("steps", "base_steps", "eval_samples"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.tasks is not None:
        overrides["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return DemoConfig.short(**overrides) if args.short else DemoConfig(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``focusft demo``; returns the exit status."""
    from megatron_focusft.demo.run import run_demo

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    run_demo(config, command=shlex.join(["focusft", "demo", *argv]))
    return 0
