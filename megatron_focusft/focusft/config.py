"""FocuSFT settings (spec: arXiv 2605.09932 and its reference code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_focusft.fastweights.config import FastWeightConfig

INNER_OBJECTIVES: tuple[str, ...] = ("response", "context")
# Under PP > 1: one schedule of every micro-batch's inner and outer units (focusft/interleaved.py), or
# Megatron's 1F1B with the inner loop in the last stage's forward or in schedule calls of its own.
PIPELINE_SCHEDULES: tuple[str, ...] = ("interleaved", "sequential")


@dataclass(frozen=True)
class FocusftConfig:
    """The bilevel step: `inner_steps` of SGD on per-sample fast weights, then the outer SFT loss.

    inner_objective  "response": next-token CE on response tokens under the FocuSFT mask (the
                     reference code); "context": next-token CE on context targets under a causal
                     mask (the paper's abstract; the bidirectional mask would make it trivial).
    inner_grad_clip  per-tensor, per-sample norm clip of each A / B gradient (<= 0: off).
    max_update_norm  the guard's bound on a sample's fast-weight change: the L2 norm, over all its
                     adapted tensors (TP-global), of adapted - initial. An inner step that would take
                     it past the bound is caught like a non-finite one (inner_loop.py). The defaults
                     (lr 1, clip 1, 2 steps, fc1 + fc2 of 2 layers: 12 tensors) keep a sample's
                     change below 2 * sqrt(12) ~ 7; 100 leaves room for larger settings and
                     catches the blow-ups of an inner lr in the thousands and beyond.
    pipeline_schedule  under pipeline parallelism, PIPELINE_SCHEDULES: "interleaved" (focusft/
                     interleaved.py) or "sequential" (engine/pipeline.py's two arrangements).
    inner_steps 0 (the plain SFT step under the same mask) is allowed here, for tests; the
    training flag asks for >= 1.
    """

    inner_steps: int = 2
    inner_lr: float = 1.0
    inner_grad_clip: float = 1.0
    inner_objective: str = "response"
    max_update_norm: float = 100.0
    pipeline_schedule: str = "interleaved"
    fast_weights: FastWeightConfig = field(default_factory=FastWeightConfig)

    def __post_init__(self) -> None:
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if not self.max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0 (inf: no bound), got {self.max_update_norm}")
        if self.inner_objective not in INNER_OBJECTIVES:
            raise ValueError(f"inner_objective must be one of {INNER_OBJECTIVES}, got {self.inner_objective!r}")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {self.pipeline_schedule!r}")
