"""The front door: `python -m cifar_exp [overrides]` trains; `cifar-exp ui|compare|runs|rerun|resume|
predict` use what MLflow recorded, `cifar-exp sync` what it could not record. Bad input ends in one
line on stderr and a non-zero exit (HYDRA_FULL_ERROR=1 shows the traceback)."""

from __future__ import annotations

import os
import sys

from hydra import version
from omegaconf import DictConfig

from cifar_exp import console, help_text, signals
from cifar_exp.config import CONF_DIR, register_schemas
from cifar_exp.errors import report_in_one_line
from cifar_exp.hydra_private import run_command_line
from cifar_exp.sweeps import Job
from cifar_exp.tracking import store
from cifar_exp.tracking.identity import JobContext

COMMANDS = ("ui", "compare", "runs", "rerun", "resume", "predict", "sync")
help_text.register()  # --help: conf/config.yaml's hydra.help.template calls it
register_schemas()


def train(cfg: DictConfig, context: JobContext | None = None, tags: dict[str, str] | None = None) -> float:
    """The task function: trains one composed config (`context`: its sweep and trial, if any);
    returns what a sweeper maximises. Preempted under submitit, the run checkpoints and ends
    KILLED, then submitit requeues the job, which resumes into the same run."""
    from cifar_exp.run import run
    from cifar_exp.search import trial

    signals.hold_preemption()
    try:  # val/acc, or the metric a search optimises
        return trial.objective(run(cfg, tags, context), context.trial if context else None)
    except signals.Preempted as stop:
        stop.requeue()  # exits
        raise


def hydra_main(argv: list[str], tags: dict[str, str] | None = None) -> None:
    """Hydra's command line (overrides, -m, --help, --config-dir, ...) on `argv`, as @hydra.main
    does on sys.argv; `tags` go on every run it opens."""
    version.setbase("1.3")

    def task(cfg: DictConfig, context: JobContext | None) -> float:
        return train(cfg, context, tags)

    run_command_line(argv, Job(task), str(CONF_DIR), "config")


def main() -> None:
    # Your own modules (model._target_=mynets.Tiny) are found in the folder you run from, by the
    # `cifar-exp` script as by `python -m cifar_exp` (which puts it on the path itself).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    signals.install()
    store.limit_http_retries()
    console.quiet_mlflow()  # before MLflow is first imported
    try:
        if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
            from cifar_exp import commands

            sys.exit(commands.dispatch(sys.argv[1], sys.argv[2:], hydra_main))
        # one line for a mistake also where Hydra reports none itself: --help composing a bad override
        report_in_one_line(lambda run: run())(lambda: hydra_main(sys.argv[1:]))
    except KeyboardInterrupt as e:
        terminated = isinstance(e, signals.Terminated)
        print("terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(143 if terminated else 130)


if __name__ == "__main__":
    main()
