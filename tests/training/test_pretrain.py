"""pretrain_focusft.py / `focusft train`: flags, data, TensorBoard, the training loop."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_focusft.cli import main as cli_main
from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.lr_schedule import LrSchedule
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
    """pretrain's history (_pretrain_result)."""
    return _pretrain_result(argv, perturb_seed)["history"]


def _pretrain_result(argv: list[str], perturb_seed: int | None = None) -> dict:
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
        return pretrain(parse_training_args(argv))
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


@pytest.mark.parametrize("mode, extra, pp_extra", [
    ("focusft", [], []), ("sft", [], []),
    ("focusft", ["--focusft-layer-fraction", "0.75"], ["--pipeline-balance", "auto"])],
    ids=["focusft", "sft", "focusft-adapted-on-both-stages-balanced"])
def test_pipeline_parallel_training_continues_a_one_rank_run(worker_pool, tmp_path: Path, mode: str,
                                                            extra: list[str], pp_extra: list[str]):
    # A pipeline stage initialises its own layers, so PP = 2 starts from the one-rank run's
    # checkpoint of iteration 1 (resharded on load) and must continue its curves: Megatron's
    # 1F1B schedule, gradient clipping over the stages, Adam; the probe's attention metrics run
    # through the pipeline too. Two micro-batches per iteration. Each curve stays inside the
    # uninterrupted run's noise band (measured from iteration 1, so it also covers iteration 1's
    # amplification, which the PP run does not have: a looser but valid bound). With
    # --pipeline-balance auto the split comes from timings (any split must continue the curves):
    # the model is rebuilt with the chosen layout before the checkpoint loads into it.
    ckpt = str(tmp_path / "ckpt")
    argv = [*BASE, "--global-batch-size", "4", "--mock-data", "--training-mode", mode,
            "--attention-metrics-interval", "3", *extra]
    uninterrupted = _pretrain_history(argv)
    perturbed = [_pretrain_history(argv, seed) for seed in PERTURBATION_SEEDS]
    pretrain(parse_training_args([*argv, "--save", ckpt, "--exit-interval", "1"]))
    results = worker_pool(2).run(_pretrain_result, [*argv, "--load", ckpt, "--pipeline-model-parallel-size", "2",
                                                    *pp_extra])
    assert results[0]["stage_layers"] == results[1]["stage_layers"] and sum(results[0]["stage_layers"]) == 4
    pp2 = [r["history"] for r in results]
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


@pytest.mark.parametrize("mode, extra, pp_extra", [
    ("focusft", ["--focusft-layer-fraction", "0.75"], ["--pipeline-balance", "auto"]), ("sft", [], [])],
    ids=["focusft-interleaved-balanced", "sft-megatron-interleaved"])
def test_virtual_pipeline_stages_continue_a_one_rank_run_and_their_checkpoint_resumes_on_one_rank(
        worker_pool, tmp_path: Path, mode: str, extra: list[str], pp_extra: list[str]):
    # PP = 2 with two model chunks per rank (four stages of one layer, stage s on rank s mod 2)
    # resumes the one-rank run's checkpoint of iteration 1, optimizer included, resharded into the
    # chunks, and runs iteration 2: FocuSFT under its interleaved schedule (adapted layers 2-4
    # from stage 1 on; --pipeline-balance auto measures every chunk and, with one layer per chunk,
    # can only keep that split), SFT under Megatron's interleaved 1F1B (two micro-batches per
    # iteration: a multiple of PP). It saves (Megatron's model0 / model1 nesting), and a one-rank
    # run resumes that checkpoint for iteration 3. Both continue the uninterrupted run's curves
    # within its noise band (as in the PP test above), and the probe's attention metrics at
    # iteration 2 go through the four stages (rank 0, 1, 0, 1) to the same values.
    ckpt = str(tmp_path / "ckpt")
    argv = [*BASE, "--global-batch-size", "4", "--mock-data", "--training-mode", mode,
            "--attention-metrics-interval", "2", *extra]
    uninterrupted = _pretrain_history(argv)
    perturbed = [_pretrain_history(argv, seed) for seed in PERTURBATION_SEEDS]
    pretrain(parse_training_args([*argv, "--save", ckpt, "--exit-interval", "1"]))
    results = worker_pool(2).run(_pretrain_result, [*argv, "--load", ckpt, "--save", ckpt, "--exit-interval", "2",
                                                    "--pipeline-model-parallel-size", "2",
                                                    "--num-virtual-stages-per-pipeline-rank", "2", *pp_extra])
    assert results[0]["stage_layers"] == [1, 1, 1, 1]
    virtual = [r["history"] for r in results]
    assert [h["loss"] for h in virtual[0]] == [h["loss"] for h in virtual[1]]
    resumed = _pretrain_history([*argv, "--load", ckpt, "--save", ckpt])
    continued = virtual[0] + resumed
    assert [h["iteration"] for h in continued] == [2, 3]
    for key in ("loss", "grad_norm", *(("inner_loss_before", "inner_loss_after") if mode == "focusft" else ())):
        band = noise_band([h[key] for h in uninterrupted], [[h[key] for h in run] for run in perturbed])
        assert_curve_within([h[key] for h in continued], [h[key] for h in uninterrupted[1:]], band[1:],
                            f"virtual stages, then one rank: {key}")
    for key in ("attention/sink_mass", "attention/context_engagement"):
        assert key in virtual[0][0] and key in virtual[1][0] and key not in resumed[0]  # iteration 2 only
        band = noise_band([uninterrupted[1][key]], [[run[1][key]] for run in perturbed])
        assert_curve_within([virtual[0][0][key]], [uninterrupted[1][key]], band, f"virtual stages {key}")


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


