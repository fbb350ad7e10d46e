"""pretrain_focusft.py / `focusft train`: flags, data, TensorBoard, the training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_focusft.cli import main as cli_main
from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.pretrain import pretrain
from tests.helpers.noise_band import (
    PERTURBATION_SEEDS,
    assert_curve_within,
    measured_band,
    noise_band,
    perturb_by_one_ulp,
)

BASE = ["--train-iters", "3", "--seq-length", "64", "--micro-batch-size", "2", "--lr", "5e-4"]


def _scalars(logdir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_focusft_mock_run_writes_tensorboard(tmp_path: Path):
    tb = tmp_path / "tb"
    args = parse_training_args([*BASE, "--mock-data", "--tensorboard-dir", str(tb), "--attention-metrics-interval", "3"])
    summary = pretrain(args)
    scalars = _scalars(tb)
    assert scalars["train/loss"] == pytest.approx(summary["losses"], rel=1e-6)
    for tag in ("train/inner_loss_before", "train/inner_loss_after", "train/inner_skipped_steps",
                "train/fast_weight_update_norm", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"):
        assert len(scalars[tag]) == 3 and all(math.isfinite(v) for v in scalars[tag]), tag
    assert all(after < before for before, after in
               zip(scalars["train/inner_loss_before"], scalars["train/inner_loss_after"]))
    for tag in ("attention/sink_mass", "attention/context_engagement"):
        assert len(scalars[tag]) == 1 and 0 <= scalars[tag][0] <= 1


def _write_chats(path: Path, bad_row: bool = False) -> Path:
    rows = []
    for i in range(12):
        rows.append({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": str(2 * i)},
            {"role": "user", "content": "And times two?"},
            {"role": "assistant", "content": str(4 * i)},
        ]})
    if bad_row:
        rows.insert(4, {"messages": [{"role": "narrator", "content": "hi"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sft_causal_baseline_on_chat_jsonl_with_gradient_accumulation(tmp_path: Path):
    data = _write_chats(tmp_path / "chats.jsonl")
    args = parse_training_args(["--train-iters", "2", "--seq-length", "128", "--micro-batch-size", "1",
                                "--global-batch-size", "2", "--lr", "1e-3", "--data-path", str(data),
                                "--training-mode", "sft", "--sft-mask", "causal"])
    summary = pretrain(args)
    assert len(summary["losses"]) == 2 and all(math.isfinite(x) for x in summary["losses"])
    # Two micro-batches per iteration: the token count covers both.
    assert all(h["num_tokens"] > 0 for h in summary["history"])
    assert "inner_loss_before" not in summary["history"][0]


def test_bad_chat_row_errors_with_file_and_row_or_is_skipped(tmp_path: Path):
    data = _write_chats(tmp_path / "bad.jsonl", bad_row=True)
    common = ["--train-iters", "1", "--seq-length", "128", "--data-path", str(data)]
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 5: unknown_role"):
        pretrain(parse_training_args(common))
    summary = pretrain(parse_training_args([*common, "--bad-sample-policy", "skip"]))
    assert len(summary["losses"]) == 1


@pytest.mark.parametrize("flags, message", [
    (["--mock-data", "--decoder-last-pipeline-num-layers", "1"],
     "--decoder-last-pipeline-num-layers needs --pipeline-model-parallel-size > 1"),
    (["--mock-data", "--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--mock-data", "--sequence-parallel", "--tensor-model-parallel-size", "4", "--seq-length", "66"],
     "must be a multiple of --tensor-model-parallel-size 4"),
    (["--mock-data", "--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
    (["--mock-data", "--recompute-granularity", "selective"], "invalid choice: 'selective'"),
    ([], "--data-path"),
    (["--mock-data", "--save-interval", "2"], "--save"),
])
def test_unsupported_or_incomplete_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_training_args([*BASE, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_focusft_train_cli_alias(tmp_path: Path):
    assert cli_main(["train", *BASE, "--mock-data", "--train-iters", "1", "--tensorboard-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["losses"]


def _pretrain_history(argv: list[str], perturb_seed: int | None = None) -> list[dict[str, float]]:
    """On every rank of a worker pool, or in this process: a fresh parallel state sized by the
    flags, then pretrain; with `perturb_seed`, from weights moved by one ulp (the noise band)."""
    import megatron_focusft.engine.setup as setup
    from megatron_focusft.runtime import release_model_parallel

    release_model_parallel()
    build_model = setup.build_model

    def build_perturbed(*args, **kwargs):
        model, config = build_model(*args, **kwargs)
        perturb_by_one_ulp(model, perturb_seed)
        return model, config

    if perturb_seed is not None:
        setup.build_model = build_perturbed
    try:
        return pretrain(parse_training_args(argv))["history"]
    finally:
        setup.build_model = build_model


def _losses(history: list[dict[str, float]]) -> list[float]:
    return [h["loss"] for h in history]


@pytest.mark.parametrize("mode", ["focusft", "sft"])
def test_context_parallel_training_equals_one_rank(worker_pool, mode):
    # With CP 2 on 2 ranks there is one data-parallel rank: both read the rows a 1-rank run reads.
    # The loss curve must stay inside the one-rank run's measured noise band (helpers/noise_band.py).
    argv = [*BASE, "--mock-data", "--training-mode", mode]
    cp2 = [_losses(h) for h in worker_pool(2).run(_pretrain_history, [*argv, "--context-parallel-size", "2"])]
    one_rank, band = measured_band(lambda seed: _losses(_pretrain_history(argv, seed)))
    assert cp2[0] == cp2[1]
    assert_curve_within(cp2[0], one_rank, band, f"CP 2 {mode} loss")


@pytest.mark.parametrize("mode", ["focusft", "sft"])
def test_sequence_parallel_training_equals_one_rank(worker_pool, mode):
    # TP 2 with --sequence-parallel: one data-parallel rank, so both ranks read the rows a 1-rank
    # run reads; the loss curve (through Adam and gradient clipping) stays inside the one-rank
    # run's noise band. The attention metrics' probe forward runs under SP too.
    argv = [*BASE, "--mock-data", "--training-mode", mode, "--attention-metrics-interval", "3"]
    sp = [_losses(h) for h in worker_pool(2).run(
        _pretrain_history, [*argv, "--tensor-model-parallel-size", "2", "--sequence-parallel"])]
    one_rank, band = measured_band(lambda seed: _losses(_pretrain_history(argv, seed)))
    assert sp[0] == sp[1]
    assert_curve_within(sp[0], one_rank, band, f"TP 2 + SP {mode} loss")


@pytest.mark.parametrize("mode, extra", [("focusft", []), ("sft", []),
                                         ("focusft", ["--focusft-layer-fraction", "0.75"])],
                         ids=["focusft", "sft", "focusft-adapted-on-both-stages"])
def test_pipeline_parallel_training_continues_a_one_rank_run(worker_pool, tmp_path: Path, mode: str,
                                                            extra: list[str]):
    # A pipeline stage initialises its own layers, so PP = 2 starts from the one-rank run's
    # checkpoint of iteration 1 (resharded on load) and must continue its curves: Megatron's
    # 1F1B schedule, gradient clipping over the stages, Adam; the probe's attention metrics run
    # through the pipeline too. Two micro-batches per iteration. Each curve stays inside the
    # uninterrupted run's noise band (measured from iteration 1, so it also covers iteration 1's
    # amplification, which the PP run does not have: a looser but valid bound).
    ckpt = str(tmp_path / "ckpt")
    argv = [*BASE, "--global-batch-size", "4", "--mock-data", "--training-mode", mode,
            "--attention-metrics-interval", "3", *extra]
    uninterrupted = _pretrain_history(argv)
    perturbed = [_pretrain_history(argv, seed) for seed in PERTURBATION_SEEDS]
    pretrain(parse_training_args([*argv, "--save", ckpt, "--exit-interval", "1"]))
    pp2 = worker_pool(2).run(_pretrain_history, [*argv, "--load", ckpt, "--pipeline-model-parallel-size", "2"])
    assert [h["loss"] for h in pp2[0]] == [h["loss"] for h in pp2[1]]
    assert [h["iteration"] for h in pp2[0]] == [h["iteration"] for h in uninterrupted[1:]]
    keys = ["loss", "grad_norm", *(("inner_loss_before", "inner_loss_after") if mode == "focusft" else ())]
    for key in keys:
        band = noise_band([h[key] for h in uninterrupted], [[h[key] for h in run] for run in perturbed])
        assert_curve_within([h[key] for h in pp2[0]], [h[key] for h in uninterrupted[1:]], band[1:], f"PP 2 {key}")
    # The probe's metrics at iteration 3 (the only probe): one forward, no update after it.
    for key in ("attention/sink_mass", "attention/context_engagement"):
        band = noise_band([uninterrupted[-1][key]], [[run[-1][key]] for run in perturbed])
        assert_curve_within([pp2[0][-1][key]], [uninterrupted[-1][key]], band, f"PP 2 {key}")
    for got in pp2[0]:
        assert 0 < got["pipeline/stage0_busy_fraction"] <= 1 and 0 < got["pipeline/stage1_busy_fraction"] <= 1


@pytest.mark.parametrize("mode", ["focusft", "sft"])
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tmp_path: Path, mode: str):
    argv = ["--train-iters", "4", "--seq-length", "64", "--micro-batch-size", "2", "--lr", "5e-4",
            "--lr-warmup-iters", "1", "--mock-data", "--training-mode", mode]
    uninterrupted = pretrain(parse_training_args(argv))["losses"]
    ckpt = str(tmp_path / "ckpt")
    first = pretrain(parse_training_args([*argv, "--save", ckpt, "--exit-interval", "2"]))
    assert len(first["losses"]) == 2
    second = pretrain(parse_training_args([*argv, "--save", ckpt, "--load", ckpt]))
    assert second["start_iteration"] == 2
    assert first["losses"] + second["losses"] == uninterrupted


def test_resume_refuses_a_different_method(tmp_path: Path):
    argv = ["--train-iters", "2", "--seq-length", "64", "--mock-data"]
    ckpt = str(tmp_path / "ckpt")
    pretrain(parse_training_args([*argv, "--save", ckpt, "--exit-interval", "1"]))
    with pytest.raises(Exception, match="training_mode"):
        pretrain(parse_training_args([*argv, "--load", ckpt, "--training-mode", "sft"]))
