"""A run's learning-rate schedule, and a resumed run's schedule against its checkpoint's.

Megatron's flags decide what a resumed run does when its schedule flags differ from the
checkpoint's (megatron-core's OptimizerParamScheduler.load_state_dict):
- neither flag: the schedules must be equal; a difference is refused by name before anything
  is loaded (Megatron asserts inside the scheduler's load);
- `--override-opt_param-scheduler`: the flags' schedule, from the checkpoint's step count on;
- `--use-checkpoint-opt_param-scheduler`: the checkpoint's schedule; the flags' values are ignored.
Extending `--train-iters` moves the default decay length (`--lr-decay-iters`), so it is such a
difference unless `--lr-decay-iters` keeps the old length.

megatron-core's optimizer param groups carry `max_lr` and `min_lr` and are matched by them when the
optimizer state loads, so a resumed run builds its optimizer and scheduler with the checkpoint's
schedule (`ResumedSchedule.build`), and an override is applied once the state is loaded
(`LrSchedule.apply`: the groups' and the scheduler's values, then the lr of the current step).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

OVERRIDE_FLAG = "--override-opt_param-scheduler"
USE_CHECKPOINT_FLAG = "--use-checkpoint-opt_param-scheduler"


@dataclass(frozen=True)
class LrSchedule:
    """Warmup from 0 (or none) to max_lr, then decay to min_lr by decay_steps; constant weight decay."""

    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_style: str
    weight_decay: float

    # field -> the flags that set it, for messages
    FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "warmup_steps": "--lr-warmup-iters / --lr-warmup-fraction",
             "decay_steps": "--lr-decay-iters (default --train-iters)", "decay_style": "--lr-decay-style",
             "weight_decay": "--weight-decay"}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LrSchedule:
        decay = args.lr_decay_iters or args.train_iters
        # Megatron's fraction is of the decay length.
        warmup = args.lr_warmup_iters or int((args.lr_warmup_fraction or 0.0) * decay)
        return cls(args.lr, args.min_lr, warmup, decay, args.lr_decay_style, args.weight_decay)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LrSchedule:
        """The schedule of an OptimizerParamScheduler.state_dict()."""
        return cls(state["max_lr"], state["min_lr"], state["lr_warmup_steps"], state["lr_decay_steps"],
                   state["lr_decay_style"], state["start_wd"])

    def build(self, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
        # Both Megatron flags off: loading a checkpoint asserts it has this very schedule, which
        # `resume_schedule` has arranged, so the assert only guards against a mistake here.
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0 if self.warmup_steps else self.max_lr, max_lr=self.max_lr, min_lr=self.min_lr,
            lr_warmup_steps=self.warmup_steps, lr_decay_steps=self.decay_steps, lr_decay_style=self.decay_style,
            start_wd=self.weight_decay, end_wd=self.weight_decay, wd_incr_steps=self.decay_steps,
            wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False)

    def apply(self, scheduler: OptimizerParamScheduler, optimizer: MegatronOptimizer) -> None:
        """Make a loaded scheduler follow this schedule from its current step count."""
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = self.max_lr, self.min_lr
        scheduler.init_lr = 0.0 if self.warmup_steps else self.max_lr
        scheduler.max_lr, scheduler.min_lr = self.max_lr, self.min_lr
        scheduler.lr_warmup_steps, scheduler.lr_decay_steps = self.warmup_steps, self.decay_steps
        scheduler.lr_decay_style = self.decay_style
        scheduler.start_wd = scheduler.end_wd = self.weight_decay
        scheduler.wd_incr_steps = self.decay_steps
        scheduler.step(increment=0)

    def differences(self, saved: LrSchedule) -> list[str]:
        return [f"{self.FLAGS[f.name]}: checkpoint {getattr(saved, f.name)!r}, now {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(saved, f.name)]


@dataclass(frozen=True)
class ResumedSchedule:
    """build: the schedule to build the optimizer and scheduler with (they load the checkpoint);
    after_load: the one to apply once loaded (an override), or None; note: what happened."""

    build: LrSchedule
    after_load: LrSchedule | None = None
    note: str | None = None


def resume_schedule(wanted: LrSchedule, saved: LrSchedule | None, override: bool,
                    use_checkpoint: bool) -> ResumedSchedule:
    """Megatron's rules (module doc); ValueError naming the differing flags when neither flag is
    given. saved None: a checkpoint without a scheduler (the flags' schedule, from step 0)."""
    if saved is None:
        return ResumedSchedule(wanted)
    differences = wanted.differences(saved)
    if not differences:
        return ResumedSchedule(wanted)
    listed = "; ".join(differences)
    if override:
        return ResumedSchedule(saved, wanted, f"{OVERRIDE_FLAG}: the flags' LR schedule replaces the checkpoint's "
                                              f"({listed})")
    if use_checkpoint:
        return ResumedSchedule(saved, None, f"{USE_CHECKPOINT_FLAG}: keeping the checkpoint's LR schedule ({listed})")
    raise ValueError(f"the LR schedule differs from the checkpoint's ({listed}): pass {OVERRIDE_FLAG} to follow the "
                     f"flags from the checkpoint's iteration on, or {USE_CHECKPOINT_FLAG} to keep the checkpoint's")