@pytest.mark.parametrize("inner_lr", ["1e6", "1e15"])
def test_inner_blow_ups_are_skipped_counted_and_shown_and_the_model_still_learns(tmp_path: Path, inner_lr: str,
                                                                                 capsys):
    # An inner lr of 1e6 used to saturate the adapted layers (lm loss exactly ln(vocab), grad
    # norm 0, nothing skipped) and 1e15 to abort with a NaN loss: the guard skips every such step
    # and the outer step trains with the initial fast weights.
    tb = tmp_path / "tb"
    summary = pretrain(parse_training_args([*BASE, "--mock-data", "--focusft-inner-lr", inner_lr,
                                            "--tensorboard-dir", str(tb)]))
    history = summary["history"]
    # Every sample with targets skips both of its inner steps.
    assert all(h["inner_skipped_steps"] > 0 and h["inner_skipped_steps"] % 2 == 0 for h in history)
    assert all(h["fast_weight_update_norm"] == 0 for h in history)
    assert all(math.isfinite(loss) for loss in summary["losses"])
    assert abs(summary["losses"][-1] - math.log(512)) > 0.5 and summary["losses"][-1] < summary["losses"][0]
    assert _scalars(tb)["train/inner_skipped_steps"] == [h["inner_skipped_steps"] for h in history]
    out = capsys.readouterr().out
    assert out.count(f"TensorBoard: {tb}") == 1
    progress = [line for line in out.splitlines() if line.startswith("[")]
    for line, h in zip(progress, history, strict=True):
        assert f", {h['inner_skipped_steps']} steps skipped |" in line
        real, padded = re.search(r"\| ([\d,]+) real / ([\d,]+) padded tok/s \|", line).groups()
        assert 0 < int(real.replace(",", "")) <= int(padded.replace(",", ""))


def test_real_tokens_per_second_count_the_samples_only(tmp_path: Path):
    # One short chat per row of 256 slots: almost everything is padding.
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    history = pretrain(parse_training_args(["--train-iters", "1", "--seq-length", "256", "--micro-batch-size", "4",
                                            "--data-path", str(data), "--training-mode", "sft"]))["history"]
    # Four rows, one of them holding the sample's 7 tokens (<bos> <user> a <end> <assistant> b <end>),
    # the others the epoch's empty fill.
    assert history[0]["real_tokens_per_s"] / history[0]["tokens_per_s"] == pytest.approx(7 / (4 * 256))


def test_save_dir_is_checked_before_training(tmp_path: Path, monkeypatch, capsys):
    from megatron_focusft.engine import disk_space
    from megatron_focusft.training.pretrain import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*BASE, "--mock-data", "--save", str(blocker / "ckpt")]) == 1
    err = capsys.readouterr()
    assert f"pretrain_focusft.py: error: --save {blocker / 'ckpt'} is not writable: " in err.err
    assert "iteration" not in err.out  # before the first iteration
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 1000)
    assert main([*BASE, "--mock-data", "--save", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr()
    # (tests/engine/test_checkpoint.py compares the estimate with a written checkpoint)
    assert re.search(rf"pretrain_focusft.py: error: --save {tmp_path / 'ckpt'} has 1,000 bytes free, one checkpoint "
                     rf"needs about [\d,]+: free space there or choose another --save", err.err), err.err
    assert "iteration" not in err.out and not list((tmp_path / "ckpt").iterdir())


def _lrs(schedule: LrSchedule, steps: range) -> list[float]:
    """The learning rate after each number of scheduler steps, from megatron-core's scheduler."""
    group: dict = {}
    scheduler = schedule.build(SimpleNamespace(param_groups=[group]))
    lrs = []
    for step in range(steps.stop):
        if step in steps:
            lrs.append(group["lr"])
        scheduler.step(1)
    return lrs


def test_resume_extends_the_run_and_changes_the_schedule_as_megatron_does(tmp_path: Path):
    argv = ["--train-iters", "4", "--seq-length", "64", "--micro-batch-size", "2", "--lr", "5e-4",
            "--lr-warmup-iters", "1", "--mock-data", "--training-mode", "sft"]
    ckpt = str(tmp_path / "ckpt")
    pretrain(parse_training_args([*argv, "--save", ckpt, "--save-interval", "1", "--exit-interval", "2"]))
    resumed = [*argv, "--load", ckpt, "--train-iters", "6"]
    # Neither Megatron flag: refused by name, before anything is loaded.
    with pytest.raises(ValueError, match=r"the LR schedule differs from the checkpoint's \(--lr-decay-iters \(default "
                                         r"--train-iters\): checkpoint 4, now 6\): pass --override-opt_param-scheduler "
                                         r".* or --use-checkpoint-opt_param-scheduler"):
        pretrain(parse_training_args(resumed))
    saved = LrSchedule(5e-4, 0.0, 1, 4, "cosine", 0.01)
    kept = pretrain(parse_training_args([*resumed, "--use-checkpoint-opt_param-scheduler"]))
    assert [h["iteration"] for h in kept["history"]] == [3, 4, 5, 6]
    assert [h["learning_rate"] for h in kept["history"]] == _lrs(saved, range(2, 6))
    # Overriding changes the peak lr too (megatron-core's optimizer groups carry it); --ckpt-step
    # starts from an iteration older than the latest.
    override = pretrain(parse_training_args([*resumed, "--lr", "1e-3", "--override-opt_param-scheduler",
                                             "--ckpt-step", "1"]))
    assert override["start_iteration"] == 1
    assert [h["learning_rate"] for h in override["history"]] == _lrs(LrSchedule(1e-3, 0.0, 1, 6, "cosine", 0.01),
                                                                      range(1, 6))
