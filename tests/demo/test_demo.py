"""The demo (megatron_focusft/demo): its commands, its summary over seeds, and a short end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_focusft.demo import build_parser, config_from_args, main
from megatron_focusft.demo import commands
from megatron_focusft.demo.config import ARMS, DemoConfig, sweep_arms
from megatron_focusft.demo.report import ALL_TASKS, format_table, summarize


def test_config_validation():
    for bad, match in (({"tasks": ("vt",)}, "word-level tasks"), ({"seeds": (1, 1)}, "distinct"),
                       ({"steps": 0}, "steps must be >= 1"), ({"lr": 0.0}, "learning rates"),
                       ({"eval_multipliers": ()}, "eval_multipliers")):
        with pytest.raises(ValueError, match=match):
            DemoConfig(**bad)
    config = config_from_args(build_parser().parse_args(["--seeds", "3", "--sweep", "0.5,2", "--steps", "7"]))
    assert config.seeds == (1, 2, 3) and config.steps == 7 and config.inner_lrs == (0.5, 2.0)
    assert [a.name for a in config.arms][4:] == ["focusft_response@inner_lr=0.5", "focusft_context@inner_lr=0.5",
                                                 "focusft_response@inner_lr=2", "focusft_context@inner_lr=2"]


@pytest.mark.parametrize("argv, message", [(["--seeds", "0"], "--seeds must be >= 1"),
                                           (["--tasks", "vt"], "word-level tasks"),
                                           (["--sweep", "x"], "comma-separated numbers")])
def test_bad_settings_are_usage_errors_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_command_parses_and_the_arms_differ_only_in_their_flags(tmp_path):
    from megatron_focusft.analysis.cli import parse_analyze_args
    from megatron_focusft.convert.cli import build_convert_parser
    from megatron_focusft.evaluation.cli import parse_eval_args
    from megatron_focusft.training.arguments import parse_training_args

    config = DemoConfig(inner_lrs=(0.5,))
    (tmp_path / "data").mkdir()
    for name in ("base.jsonl", "finetune_s2.jsonl"):  # the parser checks that data files exist
        (tmp_path / "data" / name).write_text("")
    base = parse_training_args(commands.base_argv(config, tmp_path))
    assert (base.training_mode, base.sft_mask, base.train_iters) == ("sft", "causal", config.base_steps)
    parsed = {}
    for arm in config.arms:
        argv = commands.train_argv(config, tmp_path, arm, seed=2)
        args = parse_training_args(argv)
        assert args.finetune and args.pretrained_checkpoint == str(tmp_path / "base")
        assert str(tmp_path / "data" / "finetune_s2.jsonl") in args.data_path
        parsed[arm.name] = vars(args)
        assert build_convert_parser().parse_args(commands.export_argv(tmp_path, arm, 2)).direction == "export-hf"
        for mode in commands.eval_modes(arm):
            ev = parse_eval_args(commands.eval_argv(config, tmp_path, arm, 2, mode))
            assert ev.lengths == (256, 512, 1024) and ev.test_time_adaptation == (mode == commands.TTA_MODE)
        assert parse_analyze_args(commands.analyze_argv(config, tmp_path, arm, 2)).lengths == (256,)
    # Identical data, steps, schedule and seed: only the method flags and the output paths differ.
    keys = {"training_mode", "sft_mask", "focusft_inner_objective", "focusft_inner_lr", "save", "tensorboard_dir"}
    reference = parsed["sft_causal"]
    for name, args in parsed.items():
        assert {k for k in args if args[k] != reference[k]} <= keys, name
    assert parsed["sft_focusft_mask"]["sft_mask"] == "focusft"
    assert parsed["focusft_context"]["focusft_inner_objective"] == "context"
    assert parsed["focusft_response@inner_lr=0.5"]["focusft_inner_lr"] == 0.5
    assert [a.test_time_adaptation for a in ARMS] == [False, False, False, True]
    assert all(a.test_time_adaptation == ("context" in a.name) for a in sweep_arms((1.0,)))


def _write_eval(where: Path, scores: dict[tuple[str, int], list[float]]) -> None:
    where.mkdir(parents=True)
    (where / "results.json").write_text(json.dumps({"results": {}}))
    with open(where / "predictions.jsonl", "w") as f:
        for (task, length), values in scores.items():
            for i, value in enumerate(values):
                f.write(json.dumps({"task": task, "length": length, "index": i, "score": value, "output_ids": []}) + "\n")


def test_summary_over_seeds_matches_a_direct_computation(tmp_path):
    config = DemoConfig(output_dir=str(tmp_path), tasks=("niah_single_essay_word", "babilong_qa1"), seeds=(1, 2),
                        eval_multipliers=(1,))
    rng = np.random.default_rng(0)
    truth = {}
    for arm in config.arms:
        for mode in commands.eval_modes(arm):
            for seed in config.seeds:
                scores = {(task, 256): list(rng.integers(0, 2, 10).astype(float)) for task in config.tasks}
                truth[(arm.name, mode, seed)] = scores
                _write_eval(commands.run_dir(tmp_path, arm, seed, "eval") / mode, scores)
    summary = summarize(config, tmp_path)
    assert set(summary) == {a.name for a in config.arms}
    assert set(summary["focusft_context"]) == {"causal", "focusft", commands.TTA_MODE}
    cell = summary["sft_focusft_mask"]["focusft"]
    for task in config.tasks:
        per_seed = [100 * np.mean(truth[("sft_focusft_mask", "focusft", s)][(task, 256)]) for s in config.seeds]
        assert cell[task]["256"]["per_seed"] == pytest.approx(per_seed)
        assert cell[task]["256"]["mean"] == pytest.approx(np.mean(per_seed))  # equal sample counts per seed
        assert cell[task]["256"]["spread"] == pytest.approx(max(per_seed) - min(per_seed))
        low, high = cell[task]["256"]["ci95"]
        assert low <= cell[task]["256"]["mean"] <= high and cell[task]["256"]["samples"] == 20
    pooled = [v for s in config.seeds for t in config.tasks for v in truth[("sft_focusft_mask", "focusft", s)][(t, 256)]]
    assert cell[ALL_TASKS]["256"]["mean"] == pytest.approx(100 * np.mean(pooled))
    runs = {a.name: {str(s): {"training": {"final_loss": 1.0, "median_seconds_per_step": 0.5}} for s in config.seeds}
            for a in config.arms}
    table = format_table(config, {"summary": summary, "runs": runs})
    row = next(line for line in table.splitlines() if line.startswith("| SFT, FocuSFT mask | focusft |"))
    c = cell[ALL_TASKS]["256"]
    assert f"| {c['mean']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}] ±{c['spread'] / 2:.1f} |" in row


def test_a_base_trained_with_the_same_settings_is_reused(tmp_path):
    from megatron_focusft.demo.run import Runner

    config = DemoConfig(output_dir=str(tmp_path))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "latest_checkpointed_iteration.txt").write_text("300")
    settings = config.base_settings()
    (tmp_path / "base" / "demo_base.json").write_text(json.dumps({"settings": settings, "training": {"loss": [1.0]}}))
    logs = []
    assert Runner(config, logs.append).base(count_tokens=None) == {"loss": [1.0], "reused": True}
    assert "reusing the base model" in logs[0]


def test_an_arm_is_reused_only_with_the_same_commands_and_all_outputs(tmp_path, monkeypatch):
    from megatron_focusft.demo.run import Runner

    config = DemoConfig(output_dir=str(tmp_path), tasks=("babilong_qa1",), eval_multipliers=(1,))
    arm = ARMS[3]
    runner = Runner(config, lambda line: None)
    ran = []

    def refuse(stage, prog, argv, fn):
        ran.append(stage)
        raise RuntimeError("would run")

    monkeypatch.setattr(runner, "step", refuse)
    with pytest.raises(RuntimeError, match="would run"):  # nothing recorded yet: it trains
        runner.arm(arm, 1)
    for mode in commands.eval_modes(arm):
        _write_eval(commands.run_dir(tmp_path, arm, 1, "eval") / mode, {("babilong_qa1", 256): [1.0]})
    for kind, name in (("hf", "config.json"), ("analyze", "analysis.json"), ("runs", "demo_arm.json")):
        commands.run_dir(tmp_path, arm, 1, kind).mkdir(parents=True, exist_ok=True)
        (commands.run_dir(tmp_path, arm, 1, kind) / name).write_text("{}")
    lines = [line for line in _recorded_lines(config, tmp_path, arm)]
    record = {"commands": lines, "training": {"final_loss": 1.5}}
    (commands.run_dir(tmp_path, arm, 1, "runs") / "demo_arm.json").write_text(json.dumps(record))
    assert runner.arm(arm, 1) == record and runner.reused == [f"{arm.name} s1"]
    with pytest.raises(RuntimeError, match="would run"):  # another command line (a check of the export)
        runner.arm(arm, 1, check_export=True)
    (commands.run_dir(tmp_path, arm, 1, "eval") / commands.TTA_MODE / "predictions.jsonl").unlink()
    with pytest.raises(RuntimeError, match="would run"):  # an output is missing
        runner.arm(arm, 1)
    assert ran == ["train"] * 3


def _recorded_lines(config: DemoConfig, out: Path, arm) -> list[str]:
    """The arm's command lines for seed 1 as the runner prints them, built here from commands.py."""
    import shlex

    argvs = [("python pretrain_focusft.py", commands.train_argv(config, out, arm, 1)),
             ("focusft convert", commands.export_argv(out, arm, 1)),
             *(("focusft eval", commands.eval_argv(config, out, arm, 1, m)) for m in commands.eval_modes(arm)),
             ("focusft analyze", commands.analyze_argv(config, out, arm, 1))]
    return [shlex.join([*prog.split(), *argv]) for prog, argv in argvs]


