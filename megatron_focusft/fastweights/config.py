"""Fast-weight settings and which Megatron layers carry fast weights."""

from __future__ import annotations

from dataclasses import dataclass

# Linear slots that can carry fast weights. FocuSFT adapts the MLP only ("fc1", "fc2"); the
# attention slots are an option of ours.
TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
INITS: tuple[str, ...] = ("kaiming",)


@dataclass(frozen=True)
class FastWeightConfig:
    """Transient per-sample LoRA-style adapters: out = base(x) + (alpha / rank) * x A^T B^T.

    rank            r of every adapter (A [r, in], B [out, r]).
    alpha           the adapter output is scaled by alpha / rank.
    layer_fraction  the top fraction of decoder layers that carry fast weights.
    targets         linear slots with fast weights: "fc1" (gate and up, each its own A/B when the
                    MLP is gated), "fc2" (down), optionally "qkv" and "proj" (attention).
    init            A ~ kaiming_uniform(a=sqrt(5)) as torch.nn.init does for a [r, in] weight,
                    B = 0 (the only option: the adapter starts as an exact no-op).
    """

    rank: int = 32
    alpha: float = 64.0
    layer_fraction: float = 0.35
    targets: tuple[str, ...] = ("fc1", "fc2")
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 < self.layer_fraction <= 1.0:
            raise ValueError(f"layer_fraction must be in (0, 1], got {self.layer_fraction}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct names from {TARGETS}, got {self.targets}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapted_layer_numbers(num_layers: int, layer_fraction: float) -> range:
    """Megatron layer numbers (1-based, global) of the layers that carry fast weights.

    The reference counts layers from 0 and adapts index i >= int(L * (1 - fraction)); Megatron's
    `TransformerLayer.layer_number` counts from 1, so that is layer number i + 1. For L = 4 and
    0.35: int(2.6) = 2 -> 0-based layers 2, 3 -> Megatron layers 3, 4. The float expression is the
    reference's own, so a fraction that lands a hair below an integer rounds the same way there.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    first_index = int(num_layers * (1 - layer_fraction))
    return range(first_index + 1, num_layers + 1)


def target_projections(target: str, gated: bool) -> tuple[str, ...]:
    """Projection names of one target slot, in the order of the slot's local output.

    A gated fc1 holds [gate; up] and gets one adapter per half; a non-gated fc1 is the up
    projection alone.
    """
    if target == "fc1":
        return ("gate", "up") if gated else ("up",)
    if target == "fc2":
        return ("down",)
    if target in ("qkv", "proj"):
        return (target,)
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
