"""The pipeline-parity harness: one forward/backward through a schedule at any TP x PP x CP, on every
rank of a gloo pool, against the PP = 1, TP = 1 run within its noise band.

Every rank builds the whole tiny model at its TP size without PP (the same weights as TP = 1),
then its pipeline stage, and copies its layers' weights over; the schedule runs three packed
micro-batches (warm-up, steady state and cool-down all occur) with DDP and per-token loss
averaging. Compared with the PP = 1, TP = 1 run: the loss of every micro-batch (last stage),
every slow-weight gradient (main_grad after finalize_model_grads, each stage's own layers,
unsharded over TP) and, for FocuSFT, the inner losses, skipped steps and update norm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re

import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch
from megatron_focusft.fastweights.config import FastWeightConfig
from megatron_focusft.parallel.tensor_parallel import unshard
from tests.helpers.batches import random_batch
from tests.helpers.distributed import init_model_parallel
from tests.helpers.model import fast_weights_with_random_b
from tests.helpers.noise_band import assert_in_band, perturb_by_one_ulp, with_step_band

FAST = FastWeightConfig(rank=8, alpha=16.0)  # tiny: 4 layers, layers 3 and 4 adapted
VOCAB = 512
# Gradients are summed in another order (over DP in the reference, TP splits matmuls), so parity
# is at fp32 noise: within the one-process run's own noise band (tests/helpers/noise_band.py).
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def pipeline_batches(kind: str) -> list[SegmentBatch]:
    return [random_batch(2, 40, VOCAB, seed=seed, kind=kind, max_doc=20) for seed in (41, 42, 43)]


# One inner step at lr 1e30 with no update-norm bound: the step itself is finite (the inner guard
# passes it) but the outer pass overflows, so the guard's outer check resets every adapted sample.
GUARD_RERUN = {"inner_steps": 1, "inner_lr": 1e30, "max_update_norm": math.inf}


def guard_batches() -> list[SegmentBatch]:
    """pipeline_batches("focusft") with each document's last token made a response token: then every
    adapted sample has a scored token, which the outer check needs to see its overflow (with the
    context objective a sample without one keeps its absurd fast weights, and its overflowing
    values reach the other samples of its row through masked attention, 0 x inf, in one process as
    under PP)."""
    guarded = []
    for batch in pipeline_batches("focusft"):
        response = batch.response.clone()
        for row in range(batch.doc_ids.shape[0]):
            for doc in batch.doc_ids[row].unique():
                if doc >= 0:
                    response[row, (batch.doc_ids[row] == doc).nonzero()[-1]] = 1
        guarded.append(make_batch(batch.tokens, batch.doc_ids, response))
    return guarded


def _renumber(name: str, offset: int) -> str:
    """A stage-local parameter name -> the whole model's (layer index + offset)."""
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


# --- worker functions (every rank of a gloo pool) -------------------------------------------


