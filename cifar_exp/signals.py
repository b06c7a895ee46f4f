"""Ctrl-C and SIGTERM: outside the training loop they stop the process at once; inside it the
current step finishes, a checkpoint is written, and then the run stops. A second signal always
stops at once. Under submitit (SLURM) the cluster's preemption or time-limit signal does the same,
then hands the job back to submitit, which requeues it (see hold_preemption)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so runs end KILLED and the process exits 143."""


class Preempted(KeyboardInterrupt):
    """The cluster's preemption or time-limit signal under submitit: raised like Ctrl-C, so the run
    checkpoints and ends KILLED; then requeue() runs submitit's own handler of the signal."""

    def __init__(self, signum: int, handler: Callable[[int, Any], Any]) -> None:
        super().__init__(f"preempted ({signal.Signals(signum).name})")
        self.signum, self.handler = signum, handler

    def requeue(self) -> None:
        """submitit's handler: re-pickles the job, requeues it (scontrol requeue on SLURM; exit
        code 144 under submitit_local, whose controller starts it again) and exits."""
        self.handler(self.signum, None)


_pending: BaseException | None = None
_deferring = False


def _stop(stop: BaseException) -> None:
    """Raises `stop` now, or while deferring records it for the loop (a second one: now)."""
    global _pending
    if not _deferring or _pending is not None:
        raise stop
    _pending = stop
    print(
        "stopping after this step: writing a checkpoint (signal again to stop at once)",
        file=sys.stderr,
        flush=True,
    )


def _handler(signum: int, frame: object) -> None:
    _stop(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def hold_preemption() -> None:
    """Under submitit, whose handler of the preemption signal ($SUBMITIT_PREEMPT_SIGNAL, USR2 by
    default) would requeue the job at once, mid-step, with the run ending FAILED: that signal now
    stops training like SIGTERM (finish the step, checkpoint, end the run KILLED) and raises
    Preempted, whose requeue() then calls submitit's handler. Elsewhere (no Python handler owns
    the signal, or not the main thread) it does nothing."""
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if signum is None or threading.current_thread() is not threading.main_thread():
        return
    owner = signal.getsignal(signum)
    if not callable(owner) or getattr(owner, "held_by_cifar_exp", False):
        return

    def preempted(signum: int, frame: object) -> None:
        _stop(Preempted(signum, owner))

    preempted.held_by_cifar_exp = True
    signal.signal(signum, preempted)


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
        if (stop := take()) is not None:  # asked for, but the loop ended before acting on it
            raise stop
