"""The SFT-vs-FocuSFT demo (megatron_focusft.demo): training lengths, configuration, and the CI-sized run end to end.

The task generator is tested in tests/data/test_long_context_task.py, the evaluation in
tests/evaluation/test_teacher_forced.py.
"""

from __future__ import annotations

import json
import math
import random
import struct

import pytest

from megatron_focusft import demo
from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.long_context_task import DemoTaskConfig, sample_lengths
from tests.helpers.long_context import baseline_by_hand

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------


def test_training_lengths_cover_every_step_and_spread_over_octaves():
    config = demo.DemoConfig(steps=50)
    lengths = demo.training_lengths(config, random.Random(0))
    assert min(lengths) >= config.task.min_length() and max(lengths) <= config.seq_length
    need = config.steps * config.micro_batch_size * config.seq_length
    assert 1.25 * need <= sum(lengths) < 1.25 * need + 256 * config.seq_length
    # Density 1/L^2: each octave holds about the same share of the tokens.
    top_octave = sum(n for n in lengths if n > config.seq_length // 2) / sum(lengths)
    octaves = math.log2(config.seq_length / config.task.min_length())
    assert 0.5 / octaves < top_octave < 2 / octaves
    with pytest.raises(ValueError):
        sample_lengths(3, 10, 5, random.Random(0))


# ---------------------------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------------------------


def test_inner_objectives_match_the_focusft_package():
    from megatron_focusft.focusft import INNER_OBJECTIVES

    assert demo.INNER_OBJECTIVES == INNER_OBJECTIVES


def test_config_validation_and_cli_flags():
    with pytest.raises(ValueError, match="num_symbols"):
        DemoTaskConfig(num_symbols=0)
    with pytest.raises(ValueError, match="too short"):
        demo.DemoConfig(seq_length=8)
    with pytest.raises(ValueError, match="inner_objective"):
        demo.DemoConfig(focusft_inner_objective="both")
    args = demo.build_parser().parse_args(["--short", "--steps", "3", "--output-dir", "x", "--seed", "7"])
    config = demo.config_from_args(args)
    assert (config.steps, config.output_dir, config.seed) == (3, "x", 7)
    assert config.seq_length == demo.DemoConfig.short().seq_length
    args = demo.build_parser().parse_args(["--focusft-inner-objective", "context"])
    argv = demo.training_argv(demo.config_from_args(args), "focusft", "d.jsonl", "tb", "cache")
    assert "--focusft-inner-objective context" in " ".join(argv)
    default = demo.config_from_args(demo.build_parser().parse_args([]))
    assert default == demo.DemoConfig()
    assert default.eval_lengths == tuple(default.seq_length * m for m in (1, 2, 4))


def test_focusft_demo_command_rejects_bad_settings_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", "--steps", "0", "--output-dir", str(tmp_path / "never")])
    assert exc.value.code == 2 and "steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------
# The CI-sized demo, end to end
# ---------------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _finite_numbers(value, where: str):
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} is {value}"


@pytest.mark.timeout(300)
def test_short_demo_writes_results_plots_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = demo.DemoConfig.short(output_dir=str(tmp_path / "demo"))
    results = demo.run_demo(config, command="focusft demo --short", log=lambda line: None)
    out = tmp_path / "demo"
    saved = json.loads((out / "results.json").read_text())
    _finite_numbers(saved, "results")
    assert saved["step_time_ratio"] == pytest.approx(results["step_time_ratio"])

    for key in ("sft_accuracy", "focusft_accuracy", "sink_mass_sft", "sink_mass_focusft",
                "engagement_sft", "engagement_focusft", "step_time_ratio"):
        assert isinstance(saved[key], float), key
    lengths = [str(n) for n in config.eval_lengths]
    assert lengths == ["128", "256", "512"]
    for run in ("sft", "focusft"):
        record = saved["runs"][run]
        for what in ("accuracy", "token_accuracy", "response_loss"):
            assert list(saved[f"{run}_{what}_by_length"]) == lengths
        assert saved[f"{run}_accuracy"] == saved[f"{run}_accuracy_by_length"]["128"]
        for n in lengths:
            ev = record["eval"][n]
            assert ev["answers"] == config.eval_samples
            assert 0.0 <= ev["accuracy"] <= ev["token_accuracy"] <= 1.0
            assert ev["response_loss"] > 0
            assert 0.0 <= ev["sink_mass"] <= ev["sink_mass_first4"] <= 1.0
            assert 0.0 <= ev["context_engagement"] <= 1.0
            assert ev["sink_mass_first4"] + ev["context_engagement"] <= 1.0 + 1e-6
        assert saved[f"sink_mass_{run}"] == record["eval"]["128"]["sink_mass"]
        assert saved[f"engagement_{run}"] == record["eval"]["128"]["context_engagement"]
        assert len(record["loss"]) == len(record["seconds_per_step"]) == config.steps
        assert [p["iteration"] for p in record["attention_metrics_during_training"]] == [3, 6]
        assert f"--training-mode {run}" in record["command"] and "--sft-mask focusft" in saved["commands"]["sft"]
    assert len(saved["runs"]["focusft"]["inner_loss_before"]) == config.steps
    # The step-time ratio is the ratio of the median step times, the first step excluded.
    steady = {r: sorted(saved["runs"][r]["seconds_per_step"][1:]) for r in ("sft", "focusft")}
    assert [len(v) for v in steady.values()] == [5, 5]
    assert saved["step_time_ratio"] > 0
    assert saved["step_time_ratio"] == pytest.approx(steady["focusft"][2] / steady["sft"][2])
    # The context-free guess, recounted by hand from the written evaluation data.
    for n in lengths:
        chats = [json.loads(line) for line in (out / "data" / f"eval_{n}.jsonl").read_text().splitlines()]
        hand = [baseline_by_hand(c["answer"]) for c in chats]
        assert saved["baseline_accuracy_by_length"][n] == pytest.approx(sum(map(all, hand)) / len(chats))
        assert saved["baseline_token_accuracy_by_length"][n] == pytest.approx(
            sum(map(sum, hand)) / sum(map(len, hand)))
    assert saved["commands"]["demo"] == "focusft demo --short"
    assert saved["config"]["steps"] == config.steps

    assert sorted(saved["plots"]) == sorted(str(out / name) for name in
                                            ("loss_curves.png", "attention_metrics.png", "accuracy_by_length.png"))
    for path in saved["plots"]:
        width, height = _png_size(out / path.rsplit("/", 1)[1])
        assert width >= 600 and height >= 300
    for run in ("sft", "focusft"):
        events = EventAccumulator(str(out / "tensorboard" / run))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/learning_rate", "attention/sink_mass", "attention/context_engagement"} <= tags
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, config.steps + 1))
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(saved["runs"][run]["loss"])
        assert ("train/inner_loss_before" in tags) == (run == "focusft")
