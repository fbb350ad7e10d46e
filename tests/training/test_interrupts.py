"""Signals during training, as a reliability tester sends them: kill -9 at random moments of
checkpoint saves, SIGINT during a save, SIGTERM with --exit-signal-handler. After each, no process
the trainer started may survive it, and `--load` must continue the uninterrupted loss curve
exactly.

Each trainer is a child forked from a forkserver that imported torch and megatron-core once (a
fresh interpreter costs ~10 s), with a token in its environment: every process it starts
inherits the token, so a survivor is found by the token whatever its parent became.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megatron_focusft.engine.checkpoint import iteration_dir, latest_checkpoint
from megatron_focusft.training.arguments import parse_training_args
from megatron_focusft.training.pretrain import pretrain

# 10 iterations: the kills target saves up to iteration 5 (2 + 1 + 2 saves past the committed
# one), and the run must outlast the random wait after each (an idle machine finished 5 iterations
# inside it, so the kill found the trainer gone with exit code 0).
ARGV = ["--mock-data", "--train-iters", "10", "--seq-length", "64", "--micro-batch-size", "1",
        "--lr", "5e-4", "--lr-warmup-iters", "1"]
TOKEN_VARIABLE = "FOCUSFT_TEST_TRAINER"
PRELOAD = ["megatron_focusft.training.pretrain", "megatron_focusft.engine.train_step",
           "megatron_focusft.engine.pipeline",
           "megatron_focusft.training.starting_point", "megatron_focusft.training.data_source",
           "megatron_focusft.analysis.attention_metrics", "megatron_focusft.patches.cpu"]
WAIT_S = 300  # a generous bound for a loaded CI machine; the runs take seconds when idle
EXIT_S = 20  # the bound on leaving after SIGINT ("within a few seconds" on an idle machine)


def _trainer(argv: list[str], token: str, log: str) -> None:
    """In a forked child: the entry point, with its output in `log`."""
    os.environ[TOKEN_VARIABLE] = token
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from megatron_focusft.training.pretrain import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


@pytest.fixture(scope="module")
def uninterrupted() -> list[float]:
    return pretrain(parse_training_args(ARGV))["losses"]


def _assert_no_survivors(token: str, what: str) -> None:
    """No process carries the trainer's token; any that does is named, then killed."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get(TOKEN_VARIABLE) == token:
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])[:200]}")
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    assert not found, f"{what}: processes outlived the trainer: {found}"


def _iteration_dirs(save_dir: Path) -> dict[int, tuple[int, int]]:
    """iteration -> (inode, ctime) of each iteration directory: a save's directory is new."""
    found = {}
    for path in save_dir.glob("iter_*") if save_dir.is_dir() else ():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found[int(path.name.removeprefix("iter_"))] = (stat.st_ino, stat.st_ctime_ns)
    return found


class Trainer:
    """One trainer child and what it wrote."""

    def __init__(self, context, argv: list[str], save_dir: Path, log: Path) -> None:
        self.token, self.log, self.save_dir = uuid.uuid4().hex, log, save_dir
        self.dirs_before = _iteration_dirs(save_dir)  # leftovers of killed trainers included
        self.process = context.Process(target=_trainer, args=(argv, self.token, str(log)))
        self.process.start()

    def wait_for(self, condition, what: str):
        """Poll `condition` until it returns something true, and return that value (read once:
        the trainer may change the directory again right after)."""
        deadline = time.monotonic() + WAIT_S
        while not (value := condition()):
            assert self.process.is_alive(), f"the trainer exited before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s:\n{self.output()}"
            time.sleep(0.005)
        return value

    def wait_for_a_save_to_start(self, minimum: int = 1) -> int:
        """The iteration (>= minimum) of a save this trainer has begun: rank 0 creates its
        directory first."""
        def started() -> list[int]:
            return [i for i, identity in _iteration_dirs(self.save_dir).items()
                    if i >= minimum and self.dirs_before.get(i) != identity]

        return max(self.wait_for(started, "save"))

    def signal(self, signum: int) -> float:
        """Send `signum` and wait for the exit; returns the seconds it took."""
        t0 = time.monotonic()
        os.kill(self.process.pid, signum)
        self.process.join(WAIT_S)
        return time.monotonic() - t0

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _resume_to_the_end(save_dir: Path) -> dict:
    return pretrain(parse_training_args([*ARGV, "--save", str(save_dir), "--save-interval", "1",
                                         "--load", str(save_dir)]))


