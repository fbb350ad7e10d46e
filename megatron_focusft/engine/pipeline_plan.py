"""Pipeline schedules as passes of schedulable units, planned and replayed from unit costs.

A *pass* is one wave of a micro-batch through the pipeline: a forward over a contiguous range
of stages, then a backward over a (possibly shorter) range, top down. Megatron's 1F1B is one
pass per micro-batch over all stages. FocuSFT (focusft/interleaved.py) gives a micro-batch
`inner_steps` inner passes over the adapted stages k..P-1, then its outer pass. A *unit* is one
pass's forward or backward on one stage.

Dependencies of a unit (all on the same micro-batch):
- forward of pass p on stage s: the forward of p on s-1 (the activation it receives) when s-1
  is in p's forward range; the backward of the micro-batch's previous pass on s when s is in that
  pass's backward range (the fast-weight update that pass computed there);
- backward of p on s: the backward of p on s+1 (the gradient it receives) when s+1 is in p's
  backward range; the latest forward of the micro-batch on s (its activations).

Every stage runs its forwards in pass order and its backwards in pass order (so each p2p link
carries messages in the order both ends expect), backward first when one is ready (1F1B), and
opens a new micro-batch only while fewer than `window[s]` are open on it (opened by its first
forward there, closed by its last backward there): that bounds the activations in flight.
`simulate` replays this rule from unit costs in event order; the per-stage unit orders it yields
are the plan an executor follows (any timing then only adds waiting: the orders come from one
consistent execution, so no stage waits for a message that is never sent).

Virtual pipeline stages (Megatron's interleaved placement): V x P stages on P devices, stage s on
device s mod P. The rule is the same per stage; a device runs one unit at a time, the earliest
ready one of any of its stages; focusft/interleaved.py executes the device orders this yields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pass:
    """One wave of micro-batch `micro_batch` (its `step`-th pass): forward over `forward_stages`
    (ascending), then backward over `backward_stages` (run descending)."""

    micro_batch: int
    step: int
    forward_stages: range
    backward_stages: range


@dataclass(frozen=True, order=True)
class Unit:
    """One pass's forward or backward on one stage."""

    stage: int
    micro_batch: int
    step: int
    backward: bool


@dataclass(frozen=True)
class Timeline:
    """A simulated (or planned) iteration: each stage's units in order, with start and end times."""

    num_stages: int
    order: tuple[tuple[Unit, ...], ...]  # per stage
    start: dict[Unit, float]
    end: dict[Unit, float]
    num_devices: int | None = None  # None: one device per stage; else stage s runs on device s % num_devices

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def busy(self, stage: int) -> float:
        return sum(self.end[u] - self.start[u] for u in self.order[stage])

    def device_order(self, device: int) -> tuple[Unit, ...]:
        """The units of the device's stages in the order it runs them (start time; a stage's own
        order on a tie). Without virtual stages: that stage's order."""
        devices = self.num_devices or self.num_stages
        units = [(self.start[u], self.end[u], s, i, u) for s in range(device, self.num_stages, devices)
                 for i, u in enumerate(self.order[s])]
        return tuple(u for *_, u in sorted(units, key=lambda t: t[:4]))

    def device_busy(self, device: int) -> float:
        devices = self.num_devices or self.num_stages
        return sum(self.busy(s) for s in range(device, self.num_stages, devices))

    @property
    def efficiency(self) -> float:
        """Sum of the devices' busy time / (devices x iteration time)."""
        total = self.makespan * (self.num_devices or self.num_stages)
        return sum(self.busy(s) for s in range(self.num_stages)) / total if total > 0 else 1.0

    @property
    def bubble_fraction(self) -> float:
        return 1.0 - self.efficiency


def one_f_one_b_passes(num_stages: int, num_micro_batches: int) -> list[Pass]:
    """Megatron's non-interleaved 1F1B: one pass per micro-batch over every stage."""
    stages = range(num_stages)
    return [Pass(m, 0, stages, stages) for m in range(num_micro_batches)]


def focusft_passes(num_stages: int, first_adapted_stage: int, inner_steps: int, num_micro_batches: int,
                   stride: int) -> list[Pass]:
    """FocuSFT's passes in priority order (focusft/interleaved.py).

    Inner pass j of micro-batch m: forward over stages k..P-1 (pass 0 over 0..P-1: the stages
    below k run their outer forward there, once, and send stage k the input it keeps for every
    inner step), backward over P-1..k (fast-weight gradients). Outer pass: forward over k..P-1,
    backward over P-1..0. Priority: a wavefront, pass (m, j) at position m + j x stride (the
    older micro-batch's pass first on a tie), so a micro-batch's consecutive passes are `stride`
    passes apart and the next micro-batches' passes fill the gap: with stride >= P - k a stage has
    other work while one micro-batch's update travels down to stage k and back up, and the stages
    below k run later micro-batches' outer forwards and earlier ones' outer backwards meanwhile.
    """
    if not 0 <= first_adapted_stage < num_stages:
        raise ValueError(f"first_adapted_stage must be in [0, {num_stages}), got {first_adapted_stage}")
    if inner_steps < 1 or num_micro_batches < 1 or stride < 1:
        raise ValueError(f"inner_steps, num_micro_batches and stride must be >= 1, got {inner_steps}, "
                         f"{num_micro_batches}, {stride}")
    k, every = first_adapted_stage, range(num_stages)
    passes = []
    for m in range(num_micro_batches):
        passes += [Pass(m, step, range(0 if step == 0 else k, num_stages), range(k, num_stages))
                   for step in range(inner_steps)]
        passes.append(Pass(m, inner_steps, range(k, num_stages), every))
    return sorted(passes, key=lambda p: (p.micro_batch + p.step * stride, -p.step))


