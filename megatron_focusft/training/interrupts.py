"""SIGINT / SIGTERM during training: a prompt exit that says what was saved or, with Megatron's
`--exit-signal-handler`, a checkpoint at the end of the iteration and then a normal exit.

Default: the first SIGINT or SIGTERM raises TrainingInterrupted in the main thread at once
(Python runs a handler between bytecodes, so a running C++ op finishes first); a save in
progress removes its partial directory on the way out (engine/checkpoint.py) and `pretrain`
prints one line naming the last complete checkpoint. The handlers then return to the defaults, so
a second signal ends the process whatever the cleanup is doing: an interrupted run never hangs.

`--exit-signal-handler` (SIGTERM, as a scheduler sends before its deadline): the handler only
records the signal; after each iteration every rank takes part in one MAX all-reduce of it
(`stop_requested`), so all ranks stop after the same iteration, save and return. SIGINT keeps
the default behaviour. Handlers are installed only in the main thread (the only one Python lets
handle signals) and restored on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(BaseException):
    """A signal ended the run. A BaseException, like KeyboardInterrupt: no `except Exception`
    on the way out swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal."""
        return 128 + self.signum


class SignalHandling:
    """Context manager for one training run (module doc). save_on_sigterm: `--exit-signal-handler`."""

    def __init__(self, save_on_sigterm: bool) -> None:
        self.save_on_sigterm = save_on_sigterm
        self.received: int | None = None  # the deferred SIGTERM, with save_on_sigterm
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalHandling:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in HANDLED}
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.save_on_sigterm and signum == signal.SIGTERM:
            self.received = signum
            return
        for handled in HANDLED:
            signal.signal(handled, signal.SIG_DFL)
        raise TrainingInterrupted(signum)

    def stop_requested(self, device: torch.device) -> bool:
        """Collective (every rank, after every iteration, with save_on_sigterm): whether any rank
        received SIGTERM."""
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
