"""The one-line user error and how an exception becomes one line."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """A mistake a user can fix (bad value, missing file, no GPU): Hydra prints only its message."""


def first_line(error: BaseException, most: int = 200) -> str:
    """The error's first line; a long one keeps its start and its end (where the cause is)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= most else f"{line[: most - 80]} ... {line[-75:]}"


class TrialPruned(Exception):
    """A search's pruner stopped this trial early: its run ends KILLED, tagged `pruned`, and the
    sweeper records the trial as pruned."""
