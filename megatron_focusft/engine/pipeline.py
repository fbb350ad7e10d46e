"""Pipeline parallelism for the bilevel step: where the fast weights sit, and per-stage busy time.

With FocuSFT's interleaved schedule (the default, focusft/interleaved.py) every micro-batch's inner
steps and outer pass are units of one schedule, wherever the adapted layers sit. With the
sequential one, the schedule is Megatron's own 1F1B
(`forward_backward_pipelining_without_interleaving`), in one of two arrangements, chosen by where
the adapted layers sit (`fast_weights_span_stages`):
- all on the last stage: the earlier stages run their layers once per micro-batch with no
  knowledge of the method, and the last stage runs, inside its forward of micro-batch m, its own
  bottom layers, the inner loop and the outer pass (focusft/step.py). In the 1F1B steady state
  the earlier stages meanwhile run forwards and backwards of other micro-batches, so the inner
  loop of one micro-batch overlaps outer work of others. The last stage's forward costs about
  (1 + inner_steps x (forward + backward)) passes over the adapted layers;
- on several stages: each inner step is a schedule call of its own over all micro-batches, in
  which only the adapted stages do backward work, then the outer call (focusft/pipelined_inner.py).
  This spreads the inner loop's work over the stages that hold adapted layers.
Uneven stages (`num_layers_in_first/last_pipeline_stage`, Megatron's
`--decoder-first/last-pipeline-num-layers`, or any layer count per stage with Megatron's
`--pipeline-model-parallel-layout`, `layout_stage_counts`) move layers between stages;
`collect_stage_times` reports each stage's compute and idle time from the schedule's own timers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.timers import Timers
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.fastweights.config import FastWeightConfig, adapted_layer_numbers
from megatron_focusft.models.spec import stage_layer_span

# Timer names: Megatron's schedules time 'forward-compute', 'backward-compute' and the whole
# 'forward-backward'; the FocuSFT step adds 'inner-loop' (inside 'forward-compute').
FORWARD, BACKWARD, TOTAL, INNER = "forward-compute", "backward-compute", "forward-backward", "inner-loop"
# The log level each is created with (a timer asked for with another level is an error).
_LOG_LEVELS = {FORWARD: 2, BACKWARD: 2, INNER: 2, TOTAL: 1}


def layout_stage_counts(layout: str, pipeline_size: int) -> list[int]:
    """Decoder layers per stage, in layer order, of Megatron's pipeline layout string (`E` the
    embedding, `t` a decoder layer, `L` the loss, `|` between stages, `(...)*n` and `t*n` repeat:
    "Et*5|t*3L"). A layout of V x P stages gives V virtual stages per rank (Megatron's reading:
    stage s on rank s mod P), so its list has V x P counts.

    ValueError unless its stage count is a multiple of `pipeline_size`, each stage holds a decoder
    layer, the embedding comes first, the loss last and nothing else.
    """
    where = f"--pipeline-model-parallel-layout {layout!r}"
    try:
        stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    except AssertionError as error:
        raise ValueError(f"{where}: {error}") from None
    if len(stages) % pipeline_size:
        raise ValueError(f"{where} has {len(stages)} stages, not a multiple of --pipeline-model-parallel-size "
                         f"{pipeline_size} (V x P stages give V virtual stages per rank)")
    flat = [kind for stage in stages for kind in stage]
    extra = set(flat) - {LayerType.embedding, LayerType.decoder, LayerType.loss}
    if extra or flat.count(LayerType.embedding) != 1 or flat.count(LayerType.loss) != 1 \
            or flat[0] != LayerType.embedding or flat[-1] != LayerType.loss:
        raise ValueError(f"{where}: the layout must be E, then decoder layers t, then L (embedding first, loss "
                         f"last, once each)")
    counts = [stage.count(LayerType.decoder) for stage in stages]
    if min(counts) < 1:
        raise ValueError(f"{where}: stage {counts.index(0)} holds no decoder layer")
    return counts


def layout_virtual_stages(layout: str, pipeline_size: int) -> int | None:
    """Virtual stages per rank that a valid layout implies: V for V x P stages with V > 1, else None."""
    virtual = len(layout_stage_counts(layout, pipeline_size)) // pipeline_size
    return virtual if virtual > 1 else None


def layout_of_counts(counts: Sequence[int]) -> str:
    """The pipeline layout string with `counts[s]` decoder layers on stage s, in layer order
    (layout_stage_counts' inverse; V x P counts for virtual stages)."""
    return "E" + "|".join("t" * n for n in counts) + "L"


def num_pipeline_stages(config: TransformerConfig) -> int:
    """Pipeline stages in layer order: P, or V x P with V virtual stages (model chunks) per rank."""
    return config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)


