"""Megatron's weighted data blend for chat data: `--data-path W1 PATH1 W2 PATH2 ...`.

Without weights every sample is used once per epoch. With weights, an epoch draws as many
samples as there are (N): n_i from path i, n_i proportional to its weight (largest remainders,
so the counts add up to N), taken from a fresh seeded permutation of path i's samples and cycled
when n_i exceeds them. So a path weighted above its share of the samples repeats some within
an epoch, one weighted below it leaves some out of that epoch; each epoch is deterministic in
(seed, epoch), like packing. A directory path is one blend entry holding all its files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_focusft.data.chat import ChatSamples, data_files


@dataclass(frozen=True)
class DataBlend:
    """paths: the data paths, in order; weights: one per path (normalised to sum 1), or None."""

    paths: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("a data blend needs at least one path")
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ValueError(f"{len(self.weights)} weights for {len(self.paths)} paths")
            if not all(math.isfinite(w) and w > 0 for w in self.weights):
                raise ValueError(f"blend weights must be positive numbers, got {list(self.weights)}")
            total = sum(self.weights)
            object.__setattr__(self, "weights", tuple(w / total for w in self.weights))

    @classmethod
    def parse(cls, items: Sequence[str]) -> DataBlend:
        """`PATH ...` or Megatron's `WEIGHT PATH WEIGHT PATH ...` (all weighted or none)."""
        items = list(items)
        if not items or not _is_number(items[0]):
            numbers = [item for item in items if _is_number(item)]
            if numbers:
                raise ValueError(f"--data-path mixes paths and weights ({numbers[0]!r}): give `PATH ...` or "
                                 f"`WEIGHT PATH WEIGHT PATH ...`")
            return cls(tuple(items))
        if len(items) % 2 or not all(_is_number(w) for w in items[::2]):
            raise ValueError(f"--data-path blend {' '.join(items)!r}: expected `WEIGHT PATH WEIGHT PATH ...`")
        return cls(tuple(items[1::2]), tuple(float(w) for w in items[::2]))

    def sample_groups(self, samples: ChatSamples) -> np.ndarray:
        """[num_samples] index of the path each sample came from (samples loaded from these paths,
        in order: `data.chat.load_chat_samples` lists a directory's files where it stands)."""
        group_of_file = [group for group, path in enumerate(self.paths) for _ in data_files(path)]
        if len(group_of_file) != len(samples.files):
            raise ValueError(f"the samples come from {len(samples.files)} files, the blend's paths hold "
                             f"{len(group_of_file)}")
        groups = np.asarray(group_of_file, dtype=np.int64)[samples.source_file.numpy()]
        if self.weights is not None:
            empty = [self.paths[g] for g in range(len(self.paths)) if not (groups == g).any()]
            if empty:
                raise ValueError(f"blend path(s) {', '.join(empty)} hold no usable chat sample")
        return groups

    def epoch_indices(self, groups: np.ndarray, seed: int, epoch: int) -> np.ndarray | None:
        """The sample indices of one epoch's draw (module doc); None without weights (all, once)."""
        if self.weights is None:
            return None
        n = groups.shape[0]
        shares = np.asarray(self.weights) * n
        counts = np.floor(shares).astype(np.int64)
        # Largest remainders, ties to the earlier path, so the counts add up to n.
        for g in np.argsort(-(shares - counts), kind="stable")[: n - int(counts.sum())]:
            counts[g] += 1
        rng = np.random.default_rng([seed, epoch, 1])  # a stream of its own, apart from packing's
        drawn = []
        for g, count in enumerate(counts):
            members = np.nonzero(groups == g)[0]
            cycles = -(-int(count) // members.size)
            order = np.concatenate([rng.permutation(members) for _ in range(cycles)]) if cycles else members[:0]
            drawn.append(order[:count])
        return np.concatenate(drawn)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
