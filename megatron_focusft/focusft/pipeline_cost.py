"""The cost model of FocuSFT's pipeline units, and the split of layers over stages it implies.

A stage holds `bottom` layers below the fast weights, `adapted` layers with fast weights, and on
the last stage the scored LM head. Per micro-batch, from `LayerCosts` (seconds per layer, or per
head, measured by focusft/pipeline_measure.py), the units of engine/pipeline_plan.py cost:

  inner forward, stage s < k (pass 0 only)  bottom x bottom_forward x (2 with the context objective:
                                            the same layers under the causal mask, no grad)
  inner forward, stage s >= k               adapted x adapted_inner_forward (+ head_inner_forward),
                                            + at step 0 stage k's own bottom layers as above
  inner backward, s >= k                    adapted x adapted_inner_backward (+ head_inner_backward)
  outer forward, s >= k                     adapted x adapted_outer_forward (+ head_outer_forward);
                                            context: + the after-adaptation inner forward, no grad
  outer backward, every stage               bottom x bottom_backward + adapted x adapted_outer_backward
                                            (+ head_outer_backward)

`balance` tries every split Megatron's uneven-stage flags can express
(`--decoder-first/last-pipeline-num-layers`, the middle stages even) and keeps the one whose
simulated iteration (engine.pipeline_plan.simulate) is shortest; `best_split` also weighs the
min-max split of the layers' loads (any count per stage: `--pipeline-model-parallel-layout`).
With virtual stages, `virtual_split` simulates even chunks and `virtual_balance` searches chunk
sizes (a layout of V x P stages). Every split is simulated under its best plan: the wavefront
stride with the shortest iteration (`FocusftPipeline.planned`), which the interleaved schedule
then runs (focusft/interleaved.py plans with the same costs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from megatron_focusft.engine.pipeline import layout_of_counts
from megatron_focusft.engine.pipeline_plan import Timeline, Unit, default_window, focusft_passes, simulate


@dataclass(frozen=True)
class LayerCosts:
    """Seconds per micro-batch of one layer's (or the LM head's) part of each unit kind."""

    bottom_forward: float
    bottom_backward: float
    adapted_inner_forward: float
    adapted_inner_backward: float
    adapted_outer_forward: float
    adapted_outer_backward: float
    head_inner_forward: float
    head_inner_backward: float
    head_outer_forward: float
    head_outer_backward: float


# Relative costs used to plan the unit order when nothing was measured: a backward costs about
# twice its forward; the head is left out (its share depends on the scored tokens).
NOMINAL_COSTS = LayerCosts(1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class StageLayers:
    """What one stage holds: layers below the fast weights, adapted layers, the LM head."""

    bottom: int
    adapted: int
    head: bool


@dataclass(frozen=True)
class FocusftPipeline:
    """A FocuSFT pipeline: its stages, inner steps, objective and micro-batches per iteration; with
    `num_devices`, `stages` are virtual stages in layer order, stage s on device s % num_devices."""

    stages: tuple[StageLayers, ...]
    inner_steps: int
    context_objective: bool
    num_micro_batches: int
    num_devices: int | None = None
    wavefront_stride: int | None = None  # None: the adapted stages' depth

    @property
    def first_adapted_stage(self) -> int:
        return next(s for s, layers in enumerate(self.stages) if layers.adapted)

    @property
    def adapted_depth(self) -> int:
        """How many stages, from the first adapted one up, an inner pass runs on."""
        return len(self.stages) - self.first_adapted_stage

    @property
    def stride(self) -> int:
        """Passes between a micro-batch's consecutive passes (focusft_passes): `wavefront_stride`, by
        default the adapted stages' depth (one micro-batch's update goes down and up meanwhile)."""
        return self.adapted_depth if self.wavefront_stride is None else self.wavefront_stride

    def planned(self, costs: LayerCosts) -> FocusftPipeline:
        """This pipeline with the wavefront stride, of 1 .. 2 x adapted_depth, whose simulated
        iteration under `costs` is shortest (ties: the smaller stride, whose windows hold fewer
        micro-batches). A longer stride lets more micro-batches' inner passes fill the gaps of
        uneven stages, at the cost of a larger window (`window`: the in-flight bound)."""
        best: tuple[float, int] | None = None
        for stride in range(1, 2 * self.adapted_depth + 1):
            makespan = replace(self, wavefront_stride=stride).simulate(costs).makespan
            if best is None or round(makespan, 12) < best[0]:
                best = (round(makespan, 12), stride)
        return replace(self, wavefront_stride=best[1])

    @property
    def window(self) -> list[int]:
        return default_window(len(self.stages), self.stride, self.inner_steps)

    def unit_cost(self, unit: Unit, costs: LayerCosts) -> float:
        """A unit's cost from per-layer costs (module doc)."""
        layers = self.stages[unit.stage]
        causal = 2.0 if self.context_objective else 1.0
        head = layers.head
        if unit.backward:
            if unit.step < self.inner_steps:
                return layers.adapted * costs.adapted_inner_backward + head * costs.head_inner_backward
            return (layers.bottom * costs.bottom_backward + layers.adapted * costs.adapted_outer_backward
                    + head * costs.head_outer_backward)
        if unit.step < self.inner_steps:
            cost = layers.adapted * costs.adapted_inner_forward + head * costs.head_inner_forward
            return cost + (layers.bottom * costs.bottom_forward * causal if unit.step == 0 else 0.0)
        cost = layers.adapted * costs.adapted_outer_forward + head * costs.head_outer_forward
        if self.context_objective:
            cost += layers.adapted * costs.adapted_inner_forward + head * costs.head_inner_forward
        return cost

    def _chain(self) -> list[Unit]:
        """One micro-batch's units in dependency order (focusft_passes: each pass's forwards ascend,
        its backwards descend, and the next pass starts where that one ended)."""
        return [Unit(s, 0, p.step, backward)
                for p in focusft_passes(len(self.stages), self.first_adapted_stage, self.inner_steps, 1, self.stride)
                for backward, stages in ((False, p.forward_stages), (True, reversed(p.backward_stages)))
                for s in stages]

    def iteration_bound(self, costs: LayerCosts) -> float:
        """A lower bound on the iteration of any schedule of these units on these devices.

        One micro-batch's units form a single chain (`_chain`), the same for every micro-batch. A
        device runs one unit at a time, cannot start before the chain's units ahead of its first
        one have run, and after its last unit the rest of that chain must still run:
        iteration >= prefix_d + busy_d + suffix_d for every device d, and >= the whole chain."""
        chain = self._chain()
        seconds = [self.unit_cost(unit, costs) for unit in chain]
        devices = self.num_devices or len(self.stages)
        bound = sum(seconds)
        for d in range(devices):
            mine = [i for i, unit in enumerate(chain) if unit.stage % devices == d]
            busy = self.num_micro_batches * sum(seconds[i] for i in mine)
            bound = max(bound, sum(seconds[:mine[0]]) + busy + sum(seconds[mine[-1] + 1:]))
        return bound

    def efficiency_bound(self, costs: LayerCosts) -> float:
        """The highest pipeline efficiency any schedule can reach: all work / (devices x iteration_bound)."""
        work = self.num_micro_batches * sum(self.unit_cost(unit, costs) for unit in self._chain())
        return work / ((self.num_devices or len(self.stages)) * self.iteration_bound(costs))

    def simulate(self, cost, order=None) -> Timeline:
        """The iteration replayed with `cost(unit)` (a LayerCosts, or a function of the unit); with
        `order`, each stage's units in that order (engine.pipeline_plan.simulate)."""
        unit_cost = (lambda u: self.unit_cost(u, cost)) if isinstance(cost, LayerCosts) else cost
        passes = focusft_passes(len(self.stages), self.first_adapted_stage, self.inner_steps,
                                self.num_micro_batches, self.stride)
        return simulate(passes, len(self.stages), unit_cost, self.window, order, self.num_devices)