def run_step(tp: int, pp: int, batches: list[SegmentBatch], focusft: dict | None, last_stage_layers: int | None = None,
         timed: bool = False, sp: bool = False, cp: int = 1, layer_fraction: float | None = None,
         perturb_seed: int | None = None, schedule: str = "sequential", layout: str | None = None,
         virtual: int | None = None, num_layers: int = 4,
         replica_batches: list[list[SegmentBatch]] | None = None, plan_costs=None) -> dict:
    """One forward/backward through the forward step's schedule (FocuSFT's `schedule` under PP,
    else Megatron's; engine.train_step.forward_backward, re-runs included); this rank's logs and
    main_grads (with `perturb_seed`: from weights moved by one ulp, for the noise band); `layout`:
    the stages' layers as a pipeline layout string instead; `virtual`: that many model chunks per
    rank (virtual stages: FocuSFT's interleaved schedule, or Megatron's interleaved 1F1B for SFT);
    `num_layers`: the tiny model with that many layers; `replica_batches`: data-parallel replica r
    runs replica_batches[r % len] instead of `batches`; `plan_costs`: the LayerCosts FocuSFT's
    interleaved schedule plans from (its units, in the order this rank ran them, come back)."""
    from megatron.core import parallel_state

    from megatron_focusft.data.cp_split import split_batch_for_cp
    from megatron_focusft.engine.pipeline import (
        collect_stage_times,
        schedule_timers,
        stage_layer_numbers,
        stage_of_chunk,
    )
    from megatron_focusft.engine.setup import ModelSetup, build_model
    from megatron_focusft.engine.train_step import forward_backward
    from megatron_focusft.focusft import FocusftConfig, make_focusft_forward_step
    from megatron_focusft.models.presets import get_preset, with_layers
    from megatron_focusft.sft import sft_forward_step

    fast = None
    if focusft is not None:
        fast = FAST if layer_fraction is None else dataclasses.replace(FAST, layer_fraction=layer_fraction)
    preset = with_layers(get_preset("tiny"), num_layers)
    init_model_parallel(tp=tp, seed=21)
    whole, _ = build_model(ModelSetup(preset=preset, tensor_model_parallel_size=tp, sequence_parallel=sp,
                                      fast_weights=fast))
    weights = whole.module.state_dict()
    init_model_parallel(tp=tp, pp=pp, cp=cp, seed=99, vp=virtual)  # another seed: the stage's own init is overwritten
    dp_rank = parallel_state.get_data_parallel_rank()
    if replica_batches is not None:
        batches = replica_batches[dp_rank % len(replica_batches)]
    first_layers = None if last_stage_layers is None else num_layers - last_stage_layers
    setup = ModelSetup(
        preset=preset, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        fast_weights=fast,
        context_parallel_size=cp, pipeline_model_parallel_layout=layout, virtual_pipeline_model_parallel_size=virtual,
        num_layers_in_first_pipeline_stage=first_layers, num_layers_in_last_pipeline_stage=last_stage_layers)
    built = [build_model(setup, vp_stage=v) for v in range(virtual)] if virtual else [build_model(setup)]
    models, config = [model for model, _ in built], built[0][1]
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    # Under CP every rank holds its load-balanced chunks of each row (and the global mask).
    local = [split_batch_for_cp(batch, cp, cp_rank) for batch in batches] if cp > 1 else batches
    offsets = [stage_layer_numbers(config, stage_of_chunk(config, pp_rank, v if virtual else None))[0] - 1
               for v in range(len(models))]
    for chunk, offset in zip(models, offsets):
        chunk.module.load_state_dict({k: weights[_renumber(k, offset)] for k in chunk.module.state_dict()})
        if perturb_seed is not None:
            perturb_by_one_ulp(chunk.module, perturb_seed)
    if focusft is None:
        forward_step = sft_forward_step
    else:
        initial = iter([fast_weights_with_random_b(config, fast, batch) for batch in batches]).__next__
        forward_step = make_focusft_forward_step(FocusftConfig(fast_weights=fast, pipeline_schedule=schedule,
                                                               **focusft), lambda _: initial(), plan_costs)
    if timed:
        config.timers = schedule_timers()
    logs = forward_backward(models, local, forward_step)  # train_step's, without the optimizer
    interleaved = focusft is not None and forward_step.interleaved(models[0])
    units = [record.unit for record in forward_step.forward_backward_func(models[0]).records] if interleaved else None
    grads = {_renumber(name, offset): (p.main_grad.clone(), getattr(p, "partition_dim", -1),
                                       getattr(p, "partition_stride", 1))
             for chunk, offset in zip(models, offsets) for name, p in chunk.module.named_parameters()}
    return {"logs": logs, "grads": grads, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": pp_rank, "cp_rank": cp_rank, "dp_rank": dp_rank,
            "layers": [n for v in range(len(models))
                       for n in stage_layer_numbers(config, stage_of_chunk(config, pp_rank, v if virtual else None))],
            "stage_times": collect_stage_times(config.timers) if timed else None, "units": units}


