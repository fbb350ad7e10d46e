"""Tolerances for loss curves of sharded or resumed runs, measured on the machine that runs them.

A sharded run (TP, SP, CP, PP) or a resharded resume sums in another order than one process, so
each iteration differs from the reference by fp32 rounding, and Adam plus the next iterations
amplify that difference by an amount no fixed bound captures: it depends on the model, the step
and the matmul kernel the CPU picks (on one machine a FocuSFT run's third grad norm moved by 5e-3
relative under a one-ulp change of its initial weights, an SFT run's by 2e-6).

So the tolerance is measured. The reference run is repeated with every weight moved by one ulp
in a random direction (`perturb_by_one_ulp`, a rounding-sized change of the starting point) for
`len(PERTURBATION_SEEDS)` seeds; the band at iteration k is the largest relative drift of those
runs up to k. A sharded run injects rounding of the same size (one ulp of a weight is ~1e-9,
the update noise of a step with ~1e-6 relative gradient noise at lr <= 1e-3 is below that), once
per iteration instead of once at the start, so for the small drifts here (the linear regime) its
drift is at most ~k times the band at iteration k <= 6; BAND_FACTOR = 10 covers that, plus the
spread of a band measured with three seeds. CURVE_FLOOR keeps the bound above the rounding of the
reported numbers themselves when the band is zero (SFT curves often match bit for bit).

What this catches: any real bug moves iteration 1 or the single-step parity tests (per-gradient
comparisons, tests/parallel) far beyond this; the curve tests guard the optimizer, clipping and
the data order over the DP x CP x PP layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7
# A loss is a mean over ~100 tokens of log-softmaxes over 512 logits, a grad norm a sum of ~3e6
# squares; blocked or pairwise sums of n fp32 terms in another order differ by ~log2(n) eps
# relative, <= 22 eps here.
CURVE_FLOOR = 32 * FP32_EPS
BAND_FACTOR = 10
PERTURBATION_SEEDS = (1, 2, 3)


@torch.no_grad()
def perturb_by_one_ulp(module: torch.nn.Module, seed: int) -> None:
    """Moves each floating-point parameter element to its next float up or down (a fair coin)."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        up = torch.rand(param.shape, generator=generator) < 0.5
        towards = torch.where(up, float("inf"), float("-inf")).to(param.dtype)
        param.copy_(torch.nextafter(param, towards))


def noise_band(reference: Sequence[float], perturbed: Sequence[Sequence[float]]) -> list[float]:
    """Relative tolerance per iteration: BAND_FACTOR x the running max of the perturbed runs'
    relative drift from `reference`, at least CURVE_FLOOR. All curves have one value per iteration."""
    band, worst = [], 0.0
    for k, ref in enumerate(reference):
        worst = max(worst, *(abs(run[k] - ref) / max(abs(ref), 1e-30) for run in perturbed))
        band.append(max(CURVE_FLOOR, BAND_FACTOR * worst))
    return band


def assert_curve_within(got: Sequence[float], reference: Sequence[float], band: Sequence[float], what: str) -> None:
    assert len(got) == len(reference) == len(band), what
    for k, (g, r, tol) in enumerate(zip(got, reference, band)):
        assert g == pytest.approx(r, rel=tol), f"{what}, iteration {k + 1}: {g} vs {r} (band {tol:.1e})"


def measured_band(run: Callable[[int | None], Sequence[float]]) -> tuple[list[float], list[float]]:
    """(reference curve, band): `run(None)` is the reference, `run(seed)` the same run started from
    weights perturbed with that seed."""
    reference = list(run(None))
    return reference, noise_band(reference, [run(seed) for seed in PERTURBATION_SEEDS])


# --- one step (no optimizer): per-tensor relative error against the reference's own band --------

# A single forward/backward with reordered fp32 sums: tensors agree to a few eps in norm (SFT);
# the FocuSFT inner loop (SGD at lr 1 on the fast weights) amplifies that, which the band measures.
STEP_FLOOR = 32 * FP32_EPS


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """||got - reference|| / ||reference|| in float64 (0 when both are zero)."""
    diff = float(torch.linalg.vector_norm((got.double() - reference.double()).flatten()))
    size = float(torch.linalg.vector_norm(reference.double().flatten()))
    return diff / size if size > 0 else (0.0 if diff == 0 else float("inf"))


def _step_values(result: dict) -> dict[str, torch.Tensor]:
    """A single-step result {"logs": [per micro-batch {key: [sum, count]}], "grads": {name: (g, dim,
    stride)}} as flat tensors: "{key}/{micro-batch}" (the sums) and "grad/{name}"."""
    values = {f"{key}/{mb}": value[0] for mb, logs in enumerate(result["logs"]) for key, value in logs.items()}
    values.update({f"grad/{name}": grad for name, (grad, _, _) in result["grads"].items()})
    return values


def step_band(reference: dict, perturbed: Sequence[dict]) -> dict[str, float]:
    """Per log and per gradient: BAND_FACTOR x the largest relative error of the perturbed runs, at
    least STEP_FLOOR (keys as in _step_values)."""
    ref = _step_values(reference)
    runs = [_step_values(run) for run in perturbed]
    return {key: max(STEP_FLOOR, BAND_FACTOR * max(relative_error(run[key], value) for run in runs))
            for key, value in ref.items()}


def with_step_band(run: Callable[[int | None], list[dict]]) -> list[dict]:
    """`run(perturb_seed)` is a one-process single-step run on a worker pool (a result per rank);
    returns its unperturbed results, each with the band as result["band"]."""
    reference = run(None)
    perturbed = [run(seed)[0] for seed in PERTURBATION_SEEDS]
    band = step_band(reference[0], perturbed)
    return [{**result, "band": band} for result in reference]


def assert_in_band(got: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str) -> None:
    error = relative_error(got, reference)
    assert error <= tolerance, f"{what}: relative error {error:.2e} > band {tolerance:.2e}"