def test_kill_9_during_saves_leaves_no_process_and_the_run_resumes_exactly(forkserver, uninterrupted, tmp_path):
    save_dir = tmp_path / "ckpt"
    argv = [*ARGV, "--save", str(save_dir), "--save-interval", "1", "--load", str(save_dir)]
    rng = random.Random(16)
    # In the trainer's first or second save (so that the run moves on between kills).
    for kill, nth_save in enumerate((2, 1, 2)):
        committed = latest_checkpoint(save_dir)[0] or 0
        trainer = Trainer(forkserver, argv, save_dir, tmp_path / f"kill{kill}.log")
        trainer.wait_for_a_save_to_start(minimum=committed + nth_save)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the save (or just after it)
        trainer.signal(signal.SIGKILL)
        assert trainer.process.exitcode == -signal.SIGKILL
        time.sleep(0.5)  # an orphan would be re-parented and still running
        _assert_no_survivors(trainer.token, f"kill {kill}")
    resumed = _resume_to_the_end(save_dir)
    assert resumed["start_iteration"] >= 1
    assert resumed["losses"] == uninterrupted[resumed["start_iteration"]:]


def test_sigint_during_a_save_and_sigterm_with_exit_signal_handler(forkserver, uninterrupted, tmp_path):
    save_dir = tmp_path / "ckpt"
    argv = [*ARGV, "--save", str(save_dir), "--save-interval", "1", "--load", str(save_dir)]
    # SIGINT while a save is being written: out within seconds, one line saying what is saved,
    # the interrupted save's directory gone.
    trainer = Trainer(forkserver, argv, save_dir, tmp_path / "sigint.log")
    saving = trainer.wait_for_a_save_to_start(minimum=2)  # after a first checkpoint
    seconds = trainer.signal(signal.SIGINT)
    assert trainer.process.exitcode == 128 + signal.SIGINT
    assert seconds < EXIT_S
    latest = latest_checkpoint(save_dir)[0]
    lines = [line for line in trainer.output().splitlines() if line.startswith("interrupted by SIGINT")]
    assert lines == [f"interrupted by SIGINT while saving iteration {saving} (that save "
                     f"{'completed' if latest == saving else 'was discarded'}): the latest checkpoint in {save_dir} "
                     f"is iteration {latest}"], trainer.output()
    assert "Traceback" not in trainer.output()
    assert latest == saving or not iteration_dir(save_dir, saving).exists()
    _assert_no_survivors(trainer.token, "SIGINT")

    # --exit-signal-handler: SIGTERM lets the iteration finish, saves it and exits normally.
    trainer = Trainer(forkserver, [*argv, "--exit-signal-handler"], save_dir, tmp_path / "sigterm.log")
    trainer.wait_for(lambda: "iteration " in trainer.output() and "lm loss" in trainer.output(), "iteration")
    trainer.signal(signal.SIGTERM)
    assert trainer.process.exitcode == 0, trainer.output()
    stopped = [line for line in trainer.output().splitlines() if line.startswith("SIGTERM received")]
    latest = latest_checkpoint(save_dir)[0]
    assert stopped == [f"SIGTERM received: stopping after iteration {latest}; the latest checkpoint in {save_dir} is "
                       f"iteration {latest}"], trainer.output()
    _assert_no_survivors(trainer.token, "SIGTERM")

    resumed = _resume_to_the_end(save_dir)
    assert resumed["start_iteration"] == latest
    assert resumed["losses"] == uninterrupted[latest:]