def default_window(num_stages: int, stride: int = 1, inner_steps: int = 0) -> list[int]:
    """Open micro-batches allowed per stage: a micro-batch's passes span stride x (inner_steps + 1)
    positions of the priority order, plus 1F1B's depth P - 1 - s (stride 1, no inner steps: exactly
    1F1B's bound P - s)."""
    return [stride * (inner_steps + 1) + num_stages - 1 - s for s in range(num_stages)]


def simulate(passes: Sequence[Pass], num_stages: int, cost: Callable[[Unit], float],
             window: Sequence[int], order: Sequence[Sequence[Unit]] | None = None,
             num_devices: int | None = None) -> Timeline:
    """Replay the module's rule from unit costs (seconds, or any unit); communication is free.
    With `order` (each stage's units, e.g. a plan an executor ran), each stage runs exactly that
    order instead, as early as its dependencies allow. With `num_devices` (it divides num_stages),
    the stages are virtual: stage s shares device s % num_devices with the others there.

    Raises RuntimeError when the rule cannot progress (a window too small for the passes' order).
    """
    by_key = {(p.micro_batch, p.step): p for p in passes}
    steps_of: dict[int, list[int]] = {}
    for p in passes:
        steps_of.setdefault(p.micro_batch, []).append(p.step)
    forwards = [[Unit(s, p.micro_batch, p.step, False) for p in passes if s in p.forward_stages]
                for s in range(num_stages)]
    backwards = [[Unit(s, p.micro_batch, p.step, True) for p in passes if s in p.backward_stages]
                 for s in range(num_stages)]
    last_backward = {}  # (stage, micro-batch) -> the unit that closes it there
    for s in range(num_stages):
        for unit in backwards[s]:
            last_backward[(s, unit.micro_batch)] = unit

    def deps(unit: Unit) -> list[Unit]:
        p = by_key[(unit.micro_batch, unit.step)]
        earlier = [q for q in sorted(steps_of[unit.micro_batch]) if q < unit.step]
        if not unit.backward:
            out = [Unit(unit.stage - 1, unit.micro_batch, unit.step, False)] if unit.stage - 1 in p.forward_stages else []
            if earlier and unit.stage in by_key[(unit.micro_batch, earlier[-1])].backward_stages:
                out.append(Unit(unit.stage, unit.micro_batch, earlier[-1], True))
            return out
        anchor = max(q for q in (*earlier, unit.step) if unit.stage in by_key[(unit.micro_batch, q)].forward_stages)
        out = [Unit(unit.stage, unit.micro_batch, anchor, False)]
        if unit.stage + 1 in p.backward_stages:
            out.append(Unit(unit.stage + 1, unit.micro_batch, unit.step, True))
        return out

    start: dict[Unit, float] = {}
    end: dict[Unit, float] = {}
    ran: list[list[Unit]] = [[] for _ in range(num_stages)]
    next_f, next_b = [0] * num_stages, [0] * num_stages
    if num_devices is not None and (num_devices < 1 or num_stages % num_devices):
        raise ValueError(f"num_devices must divide num_stages ({num_stages}), got {num_devices}")
    device = [s % (num_devices or num_stages) for s in range(num_stages)]
    free = [0.0] * (num_devices or num_stages)  # when each device is next free
    opened: list[set[int]] = [set() for _ in range(num_stages)]
    total = sum(map(len, forwards)) + sum(map(len, backwards))

    def ready_at(unit: Unit) -> float | None:
        times = [end.get(d) for d in deps(unit)]
        return None if any(t is None for t in times) else max([free[device[unit.stage]], *times])

    while len(end) < total:
        best: tuple[float, int, Unit] | None = None
        for s in range(num_stages):
            candidates = []
            if order is not None:
                done = next_f[s] + next_b[s]
                if done < len(order[s]):
                    t = ready_at(order[s][done])
                    if t is not None:
                        candidates.append((t, 0, order[s][done]))
            elif next_b[s] < len(backwards[s]):
                t = ready_at(backwards[s][next_b[s]])
                if t is not None:
                    candidates.append((t, 0, backwards[s][next_b[s]]))  # 0: backward first on a tie
            if order is None and next_f[s] < len(forwards[s]):
                unit = forwards[s][next_f[s]]
                if unit.micro_batch in opened[s] or len(opened[s]) < window[s]:
                    t = ready_at(unit)
                    if t is not None:
                        candidates.append((t, 1, unit))
            if not candidates:
                continue
            t, _, unit = min(candidates)
            if best is None or (t, unit.backward is False) < (best[0], best[2].backward is False):
                best = (t, s, unit)
        if best is None:
            raise RuntimeError("the schedule cannot progress: every stage waits (window too small for the pass order)")
        t, s, unit = best
        start[unit], end[unit] = t, t + cost(unit)
        free[device[s]] = end[unit]
        ran[s].append(unit)
        if unit.backward:
            next_b[s] += 1
            if last_backward[(s, unit.micro_batch)] == unit:
                opened[s].discard(unit.micro_batch)
        else:
            next_f[s] += 1
            opened[s].add(unit.micro_batch)
    return Timeline(num_stages, tuple(tuple(units) for units in ran), start, end, num_devices)
