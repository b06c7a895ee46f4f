"""A search trial's side, in the job's process (in-process, a joblib worker or a submitit job):
after every epoch (or `reports_per_epoch` times an epoch) it reports the chosen metric (val/acc
by default) to the study and stops the trial when the pruner says so. The sweep callback hands
the job its trial as it starts (see sweeps.SweepCallback)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from cifar_exp.errors import TrialPruned, UserError
from cifar_exp.search import study
from cifar_exp.tracking import identity, leases

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
    reports_per_epoch: int


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
        pruner = study.make_pruner(link.pruner, link.epochs, link.reports_per_epoch)
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


def earlier_run(cfg: DictConfig, context: identity.JobContext) -> identity.PreviousRun | None:
    """A sweep job's earlier run (identity.previous_run); a search trial's is its own earlier
    child, found by its number under the search's parent run (previous_trial_run)."""
    parent = context.parent_run_id
    if context.trial is None:
        return identity.previous_run(cfg, parent)
    if (store := identity.store_of(cfg, parent)) is None:
        return None
    return previous_trial_run(*store, parent, context.trial.number, identity.config_hash(cfg))


def previous_trial_run(
    client: Any, experiment_id: str, parent: str, trial: int, hashed: str
) -> identity.PreviousRun | None:
    """A search trial's earlier child: the study runs a trial again when a killed controller never
    recorded how it ended, and the trial must keep one child. Its FINISHED child stands (not
    trained again), a pruned one is pruned again, one with a checkpoint is resumed; any other
    (killed before its first checkpoint, or failed) is deleted (MLflow keeps it restorable) and the
    trial trains again from its first step into a new child: continuing it in place could lack
    the params and files of a run killed as it opened. One line, and nothing deleted, if another
    live process still writes one. Children recorded before identity.TRIAL_TAG are found by config."""
    found = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.{identity.HASH_TAG} = '{hashed}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    mine = [r for r in found if r.data.tags.get(identity.TRIAL_TAG, str(trial)) == str(trial)]
    kept = next((r for r in mine if r.info.status == "FINISHED"), None)
    kept = kept or next((r for r in mine if identity.PRUNED_TAG in r.data.tags), None)
    kept = kept or next((r for r in mine if identity.resumable(r)), None)
    replaced = [r for r in mine if r is not kept]
    for run in replaced:  # all checked before any is deleted
        if run.info.status == "RUNNING":
            leases.refuse_if_held(run.info.run_id, run.data.tags)
    for run in replaced:
        if run.info.status == "RUNNING":  # its process is gone: it never ended it
            client.set_terminated(run.info.run_id, "KILLED")
        client.set_tag(run.info.run_id, "replaced", f"trial {trial} trained again in a new child")
        client.delete_run(run.info.run_id)
    if kept is None:
        return None
    tags = kept.data.tags
    path = tags.get(identity.CHECKPOINT_TAG) if identity.resumable(kept) else None
    run_id, status, metrics = kept.info.run_id, kept.info.status, dict(kept.data.metrics)
    return identity.PreviousRun(run_id, status, metrics, path, tags.get(identity.PRUNED_TAG))
