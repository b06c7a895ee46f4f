"""What identifies a run: its params (the flattened config), its name, the code's git state, the
hash of what it computes; and finding earlier runs: the same config in a re-run sweep, the
checkpoint of a run to resume, the sweep a job belongs to."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError
from cifar_exp.tracking.store import PROJECT_ROOT, tracking_uri

HASH_TAG = "config_hash"
CHECKPOINT_TAG = "checkpoint"
_sweep: dict[str, str | None] = {"parent": None}  # this process's sweep parent run, set by the callback


def join_sweep(parent_run_id: str | None) -> None:
    """Runs opened from now on in this process are children of `parent_run_id` (None: of no sweep).
    Set by the sweep callback in the process that runs the jobs, whichever launcher started it."""
    _sweep["parent"] = parent_run_id


def sweep_parent() -> str | None:
    return _sweep["parent"]


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Every leaf of a config as a dotted key: {'model.conv1_out': '6', ...}."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        return {prefix.rstrip("."): json.dumps(node)}
    else:
        return {prefix.rstrip("."): str(node)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_name(overrides: list[str]) -> str:
    """Readable and deterministic: 'conv1_out=32,lr=0.01' from the overrides, else 'default'."""
    parts = []
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key.startswith(("mlflow.", "hydra.")):
            continue
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ",".join(parts) or "default"


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the project's checkout, ('unknown', None) outside git. Read once per
    process: that is the code running, and the jobs of an in-process sweep all report it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def config_hash(cfg: DictConfig) -> str:
    """Identifies what a run computes: the resolved config without `resume` and `mlflow`."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "mlflow"):
        resolved.pop(key, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class PreviousRun:
    run_id: str
    status: str
    metrics: dict[str, float]
    checkpoint: str | None


def previous_run(cfg: DictConfig) -> PreviousRun | None:
    """In a sweep, the earlier run of this same config: a FINISHED one (the job is skipped and
    linked to this sweep's parent), else an interrupted one with a checkpoint (it is resumed and
    moved under this sweep's parent). None outside sweeps, with tracking off or resume set."""
    parent = sweep_parent()
    if not parent or not cfg.mlflow.enabled or cfg.resume:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg.mlflow))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.{HASH_TAG} = '{config_hash(cfg)}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if run.info.status == "FINISHED":
            client.set_tag(parent, f"linked/{run.info.run_id}", "finished in an earlier sweep")
            return PreviousRun(run.info.run_id, "FINISHED", dict(run.data.metrics), None)
    for run in runs:
        path = run.data.tags.get(CHECKPOINT_TAG)
        if run.info.status in ("KILLED", "RUNNING") and path and Path(path).is_file():
            client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
            return PreviousRun(run.info.run_id, run.info.status, dict(run.data.metrics), path)
    return None


def checkpoint_path(ref: str, cfg: TrackingConfig | None = None) -> Path:
    """`ref` is a checkpoint file, or an MLflow run id whose `checkpoint` tag names one."""
    if Path(ref).is_file():
        return Path(ref)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg or TrackingConfig())
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
