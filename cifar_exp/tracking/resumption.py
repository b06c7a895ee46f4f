"""Whether a run may be resumed, decided from the store before anything is written to it: a
resume that cannot proceed says so in one line and leaves the run exactly as it was. And what the
resumed run must not record twice.

The rules: a FAILED run is not resumed (`rerun` trains its config again); a run whose lease another
live process holds is not resumed (leases.py: one writer per run); the config may differ from the
recorded one only in trainer.epochs (and mlflow.*, where it is recorded); a FINISHED run is
resumed only to train it further (more epochs than it ran), and its param trainer.epochs then
stays as first recorded, the new count going to the tag `resumed/trainer.epochs` (MLflow refuses
a changed param)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_exp.errors import UserError, first_line
from cifar_exp.tracking import leases
from cifar_exp.tracking.identity import flatten
from cifar_exp.tracking.store import tracking_uri

EPOCHS_TAG = "resumed/trainer.epochs"  # trainer.epochs of a run trained further than its param says
# besides mlflow.*: where the store is, not what is computed; trust: what `resume --trust` allows
MAY_CHANGE = ("trainer.epochs", "resume", "trust")


@dataclass
class Resume:
    """A resume that may proceed: the run to reopen, the tags to add, the metric points the store
    already holds past the checkpoint's step (recorded before a kill, not recorded again), the
    lease this process holds on the run, and the interruption tags it ends with if it finishes."""

    run_id: str
    tags: dict[str, str]
    recorded: set[tuple[str, int]]
    lease: leases.Lease
    interrupted: tuple[str, ...] = ()


def check(cfg: DictConfig, asked: str, run_id: str | None, progress: dict[str, Any]) -> Resume | None:
    """`asked` is what resume named (a run id or a checkpoint file), `run_id` and `progress` what
    its checkpoint holds. Raises UserError, one line, when the resume cannot proceed; reads the
    store, and writes only the run's lease, once it may proceed. None when there is no run to
    continue (tracking off, or a checkpoint written without it): training then goes into a new run."""
    if not cfg.mlflow.enabled or run_id is None:
        return None
    if not Path(asked).is_file() and asked != run_id:
        raise UserError(f"resume={asked}: its checkpoint belongs to run {run_id}; nothing was changed")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.mlflow)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise UserError(f"resume: run {run_id} is not in {uri} ({first_line(e)})") from None
    status, tags, params = run.info.status, run.data.tags, run.data.params
    nothing = "nothing was changed"
    if status == "FAILED":
        why = first_line(tags.get("error", "see its error tag"), most=120)
        raise UserError(
            f"run {run_id} FAILED ({why}): resume continues interrupted or finished runs only, "
            f"{nothing}; `cifar-exp rerun {run_id}` trains its config again in a new run"
        )
    leases.refuse_if_held(run_id, tags)
    if changed := changed_keys(cfg, params):
        shown = ", ".join(f"{k}={params[k]} -> {v}" for k, v in list(changed.items())[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(
            f"run {run_id} was recorded with another config ({shown}{more}): resume may change only "
            f"trainer.epochs, {nothing} (`cifar-exp resume {run_id}` starts from the recorded config; "
            f"`cifar-exp rerun {run_id} KEY=VALUE` trains another config in a new run)"
        )
    epochs, done = cfg.trainer.epochs, progress["epoch"] - 1  # epochs its checkpoint completed
    if status == "FINISHED" and epochs <= done:
        raise UserError(
            f"run {run_id} already FINISHED its {done} epoch(s), {nothing}; "
            f"trainer.epochs={done + 1} or more trains it further"
        )
    needed = progress["epoch"] if progress["epoch_step"] else done  # a started epoch is finished
    if epochs < needed:
        raise UserError(
            f"trainer.epochs={epochs} is fewer than the {needed} epoch(s) run {run_id} has begun, {nothing}"
        )
    added = {}
    if str(epochs) != params.get("trainer.epochs") or EPOCHS_TAG in tags:
        added[EPOCHS_TAG] = f"{epochs:g}"  # 2, 9.9: as a user types it
    recorded = recorded_after(client, run, progress["step"])
    interrupted = tuple(key for key in leases.INTERRUPTED_TAGS if key in tags)
    return Resume(run_id, added, recorded, leases.take(client, run_id), interrupted)


def changed_keys(cfg: DictConfig, params: dict[str, str]) -> dict[str, str]:
    """Config leaves whose value differs from the run's recorded param ({key: asked value}); keys
    the run did not record (added to the schema since) and those in MAY_CHANGE are not compared."""
    asked = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {
        key: value
        for key, value in asked.items()
        if key in params and params[key] != value and key not in MAY_CHANGE and not key.startswith("mlflow.")
    }


def recorded_after(client: Any, run: Any, step: int) -> set[tuple[str, int]]:
    """(metric, step) points of `run` at or past `step`: recorded before a kill that came after the
    checkpoint (the test split's metrics, logged at the last checkpoint's step once training is
    done, included). Training them again records only those missing."""
    points = set()
    for key in run.data.metrics:
        points |= {(key, m.step) for m in client.get_metric_history(run.info.run_id, key) if m.step >= step}
    return points


def recorded_epochs(uri: str, run_id: str) -> float | None:
    """The epochs a resume trained `run_id` to, where that differs from its recorded config (which
    stays as first recorded, like its params)."""
    from mlflow.tracking import MlflowClient

    epochs = MlflowClient(uri).get_run(run_id).data.tags.get(EPOCHS_TAG)
    return float(epochs) if epochs else None
