"""A run's lifecycle: open it (or reopen it to continue), record what the runner hands over
(numbers and files), end it FINISHED, FAILED (error as a tag) or KILLED."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import TrialPruned, first_line
from cifar_exp.run_names import run_name
from cifar_exp.tracking import leases
from cifar_exp.tracking.identity import (
    HASH_TAG,
    PRUNED_TAG,
    JobContext,
    code_files,
    config_hash,
    flatten,
    git_state,
    task_overrides,
)
from cifar_exp.tracking.records import UNRECORDED_METRICS, Files, Opener, RecordWriter
from cifar_exp.tracking.resumption import Resume
from cifar_exp.tracking.store import check_store, ensure_experiment, local_store_folder, tracking_uri

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config/config.yaml"


class Untracked:
    """The run's handle with tracking off (mlflow.enabled=false): the RecordWriter calls the runner
    makes whether or not the run is `enabled`, doing nothing."""

    enabled = False

    def wait_open(self) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def set_checkpoint(self, path: Path) -> None: ...


def run_tags(
    cfg: DictConfig, device: str, gpus: int, folder: Path | None, parent: str | None
) -> dict[str, str]:
    """What a new run is tagged with: overrides, device, config hash, output folder, sweep (the
    code's git state is added when the run opens)."""
    tags = {
        "overrides": json.dumps(task_overrides()),
        "device": device,
        "gpus": str(gpus),
        HASH_TAG: config_hash(cfg),
    }
    if folder is not None:
        tags["hydra_output_dir"] = str(folder)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def opener(
    cfg: TrackingConfig, name: str, tags: dict[str, str], run_id: str | None, lease: leases.Lease
) -> Opener:
    """What the record writer's thread calls first: creates the store and experiment if needed,
    then starts a new run holding `lease` (and closes the dead runs of the same config, which a
    kill left RUNNING), or reopens `run_id` (its params stay as first recorded: MLflow refuses
    changed values, so only tags are added). `run_id` was checked first (resumption.check)."""

    def open_run() -> tuple[Any, str]:
        from mlflow.tracking import MlflowClient

        experiment_id = ensure_experiment(cfg, retry=False)  # the record writer retries
        client = MlflowClient(tracking_uri(cfg))
        commit, dirty = git_state()
        code = {"git_commit": commit, "git_dirty": str(dirty), **lease.tag()}
        if run_id is None:
            run = client.create_run(experiment_id, run_name=name, tags={**tags, **code})
            log.info(f"MLflow run {run.info.run_id} ({name}) in {tracking_uri(cfg)}")
            try:  # not retried: the run is open, and the next command closes them as well
                for line in leases.close_stale(
                    client, [experiment_id], f"tags.{HASH_TAG} = '{tags[HASH_TAG]}'"
                ):
                    log.warning(line)
            except Exception as e:  # noqa: BLE001
                log.debug(f"stale runs of this config not closed: {first_line(e)}")
            return client, run.info.run_id
        resumed = {k: v for k, v in tags.items() if k not in ("overrides", HASH_TAG)}
        resumed["resumed_with_overrides"] = tags["overrides"]
        client.update_run(run_id, status="RUNNING")
        for key, value in {**resumed, **code}.items():
            client.set_tag(run_id, key, value)
        log.info(f"MLflow run {run_id} reopened in {tracking_uri(cfg)}")
        return client, run_id

    return open_run


def _record_config(writer: RecordWriter, cfg: DictConfig, folder: Path | None) -> None:
    """A new run's first records: the checkout's uncommitted diff when it is dirty (git is asked
    from the writer's thread), the flattened params, the resolved config and Hydra's snapshot."""
    writer.call(lambda client, run_id: writer.log_files(code_files(), "the uncommitted diff"))
    writer.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    config = {CONFIG_ARTIFACT: OmegaConf.to_yaml(cfg, resolve=True), **snapshot_files(folder)}
    writer.log_files(config, "the config")


@contextlib.contextmanager
def start_run(
    cfg: DictConfig,
    device: str,
    gpus: int,
    resume: Resume | None = None,
    extra_tags: dict[str, str] | None = None,
    sweep: JobContext | None = None,
) -> Iterator[RecordWriter | Untracked]:
    """Opens the MLflow run for one job (or reopens `resume.run_id` to continue it) from a background
    thread, so training starts at once; ends it FINISHED, FAILED (error as a tag) or KILLED, also
    when that happens before the run was even open (it is opened first, with its params).
    `extra_tags` may name the run (`mlflow.runName`); in a `sweep` it is its parent's child. A local
    store that cannot take the run stops the job here, before training; one that does not answer,
    or is damaged, never stops training: everything is kept in the run's folder for `cifar-exp
    sync` (records.py)."""
    if not cfg.mlflow.enabled:
        yield Untracked()
        return
    uri = tracking_uri(cfg.mlflow)
    if (local := local_store_folder(uri)) is not None:
        check_store(local, uri, cfg.mlflow.min_free_mb)  # cheap: no MLflow import
    folder = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    parent, swept = (sweep.parent_run_id, sweep.swept_keys) if sweep else (None, ())
    tags = {**run_tags(cfg, device, gpus, folder, parent), **(extra_tags or {})}
    tags.update(resume.tags if resume else {})
    name = tags.pop("mlflow.runName", run_name(task_overrides(), swept))
    spill = folder / UNRECORDED_METRICS if folder is not None else None
    run_id, lease = (resume.run_id, resume.lease) if resume else (None, leases.new_lease())
    writer = RecordWriter(
        spill_path=spill,
        opener=opener(cfg.mlflow, name, tags, run_id, lease),
        uri=uri,
        heartbeat=leases.heartbeat(lease),
        recorded=resume.recorded if resume else None,
    )
    try:
        if run_id is None:  # a resumed run keeps the config it was first recorded with
            _record_config(writer, cfg, folder)
        yield writer
    except leases.TakenOver:  # another process continues the run: it is theirs to end
        writer.close(None)
        raise
    except TrialPruned as e:  # a search stopped this trial early: not a failure
        _end(writer, lease, "KILLED", None, {PRUNED_TAG: str(e)})
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or preempted under submitit (signals.py)
        _end(writer, lease, "KILLED", str(e) or "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        _end(writer, lease, "FAILED", first_line(e, most=5000))
        raise
    else:
        _end(writer, lease, "FINISHED", None, cleared=resume.interrupted if resume else ())


def snapshot_files(folder: Path | None) -> Files:
    """The run folder's .hydra snapshot (Hydra's config, overrides and its own), beside the config."""
    paths = sorted(p for p in (folder / ".hydra").glob("*") if p.is_file()) if folder is not None else []
    return {f"{Path(CONFIG_ARTIFACT).parent}/hydra/{path.name}": path.read_bytes() for path in paths}


def _end(
    writer: RecordWriter,
    lease: leases.Lease,
    status: str,
    error: str | None,
    extra_tags: dict[str, str] | None = None,
    cleared: tuple[str, ...] = (),
) -> None:
    """Ends the run with `status` once its queued records are written or kept, its lease released;
    `cleared`: the tags of an earlier interruption, gone now that it finished. Never raises."""
    tags = {"error": error[:5000]} if error else {}
    writer.log_tags({**tags, **(extra_tags or {}), **lease.tag(time.time())})
    for key in cleared:
        writer.call(lambda client, run_id, k=key: client.delete_tag(run_id, k), "clear a tag", {"untag": key})
    writer.close({"status": status, "end_time": int(time.time() * 1000)})