# --- comparison ----------------------------------------------------------------------------


_REFERENCES: dict[tuple[int, str], list[dict]] = {}


def _digest(value, sha) -> None:
    """Feeds the content of `value` (dataclasses, tensors, containers, plain values) to `sha`."""
    if isinstance(value, torch.Tensor):
        sha.update(f"{value.dtype}{tuple(value.shape)}".encode())
        sha.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        sha.update(type(value).__name__.encode())
        for field in dataclasses.fields(value):
            _digest(getattr(value, field.name), sha)
    elif isinstance(value, dict):
        for key in sorted(value):
            sha.update(repr(key).encode())
            _digest(value[key], sha)
    elif isinstance(value, (list, tuple)):
        sha.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _digest(item, sha)
    else:
        sha.update(repr(value).encode())


def reference_step(pool, *args, **kwargs) -> list[dict]:
    """The PP = 1, TP = 1 run of these arguments, with its noise band (tests/helpers/noise_band.py).

    Computed once per test session for each pool size and argument content (several tests compare
    against the same run; the pool size is in the key because it is the run's data-parallel size,
    whose gradient reduction rounds differently)."""
    sha = hashlib.sha256()
    _digest((args, kwargs), sha)
    key = (pool.world_size, sha.hexdigest())
    if key not in _REFERENCES:
        _REFERENCES[key] = with_step_band(lambda seed: pool.run(run_step, 1, 1, *args, perturb_seed=seed, **kwargs))
    return _REFERENCES[key]


def check_parity(reference: list[dict], parallel: list[dict], focusft: bool) -> None:
    """reference: _reference's result; parallel: all ranks of the pipelined run. Every loss, inner
    log and gradient must agree within the reference's band (relative error of the whole tensor).

    Under CP the last stage's CP ranks each hold their tokens' share of the loss [sum, count].
    """
    ref = reference[0]
    band = ref["band"]
    last_stage = max(r["pp_rank"] for r in parallel)
    assert last_stage > 0
    assert all(r["logs"] == [] for r in parallel if r["pp_rank"] != last_stage)  # losses: last stage only
    last = [r for r in parallel if r["pp_rank"] == last_stage]
    for mb, ref_logs in enumerate(ref["logs"]):
        shares = [r["logs"][mb]["lm loss"] for r in last if r["tp_rank"] == 0]
        total = torch.stack(shares).sum(dim=0)
        assert int(total[1]) == int(ref_logs["lm loss"][1])
        assert_in_band(total[0], ref_logs["lm loss"][0], band[f"lm loss/{mb}"], f"micro-batch {mb} lm loss")
        keys = ("inner loss before", "inner loss after", "inner skipped steps", "fast weight update norm")
        for r in last if focusft else ():  # the inner logs describe the whole micro-batch on every rank
            for key in keys:
                assert int(r["logs"][mb][key][1]) == int(ref_logs[key][1])
                assert_in_band(r["logs"][mb][key][0], ref_logs[key][0], band[f"{key}/{mb}"], f"micro-batch {mb} {key}")
    # Every reference gradient is held by exactly one stage (unsharded over its TP ranks; the
    # same on every CP rank after Megatron's reduction over DP x CP).
    seen = set()
    for stage, cp_rank in sorted({(r["pp_rank"], r["cp_rank"]) for r in parallel}):
        ranks = sorted((r for r in parallel if (r["pp_rank"], r["cp_rank"]) == (stage, cp_rank)),
                       key=lambda r: r["tp_rank"])
        for name, (_, dim, stride) in ranks[0]["grads"].items():
            grad = (ranks[0]["grads"][name][0] if dim < 0 or len(ranks) == 1
                    else unshard([r["grads"][name][0] for r in ranks], dim, stride))
            ref_grad = ref["grads"][name][0]
            assert_in_band(grad, ref_grad, band[f"grad/{name}"], f"stage {stage} cp rank {cp_rank} {name}")
            seen.add(name)
    assert seen == set(ref["grads"])