def stage_layers(num_layers: int, first_adapted_layer: int, counts: list[int]) -> tuple[StageLayers, ...]:
    """Layer counts per stage (global order) -> what each stage holds; first_adapted_layer is 1-based."""
    stages, start = [], 1
    for s, count in enumerate(counts):
        numbers = range(start, start + count)
        adapted = sum(1 for n in numbers if n >= first_adapted_layer)
        stages.append(StageLayers(count - adapted, adapted, s == len(counts) - 1))
        start += count
    if start != num_layers + 1:
        raise ValueError(f"stage layer counts {counts} do not add up to {num_layers} layers")
    return tuple(stages)


def megatron_splits(num_layers: int, num_stages: int) -> list[tuple[int, int, list[int]]]:
    """Every (first, last, per-stage counts) Megatron's first/last-stage flags can express: the middle
    stages get an equal share of the rest, at least one layer each."""
    if num_stages == 1:
        return [(num_layers, num_layers, [num_layers])]
    splits = []
    for first in range(1, num_layers):
        for last in range(1, num_layers - first + 1):
            rest, middle = num_layers - first - last, num_stages - 2
            if (middle == 0 and rest == 0) or (middle > 0 and rest >= middle and rest % middle == 0):
                counts = [first, *([rest // middle] * middle if middle else []), last]
                splits.append((first, last, counts))
    return splits


@dataclass(frozen=True)
class Balance:
    """The chosen split: Megatron's flag values, each stage's layers and predicted busy seconds
    (with virtual stages: `counts` per virtual stage in layer order, `stage_busy` per device), under
    the plan of wavefront stride `stride` (FocusftPipeline.planned)."""

    first: int
    last: int
    counts: tuple[int, ...]
    stage_busy: tuple[float, ...]
    iteration: float
    stride: int
    virtual_stages: int = 1

    @property
    def efficiency(self) -> float:
        return sum(self.stage_busy) / (len(self.stage_busy) * self.iteration) if self.iteration > 0 else 1.0

    def describe(self) -> str:
        if self.virtual_stages > 1:
            loads = ", ".join(f"device {d}: busy {busy:.3f} s ({100 * busy / self.iteration:.0f}%)"
                              for d, busy in enumerate(self.stage_busy))
        else:
            loads = ", ".join(f"stage {s}: {n} layers, busy {busy:.3f} s ({100 * busy / self.iteration:.0f}%)"
                              for s, (n, busy) in enumerate(zip(self.counts, self.stage_busy)))
        return (f"{self.flags} | predicted iteration {self.iteration:.3f} s, efficiency "
                f"{100 * self.efficiency:.0f}% (wavefront stride {self.stride}) | {loads}")

    @property
    def flags(self) -> str:
        """The flags that give this split: Megatron's first/last-stage flags when the middle stages
        are even, else the layout; with virtual stages, the chunk size when the chunks are even,
        else the layout of V x P stages."""
        if self.virtual_stages > 1 and len(set(self.counts)) == 1:
            return f"--num-layers-per-virtual-pipeline-stage {self.counts[0]}"
        if self.virtual_stages > 1:
            return f"--pipeline-model-parallel-layout {layout_of_counts(self.counts)}"
        if len(set(self.counts[1:-1])) <= 1:
            return f"--decoder-first-pipeline-num-layers {self.first} --decoder-last-pipeline-num-layers {self.last}"
        return f"--pipeline-model-parallel-layout {layout_of_counts(self.counts)}"


def layer_loads(num_layers: int, first_adapted_layer: int, inner_steps: int, context_objective: bool,
                costs: LayerCosts) -> list[float]:
    """Each layer's whole work per micro-batch (all its units' shares), in layer order."""
    causal = 2.0 if context_objective else 1.0
    bottom = causal * costs.bottom_forward + costs.bottom_backward
    adapted = (inner_steps * (costs.adapted_inner_forward + costs.adapted_inner_backward)
               + costs.adapted_outer_forward + costs.adapted_outer_backward
               + (costs.adapted_inner_forward if context_objective else 0.0))
    return [adapted if n >= first_adapted_layer else bottom for n in range(1, num_layers + 1)]


def head_load(inner_steps: int, costs: LayerCosts) -> float:
    """The scored LM head's whole work per micro-batch (all its units' shares), on the last stage."""
    return costs.head_outer_forward + costs.head_outer_backward + inner_steps * (
        costs.head_inner_forward + costs.head_inner_backward)


def min_max_split(loads: list[float], num_stages: int, last_extra: float = 0.0) -> list[int]:
    """Contiguous layer counts (each >= 1) minimising the busiest stage's load (`last_extra`, the
    head, added to the last stage): the classic linear-partition dynamic programme."""
    n = len(loads)
    prefix = [0.0]
    for load in loads:
        prefix.append(prefix[-1] + load)
    inf = float("inf")
    # best[p][i]: the lowest max load of the first i layers on p stages; cut[p][i]: where stage p starts.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for p in range(1, num_stages + 1):
        for i in range(p, n + 1):
            extra = last_extra if (p == num_stages and i == n) else 0.0
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    counts, i = [], n
    for p in range(num_stages, 0, -1):
        counts.append(i - cut[p][i])
        i = cut[p][i]
    return counts[::-1]


def balance(num_layers: int, num_stages: int, first_adapted_layer: int, inner_steps: int, context_objective: bool,
            num_micro_batches: int, costs: LayerCosts, any_counts: bool = False) -> Balance:
    """The split with the shortest simulated iteration among those Megatron's first/last-stage flags
    can express (megatron_splits; ties: the lowest busiest stage); with `any_counts`, the split of
    min_max_split instead (any layer count per stage: `--pipeline-model-parallel-layout`)."""
    splits = megatron_splits(num_layers, num_stages)
    if any_counts:
        counts = min_max_split(layer_loads(num_layers, first_adapted_layer, inner_steps, context_objective, costs),
                               num_stages, head_load(inner_steps, costs))
        splits = [(counts[0], counts[-1], counts)]
    best = None
    for first, last, counts in splits:
        pipeline = FocusftPipeline(stage_layers(num_layers, first_adapted_layer, counts), inner_steps,
                                   context_objective, num_micro_batches).planned(costs)
        timeline = pipeline.simulate(costs)
        busy = tuple(timeline.busy(s) for s in range(num_stages))
        key = (round(timeline.makespan, 12), max(busy))
        if best is None or key < best[0]:
            best = (key, Balance(first, last, tuple(counts), busy, timeline.makespan, pipeline.stride))
    if best is None:
        raise ValueError(f"{num_layers} layers cannot be split over {num_stages} pipeline stages")
    return best[1]


def best_split(num_layers: int, num_stages: int, first_adapted_layer: int, inner_steps: int,
               context_objective: bool, num_micro_batches: int, costs: LayerCosts) -> Balance:
    """`--pipeline-balance auto`'s choice: of balance's best first/last-stage split and its min-max
    split (any counts), the one with the shorter simulated iteration; the first on a tie."""
    args = (num_layers, num_stages, first_adapted_layer, inner_steps, context_objective, num_micro_batches, costs)
    flags, any_counts = balance(*args), balance(*args, any_counts=True)
    return any_counts if any_counts.iteration < flags.iteration else flags


def _simulate_chunks(num_layers: int, counts: Sequence[int], num_devices: int, virtual_stages: int,
                     first_adapted_layer: int, inner_steps: int, context_objective: bool, num_micro_batches: int,
                     costs: LayerCosts) -> Balance:
    """Virtual stages of `counts` layers (layer order, stage v on device v % P), simulated under
    their best plan (FocusftPipeline.planned)."""
    pipeline = FocusftPipeline(stage_layers(num_layers, first_adapted_layer, list(counts)), inner_steps,
                               context_objective, num_micro_batches, num_devices).planned(costs)
    timeline = pipeline.simulate(costs)
    busy = tuple(timeline.device_busy(d) for d in range(num_devices))
    return Balance(counts[0], counts[-1], tuple(counts), busy, timeline.makespan, pipeline.stride, virtual_stages)


def virtual_split(num_layers: int, num_stages: int, virtual_stages: int, first_adapted_layer: int, inner_steps: int,
                  context_objective: bool, num_micro_batches: int, costs: LayerCosts) -> Balance:
    """Megatron's interleaved placement simulated: num_layers / (num_stages x virtual_stages) layers
    per virtual stage, virtual stage v on device v % num_stages (engine/pipeline_plan.py)."""
    chunks = num_stages * virtual_stages
    if virtual_stages < 1 or num_layers % chunks:
        raise ValueError(f"{num_layers} layers do not split evenly into {num_stages} x {virtual_stages} virtual "
                         f"pipeline stages")
    return _simulate_chunks(num_layers, [num_layers // chunks] * chunks, num_stages, virtual_stages,
                            first_adapted_layer, inner_steps, context_objective, num_micro_batches, costs)


def virtual_balance(num_layers: int, num_stages: int, virtual_stages: int, first_adapted_layer: int,
                    inner_steps: int, context_objective: bool, num_micro_batches: int,
                    costs: LayerCosts) -> Balance:
    """`--pipeline-balance auto` with virtual stages: chunk sizes (any count per chunk, a layout of
    V x P stages) found by local search on the simulated iteration. It starts from the even split
    (or, when the layers do not split evenly, the min-max split of their loads over the chunks) and
    moves one layer across one chunk boundary at a time, taking the move that shortens the
    iteration most (ties: the lower busiest device), until none does; so it is never worse than
    its start."""
    chunks = num_stages * virtual_stages
    if virtual_stages < 1 or num_layers < chunks:
        raise ValueError(f"{num_layers} layers cannot fill {num_stages} x {virtual_stages} virtual pipeline stages")
    args = (first_adapted_layer, inner_steps, context_objective, num_micro_batches, costs)
    seen: dict[tuple[int, ...], Balance] = {}

    def simulated(counts: tuple[int, ...]) -> Balance:
        if counts not in seen:
            seen[counts] = _simulate_chunks(num_layers, counts, num_stages, virtual_stages, *args)
        return seen[counts]

    def key(chosen: Balance) -> tuple[float, float]:
        return round(chosen.iteration, 12), max(chosen.stage_busy)

    if num_layers % chunks == 0:
        start = (num_layers // chunks,) * chunks
    else:
        start = tuple(min_max_split(layer_loads(num_layers, first_adapted_layer, inner_steps, context_objective,
                                                costs), chunks, head_load(inner_steps, costs)))
    best = simulated(start)
    while True:
        moves = []
        for boundary in range(chunks - 1):
            for step in (1, -1):
                counts = list(best.counts)
                counts[boundary] += step
                counts[boundary + 1] -= step
                if min(counts) >= 1:
                    moves.append(simulated(tuple(counts)))
        candidate = min(moves, key=key, default=best)
        if key(candidate) >= key(best):
            return best
        best = candidate
