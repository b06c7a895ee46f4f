"""What identifies a run: its params (the flattened config), its overrides, the code's git state
(commit, dirty flag and the uncommitted diff), the hash of what it computes; and finding earlier
runs: the same config in a re-run sweep, the checkpoint of a run to resume (its name: run_names.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError
from cifar_exp.tracking.store import PROJECT_ROOT, tracking_uri

LINK_PREFIX = "linked/"  # a later sweep's tag per finished run it took over (previous_run)

if TYPE_CHECKING:
    from cifar_exp.search.trial import TrialLink

HASH_TAG = "config_hash"
CHECKPOINT_TAG = "checkpoint"
PRUNED_TAG = "pruned"  # a search's pruner stopped the run early (its status: KILLED); says when
TRIAL_TAG = "search/trial"  # a search trial's child: the trial's number in the study (one child each)
DIFF_ARTIFACT = "code/uncommitted.diff"  # `git diff HEAD` of a dirty checkout, beside the run


@dataclass(frozen=True)
class JobContext:
    """What a job of a sweep is handed (by sweeps.SweepCallback as the job starts) and passes on as
    an argument: the parent run its run goes under, the keys the sweep varies (they name its run),
    the store the sweep records in (a job started elsewhere may not inherit it), its search trial."""

    parent_run_id: str | None = None
    swept_keys: tuple[str, ...] = ()
    store_uri: str | None = None
    trial: TrialLink | None = None


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Every leaf of a config as a dotted key: {'model.conv1_out': '6', ...}."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): json.dumps(node) if isinstance(node, list) else str(node)}
    out: dict[str, str] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _git(*args: str, strip: bool = True) -> str:
    out = subprocess.run(
        ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return out.strip() if strip else out


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the project's checkout, ('unknown', None) outside git. Read once per
    process: that is the code running, and the jobs of an in-process sweep all report it."""
    try:
        return _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


@functools.lru_cache(maxsize=1)
def uncommitted_diff() -> str:
    """The checkout's uncommitted changes to tracked files (`git diff HEAD --binary`: what
    `git apply` needs to restore them on the commit), '' when clean or outside git. Read once
    per process, like git_state."""
    try:
        return _git("diff", "HEAD", "--binary", strip=False)
    except (OSError, subprocess.SubprocessError):
        return ""


def code_files() -> dict[str, str]:
    """The uncommitted diff (DIFF_ARTIFACT) when the checkout is dirty, so `git checkout
    <git_commit> && git apply uncommitted.diff` restores the code that ran; else nothing. Asked
    for from the record writer's thread as the run opens, never on the training path."""
    if not git_state()[1] or not (diff := uncommitted_diff()):
        return {}
    return {DIFF_ARTIFACT: diff}


def config_hash(cfg: DictConfig) -> str:
    """Identifies what a run computes: the resolved config without `resume`, `mlflow` and `trust`."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "mlflow", "trust"):
        resolved.pop(key, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class PreviousRun:
    run_id: str
    status: str
    metrics: dict[str, float]
    checkpoint: str | None
    pruned: str | None = None  # a search trial's child its pruner stopped: when (its `pruned` tag)


def store_of(cfg: DictConfig, parent: str | None) -> tuple[Any, str] | None:
    """(client, experiment id) where a sweep's job (`parent`: its parent run) looks for its
    earlier run; None outside sweeps, with tracking off or resume set, or before the experiment."""
    if not parent or not cfg.mlflow.enabled or cfg.resume:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg.mlflow))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return (client, experiment.experiment_id) if experiment is not None else None


def previous_run(cfg: DictConfig, parent: str | None) -> PreviousRun | None:
    """In a sweep (`parent`: its parent run), the earlier run of this same config: a FINISHED one
    (the job is skipped and linked to this sweep's parent), else an interrupted one with a
    checkpoint (it is resumed and moved under the parent). A search trial's is found by its number
    instead (search.trial.previous_child)."""
    if (store := store_of(cfg, parent)) is None:
        return None
    client, experiment_id = store
    runs = client.search_runs(
        [experiment_id],
        f"tags.{HASH_TAG} = '{config_hash(cfg)}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if run.info.status == "FINISHED":
            client.set_tag(parent, f"{LINK_PREFIX}{run.info.run_id}", "finished in an earlier sweep")
            return PreviousRun(run.info.run_id, "FINISHED", dict(run.data.metrics), None)
    for run in runs:
        if resumable(run):
            client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
            path = run.data.tags[CHECKPOINT_TAG]
            return PreviousRun(run.info.run_id, run.info.status, dict(run.data.metrics), path)
    return None


def resumable(run: Any) -> bool:
    """Interrupted (not pruned) with a checkpoint file on this machine to resume from."""
    path = run.data.tags.get(CHECKPOINT_TAG)
    interrupted = run.info.status in ("KILLED", "RUNNING") and PRUNED_TAG not in run.data.tags
    return bool(interrupted and path and Path(path).is_file())


def checkpoint_path(ref: str, cfg: TrackingConfig) -> Path:
    """`ref` is a checkpoint file, or an MLflow run id whose `checkpoint` tag names one."""
    if Path(ref).is_file():
        return Path(ref)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    try:
        run = MlflowClient(uri).get_run(ref)
    except MlflowException:
        raise UserError(f"resume={ref}: neither a checkpoint file nor a run in {uri}") from None
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise UserError(
            f"run {ref} recorded no checkpoint (trainer.checkpoint=false, or it never finished an epoch)"
        )
    return Path(path)
