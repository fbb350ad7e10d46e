"""The demo's steps in order: data, base, then per seed and arm train, export, evaluate, analyze.

Every step is one of the product's own commands (demo/commands.py), called in this process
(one Python and megatron-core start-up for the whole demo). The base is trained once per
output directory: base/demo_base.json records the settings it was trained with, and a later
run with the same settings reuses it. Likewise each arm and seed: runs/<arm>/s<seed>/demo_arm.json
records its commands and numbers, and a later run whose commands for it are the same (and whose
outputs are all there) reuses it, so `--sweep` or more `--seeds` add runs to an earlier
experiment instead of repeating it. Delete a run's directories to redo it.

The first arm's first seed is also evaluated from its Megatron checkpoint in causal mode at the
training length; the demo stops with an error unless every generated token (and so every
score) equals the exported model's on those samples.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_focusft.demo import commands
from megatron_focusft.demo.config import Arm, DemoConfig
from megatron_focusft.demo.data import write_base_data, write_finetune_data, write_tokenizer
from megatron_focusft.demo.report import read_eval, summarize, write_report



def _train(argv: list[str]) -> dict[str, Any]:
    from megatron_focusft.training.arguments import parse_training_args
    from megatron_focusft.training.pretrain import pretrain

    return pretrain(parse_training_args(argv))


def _eval(argv: list[str]) -> None:
    from megatron_focusft.evaluation.cli import main

    main(argv)


def _export(argv: list[str]) -> None:
    from megatron_focusft.convert.cli import main

    main(argv)


def _analyze(argv: list[str]) -> None:
    from megatron_focusft.analysis.cli import main

    main(argv)


def _training_record(summary: dict[str, Any], argv: list[str], seconds: float) -> dict[str, Any]:
    history = summary["history"]
    steady = [h["iteration_s"] for h in history[max(1, len(history) // 10):]] or [h["iteration_s"] for h in history]
    tail = max(1, len(summary["losses"]) // 10)
    return {"command": shlex.join(["python", "pretrain_focusft.py", *argv]), "wall_seconds": seconds,
            "loss": summary["losses"], "final_loss": sum(summary["losses"][-tail:]) / tail,
            "median_seconds_per_step": sorted(steady)[len(steady) // 2]}


def _line(prog: str, argv: list[str]) -> str:
    return shlex.join([*prog.split(), *argv])


class Runner:
    """Runs and records the steps; `log` prints progress."""

    def __init__(self, config: DemoConfig, log: Callable[[str], None]) -> None:
        self.config, self.log = config, log
        self.out = Path(config.output_dir)
        self.commands: list[str] = []
        self.stage_seconds: dict[str, float] = {}
        self.reused: list[str] = []  # "<arm> s<seed>" of the arms reused from an earlier run

    def step(self, stage: str, prog: str, argv: list[str], fn: Callable[[list[str]], Any]) -> Any:
        line = _line(prog, argv)
        self.commands.append(line)
        self.log(f"$ {line}")
        t0 = time.perf_counter()
        result = fn(argv)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0
        return result

    def base(self, count_tokens: Callable[[str], int]) -> dict[str, Any]:
        """Train the base (its data written first), or reuse one trained with the same settings."""
        settings = self.config.base_settings()
        record_path = self.out / "base" / "demo_base.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record["settings"] == settings and (self.out / "base" / "latest_checkpointed_iteration.txt").is_file():
                self.log(f"reusing the base model in {self.out / 'base'} ({record_path} matches these settings)")
                return {**record["training"], "reused": True}
        t0 = time.perf_counter()
        write_base_data(self.config, self.out / "data", count_tokens)
        self.stage_seconds["data"] += time.perf_counter() - t0
        argv = commands.base_argv(self.config, self.out)
        t0 = time.perf_counter()
        summary = self.step("base", "python pretrain_focusft.py", argv, _train)
        training = _training_record(summary, argv, time.perf_counter() - t0)
        record_path.write_text(json.dumps({"settings": settings, "training": training}, indent=1) + "\n")
        return {**training, "reused": False}

    def arm(self, arm: Arm, seed: int, check_export: bool = False) -> dict[str, Any]:
        """Train, export, evaluate and analyze one arm and seed (with `check_export`, also the Megatron
        checkpoint's eval against the export's); reused when its record holds the same commands."""
        steps = [("train", "python pretrain_focusft.py", commands.train_argv(self.config, self.out, arm, seed), _train),
                 ("export", "focusft convert", commands.export_argv(self.out, arm, seed), _export),
                 *(("eval", "focusft eval", commands.eval_argv(self.config, self.out, arm, seed, mode), _eval)
                   for mode in commands.eval_modes(arm)),
                 ("analyze", "focusft analyze", commands.analyze_argv(self.config, self.out, arm, seed), _analyze)]
        if check_export:
            steps.append(("eval", "focusft eval",
                          commands.eval_argv(self.config, self.out, arm, seed, "causal", load=True), _eval))
        lines = [_line(prog, argv) for _, prog, argv, _ in steps]
        record_path = commands.run_dir(self.out, arm, seed, "runs") / "demo_arm.json"
        if record_path.is_file():
            saved = json.loads(record_path.read_text())
            if saved["commands"] == lines and commands.arm_outputs_exist(self.out, arm, seed, check_export):
                self.log(f"reusing {arm.name} s{seed}: {record_path} holds these commands and every output exists")
                self.reused.append(f"{arm.name} s{seed}")
                return saved
        t0 = time.perf_counter()
        summary = self.step(*steps[0])
        record: dict[str, Any] = {"commands": lines,
                                  "training": _training_record(summary, steps[0][2], time.perf_counter() - t0)}
        commands.run_dir(self.out, arm, seed, "hf").parent.mkdir(parents=True, exist_ok=True)
        for step in steps[1:]:
            self.step(*step)
        analysis = json.loads((commands.run_dir(self.out, arm, seed, "analyze") / "analysis.json").read_text())
        record["analysis"] = analysis["pooled"]
        if check_export:
            record["megatron_vs_hf"] = self.check_megatron_matches_hf(arm, seed)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        return record

    def check_megatron_matches_hf(self, arm: Arm, seed: int) -> dict[str, Any]:
        """Every token the Megatron checkpoint generated (causal, 1x) must equal the HF export's."""
        where = commands.run_dir(self.out, arm, seed, "eval")
        hf, megatron = read_eval(where / "causal"), read_eval(where / "causal-megatron")
        length = str(self.config.seq_length)
        differ = [key for key, ids in megatron["predictions"].items() if hf["predictions"].get(key) != ids]
        scores_equal = all(hf["results"][task][length] == by_length[length]
                           for task, by_length in megatron["results"].items())
        check = {"arm": arm.name, "seed": seed, "mode": "causal", "length": int(length),
                 "samples": len(megatron["predictions"]), "samples_that_differ": len(differ),
                 "scores_equal": scores_equal}
        if differ or not scores_equal:
            raise RuntimeError(f"the Megatron checkpoint and its HF export generate different tokens on "
                               f"{len(differ)} of {len(megatron['predictions'])} samples (first: {differ[:3]}); "
                               f"compare {where / 'causal'} and {where / 'causal-megatron'}")
        self.log(f"check: the Megatron checkpoint and the HF export of {arm.name} s{seed} generate the same tokens "
                 f"on all {check['samples']} samples")
        return check


