"""Reading the exceptions that torch's distributed checkpointing and megatron-core wrap.

torch's CheckpointException (a BaseException) carries each failing rank's exception in
`failures`, and its DCP helpers catch BaseException, so even a KeyboardInterrupt raised by a
signal handler can come back wrapped in one. These helpers look through the wrapping.
"""

from __future__ import annotations

from collections.abc import Iterator


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, its causes and contexts, and the per-rank failures of a CheckpointException."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]


def wrapped_interrupt(error: BaseException) -> BaseException | None:
    """The interruption (KeyboardInterrupt, SystemExit, a signal raised as an exception: any
    BaseException that is not an Exception, other than CheckpointException itself) inside
    `error`, or None."""
    from torch.distributed.checkpoint import CheckpointException

    return next((part for part in exception_chain(error)
                 if not isinstance(part, (Exception, CheckpointException))), None)


def short_error(error: BaseException) -> str:
    """One line for an exception: the innermost cause (the first failing rank's, for torch's
    CheckpointException, whose text is every rank's traceback), its type and first line."""
    current = error
    while True:
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict) and failures:
            pair = next(iter(failures.values()))
            current = pair[0] if isinstance(pair, tuple) else pair
        elif current.__cause__ is not None:
            current = current.__cause__
        else:
            break
    lines = str(current).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(current).__name__}: {text[:400]}" if text else type(current).__name__
