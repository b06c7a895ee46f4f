"""Ctrl-C and SIGTERM: outside the training loop they stop the process at once; inside it the
current step finishes, a checkpoint is written, and then the run stops. A second signal always
stops at once."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so runs end KILLED and the process exits 143."""


_pending: BaseException | None = None
_deferring = False


def _handler(signum: int, frame: object) -> None:
    global _pending
    stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if not _deferring or _pending is not None:
        raise stop
    _pending = stop
    print(
        "stopping after this step: writing a checkpoint (signal again to stop at once)",
        file=sys.stderr,
        flush=True,
    )


def install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def take() -> BaseException | None:
    """The stop a signal asked for while deferring, if any, cleared (cheap: read once per step)."""
    global _pending
    stop, _pending = _pending, None
    return stop


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within this block a first signal is only recorded, for the loop to take() and act on."""
    global _deferring, _pending
    _deferring, _pending = True, None
    try:
        yield
    finally:
        _deferring = False
        if _pending is not None:  # asked for, but the loop ended before acting on it
            stop, _pending = _pending, None
            raise stop
