"""A run's lifecycle: open it (or reopen it to continue), record what the runner hands over
(numbers and files), end it FINISHED, FAILED (error as a tag) or KILLED."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.errors import UserError, first_line
from cifar_exp.tracking.identity import (
    CHECKPOINT_TAG,
    HASH_TAG,
    config_hash,
    flatten,
    git_state,
    run_name,
    sweep_parent,
    task_overrides,
)
from cifar_exp.tracking.records import UNRECORDED_ARTIFACTS, UNRECORDED_METRICS, RecordWriter
from cifar_exp.tracking.store import StoreHealth, ensure_experiment, retrying, tracking_uri, transient

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config/config.yaml"
Files = dict[str, str | bytes]  # artifact path -> content


class Tracker:
    """The run's handle for the runner: numbers go to the record writer's queue, files are logged
    in one call. With tracking off (run_id None) every call does nothing. A store that fails a call
    even after retries never stops training: it is said in one line, and files it did not take are
    kept in the run's folder, under unrecorded_artifacts/."""

    def __init__(
        self,
        run_id: str | None,
        writer: RecordWriter | None = None,
        folder: Path | None = None,
        health: StoreHealth | None = None,
    ) -> None:
        self.run_id = run_id
        self.writer = writer
        self.folder = folder  # the run's Hydra output folder; None outside Hydra
        self.health = health or StoreHealth()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not written on the spot: training never waits for the store."""
        if self.writer is not None:
            self.writer.metrics(metrics, step)

    def log_files(self, files: Files, what: str) -> None:
        """Writes `files` (artifact path -> text or bytes) to a folder and logs it in one call."""
        if self.run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            self._log_folder(tmp, what)

    def _log_folder(self, folder: str, what: str) -> None:
        """Logs the files under `folder`; those the store does not take are copied to
        <run folder>/unrecorded_artifacts/, said in one line."""
        import mlflow

        _, error = self.health.call(lambda: mlflow.log_artifacts(folder), f"recording {what}")
        if error is None:
            return
        if self.folder is None:
            log.warning(f"MLflow: could not record {what} ({error}); they are lost")
            return
        kept = self.folder / UNRECORDED_ARTIFACTS
        shutil.copytree(folder, kept, dirs_exist_ok=True)
        log.warning(f"MLflow: could not record {what} ({error}); they are kept in {kept}")

    def set_checkpoint(self, path: Path | None) -> None:
        """Where this run's checkpoints go, for `cifar-exp resume RUN_ID`."""
        if self.run_id is None or path is None:
            return
        import mlflow

        where = str(path.resolve())
        _, error = self.health.call(lambda: mlflow.set_tag(CHECKPOINT_TAG, where), "tagging the checkpoint")
        if error:
            log.warning(f"MLflow: could not tag the run's checkpoint ({error}); resume from {where}")


def run_tags(cfg: DictConfig, device: str, gpus: int, folder: Path | None) -> dict[str, str]:
    """What a new run is tagged with: overrides, code, device, config hash, output folder, sweep."""
    commit, dirty = git_state()
    tags = {
        "overrides": json.dumps(task_overrides()),
        "git_commit": commit,
        "git_dirty": str(dirty),
        "device": device,
        "gpus": str(gpus),
        HASH_TAG: config_hash(cfg),
    }
    if folder is not None:
        tags["hydra_output_dir"] = str(folder)
    if parent := sweep_parent():
        tags["mlflow.parentRunId"] = parent
    return tags


def _open(experiment_id: str, name: str, tags: dict[str, str], run_id: str | None) -> tuple[str, str]:
    """Starts a new run, or reopens `run_id` (its params stay as first recorded: MLflow refuses
    changed values); returns (run id, run name)."""
    import mlflow

    if run_id is None:
        active = retrying(
            lambda: mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags),
            "starting the run",
        )
        return active.info.run_id, name
    active = retrying(lambda: mlflow.start_run(run_id=run_id), "reopening the run")
    tags = {k: v for k, v in tags.items() if k not in ("overrides", HASH_TAG)}
    tags["resumed_with_overrides"] = json.dumps(task_overrides())
    retrying(lambda: mlflow.set_tags(tags), "tagging the run")
    return run_id, active.info.run_name


