"""Every use of Hydra's (and OmegaConf's) private API, in this one module, each with its reason;
tests/test_hydra_private.py fails if Hydra changes what we rely on. Importing it makes Hydra
print user errors in one line."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import hydra._internal.utils
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf.errors import ValidationError

from cifar_exp.errors import report_in_one_line


def run_command_line(argv: list[str], task: Callable[[Any], Any], config_path: str, config_name: str) -> None:
    """Hydra's command line (overrides, -m, --help, --config-dir, ...) on `argv`, as @hydra.main does
    on sys.argv: @hydra.main reads only sys.argv, and our subcommands (rerun, resume) pass their own."""
    parser = hydra._internal.utils.get_args_parser()  # private: the parser @hydra.main builds
    args = parser.parse_args(argv)
    # private: what @hydra.main calls; Hydra names the job after the task function's module
    hydra._internal.utils._run_hydra(
        args=args, args_parser=parser, task_function=task, config_path=config_path, config_name=config_name
    )


def job_error(job: JobReturn) -> BaseException | None:
    """The exception a failed job raised; None if it completed. Read without Hydra's public
    `return_value`, which prints "Error executing job with overrides: [...]" before raising it."""
    return None if job.status == JobStatus.COMPLETED else job._return_value  # private: no print


def _one_line_return_value(job: JobReturn) -> Any:
    """JobReturn.return_value, with a job's user error raised without Hydra's "Error executing job
    with overrides" line first (HYDRA_FULL_ERROR=1: as Hydra does)."""
    error = job_error(job)
    if isinstance(error, CompactHydraException) and os.environ.get("HYDRA_FULL_ERROR") != "1":
        raise error
    return _hydra_return_value(job)


# Hydra reports a failed run or sweep through this property (run(), BasicSweeper): ours keeps a
# user error raised inside a job to one line, as compose-time ones are
_hydra_return_value = JobReturn.return_value.fget
JobReturn.return_value = property(_one_line_return_value, JobReturn.return_value.fset)  # type: ignore[method-assign]
# _run_hydra reports errors through this module-level function: ours prints user errors in one line
hydra._internal.utils.run_and_report = report_in_one_line(hydra._internal.utils.run_and_report)


def strict_bools() -> None:
    """A bool key takes true or false, nothing else: OmegaConf reads any int as a bool (`trainer.
    flip=-1` is true, 0 false) and yes/no/on/off as words for them, so a typo or a number meant for
    another key would pass silently. Its BooleanNode is the one place every bool is converted
    (overrides, YAML, experiments), at compose time; a refusal there reads as Hydra's one line
    ("Error merging override trainer.flip=-1: ..."). Private: OmegaConf has no public hook for a
    node type's conversion. Pinned by tests/test_bad_values.py and tests/test_hydra_private.py."""
    from omegaconf.nodes import BooleanNode

    convert = BooleanNode._validate_and_convert_impl
    if getattr(convert, "strict", False):
        return

    @functools.wraps(convert)
    def strict(self: BooleanNode, value: Any) -> bool:
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
            return convert(self, value)
        raise ValidationError("Value '$VALUE' is not a bool (type $VALUE_TYPE); use true or false")

    strict.strict = True  # type: ignore[attr-defined]
    BooleanNode._validate_and_convert_impl = strict


def full_key(node: Any) -> str:
    """Where a config node sits in the config it was composed into ("model", "trainer.lr"); "" for
    a free node or a plain value. Private: OmegaConf keeps a node's parent but has no public way to
    name its path. Pinned by tests/test_hydra_private.py."""
    try:
        return str(node._get_full_key(None))
    except AttributeError:
        return ""