def run_demo(config: DemoConfig, command: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment; writes results.json, table.md and plots under config.output_dir; returns the results."""
    import megatron.core
    import torch

    from megatron_focusft.runtime import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    t_start = time.perf_counter()
    runner = Runner(config, log)
    out = runner.out
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    count_tokens = write_tokenizer(data)
    for seed in config.seeds:
        write_finetune_data(config, seed, data, count_tokens)
    runner.stage_seconds["data"] = time.perf_counter() - t0
    log(f"focusft demo: base = {config.preset} preset, {config.base_steps} steps; {len(config.arms)} arms x "
        f"{len(config.seeds)} seed(s), {config.steps} fine-tuning steps of {config.micro_batch_size} x "
        f"{config.seq_length} tokens each; eval on {', '.join(config.tasks)} at {config.eval_lengths} tokens")
    base = runner.base(count_tokens)
    runs: dict[str, dict[str, Any]] = {}
    for seed in config.seeds:
        for arm in config.arms:
            log(f"--- {arm.label}, seed {seed} ---")
            first = seed == config.seeds[0] and arm == config.arms[0]
            runs.setdefault(arm.name, {})[str(seed)] = runner.arm(arm, seed, check_export=first)
    agreement = runs[config.arms[0].name][str(config.seeds[0])].pop("megatron_vs_hf")
    summary = summarize(config, out)
    results = {
        "config": {**dataclasses.asdict(config), "arms": [dataclasses.asdict(a) for a in config.arms]},
        "base": base, "runs": runs, "summary": summary, "megatron_vs_hf": agreement,
        "commands": {"demo": command, "steps": runner.commands}, "reused_runs": runner.reused,
        "stage_seconds": runner.stage_seconds,
        "device": f"cpu ({torch.get_num_threads()} threads)", "torch_version": torch.__version__,
        "megatron_core_version": megatron.core.__version__,
    }
    results["wall_seconds"] = time.perf_counter() - t_start
    table = write_report(config, out, results)
    log("\n" + table)
    log(f"\nresults: {out / 'results.json'}; table: {out / 'table.md'}; "
        f"total wall time {results['wall_seconds']:.0f} s")
    return results