@contextlib.contextmanager
def start_run(
    cfg: DictConfig,
    device: str,
    gpus: int,
    run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[Tracker]:
    """Opens the MLflow run for one job (or reopens `run_id` to continue it); ends it FINISHED,
    FAILED (error as a tag) or KILLED. `extra_tags` may name the run (`mlflow.runName`). A store
    that does not answer at the start stops the job with one line; one that stops answering later
    never stops training (see RecordWriter, Tracker)."""
    if not cfg.mlflow.enabled:
        yield Tracker(None)
        return
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(cfg.mlflow)
    folder = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    tags = {**run_tags(cfg, device, gpus, folder), **(extra_tags or {})}
    name = tags.pop("mlflow.runName", run_name(task_overrides()))
    uri = tracking_uri(cfg.mlflow)
    try:
        run_id_opened, name = _open(experiment_id, name, tags, run_id)
    except Exception as e:
        if not transient(e):
            raise
        raise UserError(f"the MLflow store {uri} does not answer: {first_line(e)}") from None
    health = StoreHealth()
    spill = folder / UNRECORDED_METRICS if folder is not None else None
    writer = RecordWriter(MlflowClient(uri), run_id_opened, spill, health=health)
    tracker = Tracker(run_id_opened, writer, folder, health)
    try:
        if run_id is None:
            writer.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        tracker.log_files(config_files(cfg), "the config")
        yield tracker
    except KeyboardInterrupt:
        _end(tracker, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        _end(tracker, "FAILED", first_line(e, most=5000))
        raise
    else:
        _end(tracker, "FINISHED", None)
    log.info(f"MLflow run {run_id_opened} ({name}) in {uri}")


def config_files(cfg: DictConfig) -> Files:
    """The resolved config and, under Hydra, its .hydra snapshot."""
    files: Files = {CONFIG_ARTIFACT: OmegaConf.to_yaml(cfg, resolve=True)}
    if HydraConfig.initialized():
        snapshot = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
        for path in sorted(snapshot.glob("*")) if snapshot.is_dir() else []:
            if path.is_file():
                files[f"{Path(CONFIG_ARTIFACT).parent}/hydra/{path.name}"] = path.read_bytes()
    return files


def _end(tracker: Tracker, status: str, error: str | None) -> None:
    """Waits for queued metrics and params, then ends the run with `status`, FINISHED also when
    the store did not take them all (those are in the run's folder, and the run is tagged
    `unrecorded`). A store that cannot even be told the run ended gets one line; nothing raises."""
    import mlflow
    from mlflow.tracking import MlflowClient

    writer, run_id = tracker.writer, tracker.run_id
    try:
        writer.close()
        tags = {"error": error[:5000]} if error else {}
        if writer.unrecorded:
            count = f"{writer.unrecorded} metrics and params"
            where = f"they are in {writer.spill_path}" if writer.spill_path else "they are lost"
            tags["unrecorded"] = f"{count}; {where}"
            log.warning(f"MLflow: {count} of run {run_id} not recorded; {where}")
        if tags:
            _, problem = tracker.health.call(lambda: mlflow.set_tags(tags), "tagging the run")
            if problem:
                log.debug(f"MLflow: could not tag run {run_id} ({problem})")  # the store is down: said below
    finally:
        try:
            mlflow.end_run(status)  # takes the run off MLflow's stack first, then tells the store
        except Exception:
            client = MlflowClient(mlflow.get_tracking_uri())
            _, problem = tracker.health.call(lambda: client.set_terminated(run_id, status), "ending the run")
            if problem:
                log.error(
                    f"MLflow: could not end run {run_id} as {status} ({problem}); the store shows it "
                    "RUNNING, the training result stands"
                )
