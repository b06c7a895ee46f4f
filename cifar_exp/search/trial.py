"""A search trial's side, in the job's process (in-process, a joblib worker or a submitit job):
after every epoch (or `reports_per_epoch` times an epoch) it reports the chosen metric (val/acc
by default) to the study and stops the trial when the pruner says so. The sweep callback hands
the job its trial as it starts (see sweeps.SweepCallback)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from cifar_exp.errors import TrialPruned, UserError
from cifar_exp.search import study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialLink:
    """Which trial of which study this job is: enough for a job in any process to find it."""

    storage: str
    study_name: str
    number: int  # the trial's number in the study, also the job's number (hydra.job.num)
    metric: str
    pruner: DictConfig
    epochs: float
    reports_per_epoch: int = 1

    @property
    def reports(self) -> int:
        """The reports a trial that is never pruned makes: the pruner's whole budget."""
        return math.ceil(self.epochs) * self.reports_per_epoch


def link(config: DictConfig) -> TrialLink | None:
    """The trial a job is, from its full config (the sweeper names the study in each trial's
    overrides); None outside a search."""
    if not study.is_search(config) or not config.hydra.sweeper.study_name:
        return None
    sweeper = config.hydra.sweeper
    return TrialLink(
        str(sweeper.storage),
        str(sweeper.study_name),
        int(config.hydra.job.num),
        str(sweeper.metric),
        sweeper.pruner,
        float(config.trainer.epochs),
        int(sweeper.reports_per_epoch),
    )


class Reporter:
    """Reports a trial's metric after each epoch; raises TrialPruned when the pruner stops it."""

    def __init__(self, link: TrialLink) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = study.open_storage(link.storage)
        pruner = study.make_pruner(link.pruner, link.reports)  # its steps are reports
        found = optuna.load_study(study_name=link.study_name, storage=storage, pruner=pruner)
        study_id = storage.get_study_id_from_name(link.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, link.number)
        self.trial = optuna.trial.Trial(found, trial_id)
        self.link = link

    def __call__(self, report: int, metrics: dict[str, float], last: bool) -> None:
        """Report number `report` (1-based; at an epoch's end, epoch x reports_per_epoch); `last`:
        the trial's end, never pruned (nothing left to save)."""
        name = self.link.metric
        value = metric_value(metrics, name)
        self.trial.report(value, report)
        if not last and self.trial.should_prune():
            epochs = report / self.link.reports_per_epoch
            log.info(f"trial {self.link.number} pruned after epoch {epochs:g}: {name} {value:.4f}")
            raise TrialPruned(f"after epoch {epochs:g} of {self.link.epochs:g}: {name} {value:.4f}")


def objective(metrics: dict[str, Any], trial: TrialLink | None) -> float:
    """What the task returns to the sweeper: the search's metric (val/acc outside a search)."""
    return metric_value(metrics, trial.metric if trial else "val/acc")


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """`name`'s value in a run's metrics; a val/ metric of a run without a validation split
    (dataset.val_size=0) is its test/ metric (the search then chooses on the test split, and its
    summary says so); one line listing what the run logs if it has neither."""
    from cifar_exp.evaluation import chosen_metric

    name = chosen_metric(name, [metrics])
    if name not in metrics:
        logged = ", ".join(sorted(k for k in metrics if not k.startswith("test/acc/")))
        raise UserError(
            f"hydra.sweeper.metric={name}: no run logs it; the run logs {logged}, test/acc/<class>"
        )
    return float(metrics[name])
