"""The one-line user error and how an exception becomes one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import CompactHydraException

RunAndReport = Callable[[Callable[[], Any]], Any]  # calls the function it is given, reporting its errors


class UserError(CompactHydraException):
    """A mistake a user can fix (bad value, missing file, no GPU): Hydra prints only its message."""


def first_line(error: BaseException, most: int = 200) -> str:
    """The error's first line; a long one keeps its start and its end (where the cause is)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= most else f"{line[: most - 80]} ... {line[-75:]}"


class TrialPruned(Exception):
    """A search's pruner stopped this trial early: its run ends KILLED, tagged `pruned`, and the
    sweeper records the trial as pruned."""


def compact_message(error: CompactHydraException) -> str:
    """Hydra's compose error and its cause as one line: "Error merging override
    hydra.sweeper.pruner.name=x: Invalid value 'x', expected one of [hyperband, ...]" (the cause's
    full_key/object_type lines left out; a list of available options joined onto the line)."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    message = message.split(" Config search path:")[0]  # where Hydra looked: not the user's mistake
    if type(error.__cause__).__module__.startswith("omegaconf"):  # None's is builtins
        message = f"{message}: {first_line(error.__cause__)}"
    return message


def report_in_one_line(run_and_report: RunAndReport) -> RunAndReport:
    """Hydra's run_and_report, with its user errors (compose-time mistakes, UserError) printed as
    one line on stderr and exit status 1, instead of several lines and a HYDRA_FULL_ERROR hint.
    HYDRA_FULL_ERROR=1 still shows the traceback; other errors go to Hydra as before."""

    def report(func: Callable[[], Any]) -> Any:
        def one_line() -> Any:
            try:
                return func()
            except CompactHydraException as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(compact_message(e), file=sys.stderr)
                sys.exit(1)

        return run_and_report(one_line)

    return report
