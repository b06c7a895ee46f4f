"""A search trial's side, in the job's process (in-process, a joblib worker or a submitit job):
after every epoch it reports the chosen metric to the study and stops the trial when the pruner
says so. The sweep callback joins the trial when the job starts (see sweeps.SweepCallback)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from cifar_exp.errors import TrialPruned, UserError
from cifar_exp.search import study

log = logging.getLogger(__name__)


@dataclass
class TrialLink:
    """Which trial of which study this job is: enough for a job in any process to find it."""

    storage: str
    study_name: str
    number: int  # the trial's number in the study, also the job's number (hydra.job.num)
    metric: str
    pruner: DictConfig
    epochs: float


_joined: TrialLink | None = None


def join(config: DictConfig) -> None:
    """Called as a job starts, with its full config: is the job a trial of a search?"""
    global _joined
    _joined = None
    if study.is_search(config) and config.hydra.sweeper.study_name:  # the sweeper names the study
        sweeper = config.hydra.sweeper
        _joined = TrialLink(
            str(sweeper.storage),
            str(sweeper.study_name),
            int(config.hydra.job.num),
            str(sweeper.metric),
            sweeper.pruner,
            float(config.trainer.epochs),
        )


def leave() -> None:
    global _joined
    _joined = None


class Reporter:
    """Reports a trial's metric after each epoch; raises TrialPruned when the pruner stops it."""

    def __init__(self, link: TrialLink) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = study.open_storage(link.storage)
        pruner = study.make_pruner(link.pruner, link.epochs)
        found = optuna.load_study(study_name=link.study_name, storage=storage, pruner=pruner)
        study_id = storage.get_study_id_from_name(link.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, link.number)
        self.trial = optuna.trial.Trial(found, trial_id)
        self.link = link

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        name = self.link.metric
        value = metric_value(metrics, name)
        self.trial.report(value, epoch)
        last = epoch >= self.link.epochs  # nothing left to save: the trial finishes
        if not last and self.trial.should_prune():
            log.info(f"trial {self.link.number} pruned after epoch {epoch}: {name} {value:.4f}")
            raise TrialPruned(f"after epoch {epoch} of {self.link.epochs:g}: {name} {value:.4f}")


def reporter() -> Reporter | None:
    """The current job's reporter, None outside a search."""
    return Reporter(_joined) if _joined else None


def objective(metrics: dict[str, Any]) -> float:
    """What the task returns to the sweeper: the search's metric (test/acc outside a search)."""
    return metric_value(metrics, _joined.metric if _joined else "test/acc")


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """`name`'s value in a run's metrics; one line listing what the run logs if it has none."""
    if name not in metrics:
        logged = ", ".join(sorted(k for k in metrics if not k.startswith("test/acc/")))
        raise UserError(
            f"hydra.sweeper.metric={name}: no run logs it; the run logs {logged}, test/acc/<class>"
        )
    return float(metrics[name])
