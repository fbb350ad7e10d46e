"""Settings of the demo: the base model, the fine-tuning arms, the evaluation grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# evaluation.long_context_tasks.TASKS names; word-level tasks only (the demo's tokenizer is a
# word-level one of their vocabulary: evaluation/long_context_tasks.vocabulary_texts).
DEFAULT_TASKS = ("niah_single_essay_word", "niah_multivalue_essay_word", "niah_multikey_essay_word", "babilong_qa1")
PREFILL_MODES = ("causal", "focusft")


@dataclass(frozen=True)
class Arm:
    """One fine-tuning recipe: `pretrain_focusft.py` flags on top of the shared ones."""

    name: str
    label: str
    flags: tuple[str, ...]
    test_time_adaptation: bool = False  # also evaluate with --test-time-adaptation (the context objective)


ARMS = (
    Arm("sft_causal", "SFT, causal mask", ("--training-mode", "sft", "--sft-mask", "causal")),
    Arm("sft_focusft_mask", "SFT, FocuSFT mask", ("--training-mode", "sft", "--sft-mask", "focusft")),
    Arm("focusft_response", "FocuSFT, response objective",
        ("--training-mode", "focusft", "--focusft-inner-objective", "response")),
    Arm("focusft_context", "FocuSFT, context objective",
        ("--training-mode", "focusft", "--focusft-inner-objective", "context"), test_time_adaptation=True),
)


def sweep_arms(inner_lrs: tuple[float, ...]) -> tuple[Arm, ...]:
    """The FocuSFT arms once per inner learning rate (`--sweep`), named `<arm>@inner_lr=<lr>`."""
    return tuple(Arm(f"{arm.name}@inner_lr={lr:g}", f"{arm.label}, inner lr {lr:g}",
                     (*arm.flags, "--focusft-inner-lr", f"{lr:g}"), arm.test_time_adaptation)
                 for lr in inner_lrs for arm in ARMS if "--training-mode" in arm.flags
                 and arm.flags[arm.flags.index("--training-mode") + 1] == "focusft")


@dataclass(frozen=True)
class DemoConfig:
    """The whole experiment; the defaults are `make demo` (one seed; 12.5 minutes on 2 cores, measured).

    seq_length        fine-tuning row length in tokens (the "1x" of the evaluation); the base
                      trains on chats of up to half of it.
    base_steps, steps optimizer steps of the base and of every arm (micro_batch_size rows each).
    seeds             one fine-tuning run per arm and seed; a seed draws the fine-tuning data and
                      the run's --seed; the base is shared.
    eval_samples      samples per task, length and mode (the same samples for every arm).
    inner_lrs         --sweep: extra FocuSFT arms at these inner learning rates.
    """

    output_dir: str = "runs/demo"
    tasks: tuple[str, ...] = DEFAULT_TASKS
    seq_length: int = 256
    micro_batch_size: int = 4
    preset: str = "tiny"
    vocab_size: int = 1024
    base_steps: int = 300
    base_lr: float = 3e-3
    base_chats_per_task: int = 200
    base_copy_chats: int = 1000
    base_corpus_chats: int = 200
    steps: int = 150
    lr: float = 1e-3
    finetune_chats_per_task: int = 150
    seeds: tuple[int, ...] = (1,)
    eval_multipliers: tuple[int, ...] = (1, 2, 4)
    eval_samples: int = 12
    analyze_samples: int = 4
    inner_lrs: tuple[float, ...] = ()
    base_seed: int = 1234

    def __post_init__(self) -> None:
        from megatron_focusft.evaluation.long_context_tasks import WORD_TASKS

        unknown = [t for t in self.tasks if t not in WORD_TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be word-level tasks from {list(WORD_TASKS)}, got {list(self.tasks)}")
        for name in ("seq_length", "micro_batch_size", "base_steps", "steps", "eval_samples", "analyze_samples",
                     "base_chats_per_task", "finetune_chats_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 1:
            raise ValueError(f"seeds must be distinct positive integers, got {self.seeds}")
        if not self.eval_multipliers or min(self.eval_multipliers) < 1:
            raise ValueError(f"eval_multipliers must be positive integers, got {self.eval_multipliers}")
        if any(lr <= 0 for lr in (self.lr, self.base_lr, *self.inner_lrs)):
            raise ValueError("learning rates must be > 0")

    @classmethod
    def short(cls, **overrides: Any) -> DemoConfig:
        """CI-sized: a few steps of everything on 160-token rows, a couple of samples."""
        return cls(**{"seq_length": 160, "base_steps": 3, "steps": 2, "micro_batch_size": 2, "eval_samples": 2,
                      "analyze_samples": 1, "eval_multipliers": (1, 2), "base_chats_per_task": 4,
                      "base_copy_chats": 8, "base_corpus_chats": 4, "finetune_chats_per_task": 4,
                      "tasks": ("niah_single_essay_word", "niah_multivalue_essay_word", "babilong_qa1"), **overrides})

    def base_settings(self) -> dict[str, Any]:
        """The settings the base model depends on (JSON-ready): a base trained with equal ones is reused."""
        return {"tasks": list(self.tasks), **{k: getattr(self, k) for k in (
            "seq_length", "micro_batch_size", "preset", "vocab_size", "base_steps", "base_lr", "base_chats_per_task",
            "base_copy_chats", "base_corpus_chats", "base_seed")}}

    @property
    def arms(self) -> tuple[Arm, ...]:
        return ARMS + sweep_arms(self.inner_lrs)

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return tuple(self.seq_length * m for m in self.eval_multipliers)