def test_short_demo_end_to_end(tmp_path):
    """Every step of the short demo runs; the HF export and the Megatron checkpoint generate the same tokens."""
    out = tmp_path / "demo"
    main(["--short", "--output-dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    config = DemoConfig.short()
    assert results["megatron_vs_hf"]["samples_that_differ"] == 0
    assert results["megatron_vs_hf"]["samples"] == len(config.tasks) * config.eval_samples
    assert results["megatron_vs_hf"]["scores_equal"] is True
    assert set(results["summary"]) == {a.name for a in ARMS}
    for arm in ARMS:
        run = results["runs"][arm.name]["1"]
        assert len(run["training"]["loss"]) == config.steps and np.isfinite(run["training"]["loss"]).all()
        assert 0 <= run["analysis"]["sink_mass"] <= 1
        assert (out / "hf" / arm.name / "s1" / "config.json").is_file()
        for mode in commands.eval_modes(arm):
            cells = results["summary"][arm.name][mode]
            assert set(cells) == {*config.tasks, ALL_TASKS}
            assert all(0 <= c["mean"] <= 100 for by_length in cells.values() for c in by_length.values())
    assert results["base"]["reused"] is False and len(results["base"]["loss"]) == config.base_steps
    assert (out / "table.md").read_text().startswith("| arm | prefill |")
    assert all(Path(p).is_file() for p in results["plots"])
    assert any(c.startswith("focusft eval --load") for c in results["commands"]["steps"])
    # Run again in the same directory: the base and every arm are reused, the numbers are the same.
    main(["--short", "--output-dir", str(out)])
    again = json.loads((out / "results.json").read_text())
    assert again["reused_runs"] == [f"{arm.name} s1" for arm in ARMS] and again["base"]["reused"] is True
    assert again["summary"] == results["summary"] and again["megatron_vs_hf"] == results["megatron_vs_hf"]
    assert again["commands"]["steps"] == [] and again["runs"] == results["runs"]
