"""A run's lifecycle: open it (or reopen it to continue), record what the runner hands over
(numbers and files), end it FINISHED, FAILED (error as a tag) or KILLED."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import TrialPruned, UserError, first_line
from cifar_exp.tracking.identity import (
    CHECKPOINT_TAG,
    HASH_TAG,
    PRUNED_TAG,
    JobContext,
    code_files,
    config_hash,
    flatten,
    git_state,
    run_name,
    task_overrides,
)
from cifar_exp.tracking.records import UNRECORDED_ARTIFACTS, UNRECORDED_METRICS, Opener, RecordWriter
from cifar_exp.tracking.resumption import PROCESS_TAG, Resume, this_process
from cifar_exp.tracking.store import (
    check_store,
    ensure_experiment,
    local_store_folder,
    retrying,
    tracking_uri,
)

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config/config.yaml"
Files = dict[str, str | bytes]  # artifact path -> content


def write_files(files: Files, folder: Path) -> None:
    """Each artifact path's text or bytes, as a file under `folder` (to be logged in one call)."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


class Tracker:
    """The run's handle for the runner: numbers and files go to the record writer's queue, in
    order, and are written from its thread. With tracking off (no writer) every call does nothing.
    A store that fails a call even after retries never stops training: it is said in one line, and
    files it did not take are kept in the run's folder, under unrecorded_artifacts/."""

    def __init__(
        self,
        writer: RecordWriter | None = None,
        folder: Path | None = None,
        uri: str = "",
        recorded: set[tuple[str, int]] | None = None,
    ) -> None:
        self.writer = writer
        self.folder = folder  # the run's Hydra output folder; None outside Hydra
        self.uri = uri
        self.recorded = recorded or set()  # (metric, step) points a resumed run holds already
        self.checkpoint_tagged: Path | None = None
        self.kept_files = False  # whether files the store did not take were kept (and said)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def run_id(self) -> str | None:
        """The run's id; waits until the run is open (None with tracking off)."""
        if self.writer is None:
            return None
        if (run_id := self.writer.wait_open()) is None:
            raise UserError(f"the MLflow store {self.uri} does not answer: {self.writer.open_error}")
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not written on the spot: training never waits for the store. A run that could
        not be opened stops training here, in one line."""
        if self.writer is None:
            return
        if self.writer.open_error is not None:
            raise UserError(f"the MLflow store {self.uri} does not answer: {self.writer.open_error}")
        if self.recorded:  # trained again after a kill: what the store holds is not recorded twice
            metrics = {k: v for k, v in metrics.items() if (k, step) not in self.recorded}
        self.writer.metrics(metrics, step)

    def flush(self) -> None:
        """Waits until the metrics and params queued so far are written (not while the store is
        failing): called before each checkpoint, so the store holds every step a checkpoint has
        trained, and a kill loses none."""
        if self.writer is not None:
            self.writer.flush()

    def log_params(self, params: dict[str, str]) -> None:
        """Params beside the config's (each key once per run: MLflow refuses a changed value)."""
        if self.writer is not None:
            self.writer.params(params)

    def log_files(self, files: Files, what: str) -> None:
        """Writes `files` (artifact path -> text or bytes) to a folder now; logs it in one call
        from the writer's thread."""
        if self.writer is None:
            return
        folder = _folder_of(files)
        self.writer.call(lambda client, run_id: self._log_folder(client, run_id, folder, what))

    def log_code(self) -> None:
        """The checkout's uncommitted diff, when it is dirty (identity.code_files): git is asked
        from the writer's thread, off the training path, and the diff is logged like any file."""
        if self.writer is None:
            return

        def log_diff(client: Any, run_id: str | None) -> None:
            if files := code_files():
                self._log_folder(client, run_id, _folder_of(files), "the uncommitted diff")

        self.writer.call(log_diff)

    def _log_folder(self, client: Any, run_id: str | None, folder: Path, what: str) -> None:
        """Logs the files under `folder`, then removes it; those the store does not take are
        copied to <run folder>/unrecorded_artifacts/ (for `cifar-exp sync`), said in one line the
        first time: an outage that also misses later files is not said again for each."""
        try:
            error = self.writer.open_error
            if run_id is not None:
                _, error = self.writer.health.call(
                    lambda: client.log_artifacts(run_id, str(folder)), f"record {what}"
                )
            if error is None:
                return
            if self.folder is None:
                log.warning(f"MLflow: could not record {what} ({error}); they are lost")
                return
            kept = self.folder / UNRECORDED_ARTIFACTS
            shutil.copytree(folder, kept, dirs_exist_ok=True)
            self.writer.keep([{"artifacts": UNRECORDED_ARTIFACTS}])
            if self.kept_files:
                log.debug(f"MLflow: could not record {what} either; kept in {kept}")
                return
            self.kept_files = True
            log.warning(
                f"MLflow: could not record {what} ({error}); they are kept in {kept}, "
                "with any later files the store does not take"
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def set_checkpoint(self, path: Path) -> None:
        """Tags where this run's checkpoints go, for `cifar-exp resume RUN_ID`: called once the
        first one is written, so the tag never names a file that is not there (a resumed run's
        tag names its earlier checkpoint until then)."""
        if self.writer is None or self.checkpoint_tagged == path:
            return
        self.checkpoint_tagged = path
        where = str(path.resolve())

        def tag(client: Any, run_id: str | None) -> None:
            if run_id is None:
                return
            _, error = self.writer.health.call(
                lambda: client.set_tag(run_id, CHECKPOINT_TAG, where), "tag the run's checkpoint"
            )
            if error:
                log.warning(f"MLflow: could not tag the run's checkpoint ({error}); resume from {where}")

        self.writer.call(tag)


def _folder_of(files: Files) -> Path:
    """A new temporary folder holding `files`, to be logged in one call (and then removed)."""
    folder = Path(tempfile.mkdtemp(prefix="cifar_exp-artifacts-"))
    write_files(files, folder)
    return folder


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


def opener(cfg: TrackingConfig, name: str, tags: dict[str, str], run_id: str | None) -> Opener:
    """What the record writer's thread calls first: creates the store and experiment if needed,
    then starts a new run, or reopens `run_id` (its params stay as first recorded: MLflow refuses
    changed values, so only tags are added). `run_id` was checked first (resumption.check)."""

    def open_run() -> tuple[Any, str]:
        from mlflow.tracking import MlflowClient

        experiment_id = ensure_experiment(cfg)
        client = MlflowClient(tracking_uri(cfg))
        commit, dirty = git_state()
        code = {"git_commit": commit, "git_dirty": str(dirty), PROCESS_TAG: this_process()}
        if run_id is None:
            run = retrying(
                lambda: client.create_run(experiment_id, run_name=name, tags={**tags, **code}),
                "starting the run",
            )
            log.info(f"MLflow run {run.info.run_id} ({name}) in {tracking_uri(cfg)}")
            return client, run.info.run_id
        resumed = {k: v for k, v in tags.items() if k not in ("overrides", HASH_TAG)}
        resumed["resumed_with_overrides"] = tags["overrides"]
        retrying(lambda: client.update_run(run_id, status="RUNNING"), "reopening the run")
        for key, value in {**resumed, **code}.items():
            retrying(lambda k=key, v=value: client.set_tag(run_id, k, v), "tagging the run")
        log.info(f"MLflow run {run_id} reopened in {tracking_uri(cfg)}")
        return client, run_id

    return open_run


@contextlib.contextmanager
def start_run(
    cfg: DictConfig,
    device: str,
    gpus: int,
    resume: Resume | None = None,
    extra_tags: dict[str, str] | None = None,
    sweep: JobContext | None = None,
) -> Iterator[Tracker]:
    """Opens the MLflow run for one job (or reopens `resume.run_id` to continue it) from a background
    thread, so training starts at once; ends it FINISHED, FAILED (error as a tag) or KILLED, also
    when that happens before the run was even open (it is opened first, with its params).
    `extra_tags` may name the run (`mlflow.runName`); in a `sweep` it is its parent's child. A local
    store that cannot take the run stops the job here, before training; one that does not answer
    stops it at its first metrics; one that stops answering later never stops training (see
    RecordWriter, Tracker)."""
    if not cfg.mlflow.enabled:
        yield Tracker()
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
    run_id = resume.run_id if resume else None
    writer = RecordWriter(spill_path=spill, opener=opener(cfg.mlflow, name, tags, run_id))
    tracker = Tracker(writer, folder, uri, resume.recorded if resume else None)
    try:
        if run_id is None:  # a resumed run keeps the config it was first recorded with
            tracker.log_code()
            writer.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
            tracker.log_files(config_files(cfg), "the config")
        yield tracker
    except TrialPruned as e:  # a search stopped this trial early: not a failure
        _end(tracker, "KILLED", None, {PRUNED_TAG: str(e)})
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or preempted under submitit (signals.py)
        _end(tracker, "KILLED", str(e) or "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        _end(tracker, "FAILED", first_line(e, most=5000))
        raise
    else:
        _end(tracker, "FINISHED", None)


def config_files(cfg: DictConfig) -> Files:
    """The resolved config and, under Hydra, its .hydra snapshot."""
    files: Files = {CONFIG_ARTIFACT: OmegaConf.to_yaml(cfg, resolve=True)}
    if HydraConfig.initialized():
        snapshot = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
        for path in sorted(snapshot.glob("*")) if snapshot.is_dir() else []:
            if path.is_file():
                files[f"{Path(CONFIG_ARTIFACT).parent}/hydra/{path.name}"] = path.read_bytes()
    return files


def _end(tracker: Tracker, status: str, error: str | None, extra_tags: dict[str, str] | None = None) -> None:
    """Waits for queued records, then ends the run with `status`, FINISHED also when the store did
    not take them all (those are in the run's folder, and the run is tagged `unrecorded`). A store
    that cannot even be told the run ended gets one line; nothing raises."""
    writer = tracker.writer
    writer.close()
    run_id, client = writer.run_id, writer.client
    ended = {"status": status, "end_time": int(time.time() * 1000)}
    if run_id is None:
        tags = {"error": error[:5000]} if error else {}
        lines = [{"tag": key, "value": value} for key, value in {**tags, **(extra_tags or {})}.items()]
        kept = writer.keep([*lines, ended])  # for `cifar-exp sync`, which opens the run
        where = f"they are in {writer.spill_path}" if kept else "they are lost"
        log.error(f"MLflow: the run could not be opened ({writer.open_error}); {where}")
        return
    tags = {"error": error[:5000]} if error else {}
    tags.update(extra_tags or {})
    if writer.unrecorded:
        count = f"{writer.unrecorded} metrics and params"
        where = f"they are in {writer.spill_path}" if writer.spill_path else "they are lost"
        tags["unrecorded"] = f"{count}; {where}"
        log.warning(f"MLflow: {count} of run {run_id} not recorded; {where}")
    if tags:
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in tags.items()]
        _, problem = writer.health.call(lambda: client.log_batch(run_id, tags=batch), "tag the run")
        if problem:
            log.debug(f"MLflow: could not tag run {run_id} ({problem})")  # the store is down: said below
            writer.keep([{"tag": key, "value": value} for key, value in tags.items()])
    _, problem = writer.health.call(
        lambda: client.set_terminated(run_id, status, ended["end_time"]), "end the run"
    )
    if problem:
        kept = writer.keep([ended])
        log.error(
            f"MLflow: could not end run {run_id} as {status} ({problem}); the store shows it "
            "RUNNING, the training result stands"
            + (f" (`cifar-exp sync {writer.spill_path.parent}` records it)" if kept else "")
        )
    else:
        log.info(f"MLflow run {run_id} ended {status}")
