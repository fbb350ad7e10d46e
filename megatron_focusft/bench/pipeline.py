"""`focusft bench pipeline`: FocuSFT's pipeline schedules side by side, and the simulator's view.

Launched with torchrun over P ranks (PP = P, TP = CP = 1, one rank per stage). One run builds:
- "sequential, even split": Megatron's 1F1B with the inner loop in the last stage's forward (or in
  schedule calls of its own, if the adapted layers span stages), layers split evenly (today's default);
- "sequential, balanced split" and "interleaved, balanced split": the split `best_split` picks from the
  layer costs measured on the first model (focusft/pipeline_measure.py), under each schedule;
- "interleaved, V virtual stages per device" (`--virtual-stages`): V model chunks per rank, even
  chunks (Megatron's interleaved placement: stage s on rank s mod P), and ", balanced": chunk sizes
  from `virtual_balance` on the same measured costs (a layout of V x P stages).
Their optimizer steps on the same micro-batches alternate, repetition by repetition, so a machine
shared with other work disturbs them alike. Per schedule: the median step time, tokens/s, every
stage's busy share ((forward + backward compute) / step time, Megatron's schedule timers), pipeline
efficiency (their mean) and bubble fraction (1 - efficiency).

The interleaved runs plan their unit order from the layer costs measured on the first model, as
`--pipeline-balance auto` does in training (FocusftPipeline.planned: the best wavefront stride).
The simulator (engine/pipeline_plan.py): each interleaved run's plan replayed with its measured
unit times (mean per stage and unit kind) gives its predicted forward-backward time, against the
measured one; the
measured layer costs give the balanced split and simulated efficiency at other PP sizes, also
with virtual pipeline stages (even and balanced chunks), each with the efficiency no schedule of
its units can exceed (`FocusftPipeline.efficiency_bound`; also on the interleaved runs).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_focusft.bench.step import _batch


@dataclass(frozen=True)
class PipelineBenchConfig:
    preset: str = "small"
    seq_length: int = 256
    micro_batch_size: int = 2
    num_micro_batches: int = 8
    inner_steps: int = 2
    inner_objective: str = "response"
    iters: int = 3
    warmup: int = 1
    simulate_stages: tuple[int, ...] = (4, 8)
    virtual_stages: tuple[int, ...] = (2,)
    simulate_virtual_stages: tuple[int, ...] = (2, 4)
    simulate_micro_batches: int = 16
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("seq_length", "micro_batch_size", "num_micro_batches", "inner_steps", "iters",
                     "simulate_micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def _unit_kind(unit, pipeline) -> str:
    if unit.backward:
        return "inner_backward" if unit.step < pipeline.inner_steps else "outer_backward"
    if unit.step == pipeline.inner_steps:
        return "outer_forward"
    return "inner_forward_first" if unit.step == 0 else "inner_forward"


def run_bench_pipeline(config: PipelineBenchConfig, as_json: bool) -> list[dict[str, Any]]:
    """The records (module doc); parallel state must be initialised with PP = world size."""
    from megatron.core import parallel_state

    from megatron_focusft.engine.pipeline import (
        collect_stage_times,
        layout_of_counts,
        num_pipeline_stages,
        schedule_timers,
        stage_layer_numbers,
    )
    from megatron_focusft.engine.setup import ModelSetup, OptimizerSetup, build_model, build_optimizer
    from megatron_focusft.engine.train_step import train_step
    from megatron_focusft.fastweights.config import FastWeightConfig, adapted_layer_numbers
    from megatron_focusft.fastweights.linear import fast_weight_layout
    from megatron_focusft.focusft import FocusftConfig, SeededFastWeights, make_focusft_forward_step
    from megatron_focusft.focusft.interleaved import focusft_pipeline
    from megatron_focusft.focusft.pipeline_cost import (
        FocusftPipeline,
        LayerCosts,
        balance,
        best_split,
        stage_layers,
        virtual_balance,
        virtual_split,
    )
    from megatron_focusft.focusft.pipeline_measure import measure_layer_costs
    from megatron_focusft.models.presets import get_preset

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp < 2 or dist.get_world_size() != pp:
        raise ValueError(f"focusft bench pipeline runs one rank per pipeline stage under torchrun with >= 2 "
                         f"ranks (e.g. torchrun --nproc-per-node 2); this world has {dist.get_world_size()} "
                         f"rank(s), PP {pp}")
    rank0 = dist.get_rank() == 0
    preset = get_preset(config.preset)
    fast = FastWeightConfig()
    first_adapted = adapted_layer_numbers(preset.num_layers, fast.layer_fraction)[0]
    context = config.inner_objective == "context"
    batches = [_batch(config.seq_length, config.micro_batch_size, preset.vocab_size, torch.device("cpu"),
                      config.seed + m) for m in range(config.num_micro_batches)]

    def build(layout: str | None, schedule: str, virtual: int | None = None, plan_costs: LayerCosts | None = None):
        torch.manual_seed(config.seed)
        setup = ModelSetup(preset=config.preset, pipeline_model_parallel_size=pp, pipeline_model_parallel_layout=layout,
                           virtual_pipeline_model_parallel_size=virtual, fast_weights=fast)
        # Megatron reads a layout's virtual stages through the global virtual size (engine/setup.py).
        parallel_state.set_virtual_pipeline_model_parallel_world_size(virtual if layout else None)
        try:
            built = [build_model(setup, vp_stage=v) for v in range(virtual)] if virtual else [build_model(setup)]
        finally:
            parallel_state.set_virtual_pipeline_model_parallel_world_size(None)
        chunks, model_config = [chunk for chunk, _ in built], built[0][1]
        model_config.timers = schedule_timers()  # the schedules time with the first chunk's config
        focusft = FocusftConfig(inner_steps=config.inner_steps, inner_objective=config.inner_objective,
                                pipeline_schedule=schedule, fast_weights=fast)
        source = SeededFastWeights(fast_weight_layout(model_config, fast), fast.rank, config.seed)
        return (chunks, model_config, build_optimizer(chunks, OptimizerSetup()),
                make_focusft_forward_step(focusft, source, plan_costs))

    even = build(None, "sequential")
    probe_source = SeededFastWeights(fast_weight_layout(even[1], fast), fast.rank, config.seed + 1)
    costs = measure_layer_costs([even[0][0].module], batches[0], even[3].config, probe_source(batches[0]))
    chosen = best_split(preset.num_layers, pp, first_adapted, config.inner_steps, context, config.num_micro_batches,
                        costs)
    balanced = layout_of_counts(chosen.counts)
    # The interleaved runs plan their order from the measured costs, as --pipeline-balance auto does.
    runs = {"sequential, even split": even, "sequential, balanced split": build(balanced, "sequential"),
            "interleaved, balanced split": build(balanced, "interleaved", plan_costs=costs)}
    virtual_chosen = {}
    for virtual in config.virtual_stages:
        if preset.num_layers % (pp * virtual) == 0:
            runs[f"interleaved, {virtual} virtual stages per device"] = build(None, "interleaved", virtual, costs)
        if preset.num_layers >= pp * virtual:
            virtual_chosen[virtual] = virtual_balance(preset.num_layers, pp, virtual, first_adapted, config.inner_steps,
                                                      context, config.num_micro_batches, costs)
            runs[f"interleaved, {virtual} virtual stages per device, balanced"] = build(
                layout_of_counts(virtual_chosen[virtual].counts), "interleaved", virtual, costs)
    step_s: dict[str, list[float]] = defaultdict(list)
    busy: dict[str, list[list[float]]] = defaultdict(list)
    fb_s: dict[str, list[float]] = defaultdict(list)
    unit_s: dict[str, dict[tuple[int, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    pipelines = {name: focusft_pipeline(run[1], run[3].config, config.num_micro_batches)
                 for name, run in runs.items() if run[3].interleaved(run[0][0])}
    for rep in range(config.warmup + config.iters):
        for name, (chunks, model_config, optimizer, forward_step) in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            train_step(chunks, optimizer, batches, forward_step)
            dt = time.perf_counter() - t0
            dt = max(_all(dt))  # the step ends when its slowest stage does
            times = collect_stage_times(model_config.timers)
            if rep < config.warmup:
                continue
            step_s[name].append(dt)
            busy[name].append([(t.forward + t.backward) / dt for t in times])
            fb_s[name].append(max(t.total for t in times))
            if name in pipelines:
                for record in forward_step.forward_backward_func(chunks[0]).records:
                    unit_s[name][(record.unit.stage, _unit_kind(record.unit, pipelines[name]))].append(record.seconds)

    def efficiency_bound(counts: list[int], devices: int, virtual: int | None, micro_batches: int) -> float:
        """The best efficiency any schedule of these units could reach (FocusftPipeline.efficiency_bound)."""
        pipeline = FocusftPipeline(stage_layers(preset.num_layers, first_adapted, counts), config.inner_steps,
                                   context, micro_batches, devices if virtual else None)
        return pipeline.efficiency_bound(costs)

    tokens = config.num_micro_batches * config.micro_batch_size * config.seq_length
    base = statistics.median(step_s["sequential, even split"])
    records = []
    for name in runs:
        shares = [statistics.mean(col) for col in zip(*busy[name])]
        median = statistics.median(step_s[name])
        records.append({
            "schedule": name, "stages": pp, "preset": config.preset, "micro_batches": config.num_micro_batches,
            "micro_batch_size": config.micro_batch_size, "seq_length": config.seq_length,
            "inner_steps": config.inner_steps, "inner_objective": config.inner_objective,
            "layers_per_stage": [len(stage_layer_numbers(runs[name][1], s))
                                 for s in range(num_pipeline_stages(runs[name][1]))],
            "step_s": median, "tokens_per_s": tokens / median, "speedup_vs_sequential_even": base / median,
            "stage_busy_share": shares, "pipeline_efficiency": statistics.mean(shares),
            "bubble_fraction": 1 - statistics.mean(shares), "forward_backward_s": statistics.median(fb_s[name]),
        })
        if name in pipelines:
            records[-1]["efficiency_bound"] = efficiency_bound(
                records[-1]["layers_per_stage"], pp, runs[name][1].virtual_pipeline_model_parallel_size,
                config.num_micro_batches)
    for name, pipeline in pipelines.items():
        measured_units = _gather_units(unit_s[name])
        # The order the executor ran (planned from the measured layer costs), replayed with the
        # measured unit times (with virtual stages each stage keeps its order; a device runs its
        # earliest ready unit).
        chunks, model_config, _, forward_step = runs[name]
        planned = forward_step.forward_backward_func(chunks[0]).plan(model_config, config.num_micro_batches)
        timeline = pipeline.simulate(lambda u: measured_units[(u.stage, _unit_kind(u, pipeline))], planned.order)
        measured_fb = statistics.median(fb_s[name])
        records.append({"simulator": name, "stages": pp, "predicted_forward_backward_s": timeline.makespan,
                        "measured_forward_backward_s": measured_fb,
                        "predicted_over_measured": timeline.makespan / measured_fb,
                        "measured_unit_busy_s": [timeline.device_busy(d) for d in range(pp)]})
    for stages in config.simulate_stages:
        if stages > preset.num_layers:
            continue
        for any_counts in (False, True):
            sim = balance(preset.num_layers, stages, first_adapted, config.inner_steps, context,
                          config.simulate_micro_batches, costs, any_counts=any_counts)
            records.append({"simulated_stages": stages, "micro_batches": config.simulate_micro_batches,
                            "split": "any layer count per stage" if any_counts else "first/last-stage flags",
                            "layers_per_stage": list(sim.counts), "wavefront_stride": sim.stride,
                            "predicted_efficiency": sim.efficiency,
                            "efficiency_bound": efficiency_bound(list(sim.counts), stages, None,
                                                                 config.simulate_micro_batches),
                            "predicted_stage_busy_s": list(sim.stage_busy), "predicted_iteration_s": sim.iteration})
        for virtual in config.simulate_virtual_stages:
            sims = {}
            if preset.num_layers % (stages * virtual) == 0:
                sims["even"] = virtual_split(preset.num_layers, stages, virtual, first_adapted, config.inner_steps,
                                             context, config.simulate_micro_batches, costs)
            if preset.num_layers >= stages * virtual:
                sims["balanced"] = virtual_balance(preset.num_layers, stages, virtual, first_adapted,
                                                   config.inner_steps, context, config.simulate_micro_batches, costs)
            for kind, sim in sims.items():
                records.append({"simulated_stages": stages, "micro_batches": config.simulate_micro_batches,
                                "split": f"{virtual} virtual stages per device, {kind}", "virtual_stages": virtual,
                                "layers_per_stage": list(sim.counts), "wavefront_stride": sim.stride,
                                "predicted_efficiency": sim.efficiency,
                                "efficiency_bound": efficiency_bound(list(sim.counts), stages, virtual,
                                                                     config.simulate_micro_batches),
                                "predicted_stage_busy_s": list(sim.stage_busy), "predicted_iteration_s": sim.iteration})
    records.append({"layer_costs_s": costs.__dict__, "balanced_split": chosen.describe(),
                    "virtual_balanced_splits": {str(v): b.describe() for v, b in virtual_chosen.items()}})
    if rank0:
        for record in records:
            print(json.dumps(record) if as_json else _line(record), flush=True)
    return records


def _all(value: float) -> list[float]:
    gathered: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _gather_units(unit_s: dict[tuple[int, str], list[float]]) -> dict[tuple[int, str], float]:
    """(stage, unit kind) -> mean seconds, from every rank's records (the slowest TP rank's view)."""
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, {key: statistics.mean(v) for key, v in unit_s.items()})
    merged: dict[tuple[int, str], float] = {}
    for part in gathered:
        for key, value in part.items():
            merged[key] = max(merged.get(key, 0.0), value)
    return merged


def _line(record: dict[str, Any]) -> str:
    if "schedule" in record:
        shares = " / ".join(f"{100 * s:.0f}%" for s in record["stage_busy_share"])
        return (f"{record['schedule']}: {record['tokens_per_s']:,.0f} tok/s ({record['speedup_vs_sequential_even']:.2f}x),"
                f" busy {shares}, efficiency {100 * record['pipeline_efficiency']:.0f}%, layers "
                f"{record['layers_per_stage']}")
    if "simulator" in record:
        return (f"simulator ({record['simulator']}), PP {record['stages']}: predicted {record['predicted_forward_backward_s']:.3f} s vs "
                f"measured {record['measured_forward_backward_s']:.3f} s ({record['predicted_over_measured']:.2f}x)")
    if "simulated_stages" in record:
        return (f"simulated PP {record['simulated_stages']}, {record['micro_batches']} micro-batches, "
                f"{record['split']}: efficiency {100 * record['predicted_efficiency']:.0f}% (any schedule: <= "
                f"{100 * record['efficiency_bound']:.0f}%), layers {record['layers_per_stage']}")
    virtual = "".join(f"; {v} virtual stages per device, balanced: {line}"
                      for v, line in record["virtual_balanced_splits"].items())
    return f"layer costs (s): {record['layer_costs_s']}; balanced: {record['balanced_split']}{virtual}"