def stage_of_chunk(config: TransformerConfig, pp_rank: int, vp_stage: int | None) -> int:
    """The stage (layer order) of rank `pp_rank`'s model chunk `vp_stage`: vp_stage x P + pp_rank
    (Megatron's interleaved placement: stage s on rank s mod P)."""
    return (vp_stage or 0) * config.pipeline_model_parallel_size + pp_rank


def stage_layer_numbers(config: TransformerConfig, stage: int) -> range:
    """Global 1-based layer numbers held by pipeline stage `stage` (layer order, num_pipeline_stages
    of them; Megatron's placement: uneven first/last stages, layouts and virtual stages included)."""
    pp = config.pipeline_model_parallel_size
    vp_stage = stage // pp if config.virtual_pipeline_model_parallel_size else None
    offset, count = stage_layer_span(config, vp_stage=vp_stage, pp_rank=stage % pp)
    return range(offset + 1, offset + 1 + count)


def first_adapted_stage(config: TransformerConfig, fast_weights: FastWeightConfig) -> int:
    """The pipeline stage (layer order) holding the lowest adapted layer (the adapted layers are the top ones)."""
    first = adapted_layer_numbers(config.num_layers, fast_weights.layer_fraction)[0]
    return next(s for s in range(num_pipeline_stages(config)) if first <= stage_layer_numbers(config, s)[-1])


def fast_weights_span_stages(config: TransformerConfig, fast_weights: FastWeightConfig) -> bool:
    """Whether some adapted layer sits on a pipeline stage before the last.

    With the sequential schedule: if not, the inner loop runs inside the last stage's forward
    (focusft/step.py); if so, in schedule calls of its own before the outer one
    (focusft/pipelined_inner.py).
    """
    stages = num_pipeline_stages(config)
    return stages > 1 and first_adapted_stage(config, fast_weights) < stages - 1


def schedule_timers() -> Timers:
    """Megatron timers that Megatron's schedules fill when set as `TransformerConfig.timers`."""
    return Timers(log_level=2, log_option="max")


@dataclass(frozen=True)
class StageTime:
    """Seconds one pipeline stage spent since the last collection (max over its ranks).

    inner is the time in the inner loop: inside forward when it runs in the last stage's forward;
    with the sequential schedule and adapted layers spanning stages, the wall time of its own
    schedule calls; with the interleaved schedule (focusft/interleaved.py), the compute of the
    inner units. In the last two cases that compute is also counted in forward and backward. idle = total - forward - backward is waiting for
    neighbours (bubbles and transfers).
    """

    stage: int
    forward: float
    backward: float
    inner: float
    total: float

    @property
    def busy_fraction(self) -> float:
        return (self.forward + self.backward) / self.total if self.total > 0 else 0.0

    @property
    def idle(self) -> float:
        return max(self.total - self.forward - self.backward, 0.0)


def collect_stage_times(timers: Timers) -> list[StageTime]:
    """Every stage's times, on every rank (an all-gather over the world); resets the timers.

    A collective: every rank must call it at the same point.
    """
    names = (FORWARD, BACKWARD, INNER, TOTAL)
    local = [float(parallel_state.get_pipeline_model_parallel_rank())]
    local += [timers(name, _LOG_LEVELS[name]).elapsed(reset=True) for name in names]
    gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    table = torch.tensor(gathered, dtype=torch.float64)
    stages = []
    for stage in range(parallel_state.get_pipeline_model_parallel_world_size()):
        rows = table[table[:, 0] == stage, 1:].max(dim=0).values.tolist()
        forward, backward, inner, total = rows
        stages.append(StageTime(stage, forward, backward, inner, total))
    return stages


def format_stage_times(stages: list[StageTime]) -> str:
    """One console line: each stage's busy share and compute split."""
    return " | ".join(f"stage {t.stage}: busy {100 * t.busy_fraction:.0f}% (fwd {t.forward:.2f} s"
                      f"{f', inner {t.inner:.2f} s' if t.inner else ''}, bwd {t.backward:.2f} s)" for t in stages)
