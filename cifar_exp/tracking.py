"""Everything MLflow: the store, runs, params, metrics, artifacts and statuses."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STORE_DIR = PROJECT_ROOT / "mlruns"
PARENT_RUN_ENV = "CIFAR_EXP_PARENT_RUN_ID"  # set by the sweep callback for every job it launches
EXTRA_TAGS_ENV = "CIFAR_EXP_RUN_TAGS"  # JSON object of tags, set by `cifar-exp rerun`
CONFIG_ARTIFACT = "config/config.yaml"
TRAIN_SAMPLES_ARTIFACT = "figures/train_samples.png"
PNG_COMPRESSION = 1  # zlib level: ~3x faster than Pillow's default 6, files a few % larger
WEIGHTS_ARTIFACT = "model/state_dict.pt"
CLASSES_ARTIFACT = "model/classes.json"
# What the store could not take stays in the run's Hydra output folder, under these names.
UNRECORDED_METRICS = "unrecorded_metrics.jsonl"  # one JSON object per metric or param
UNRECORDED_ARTIFACTS = "unrecorded_artifacts"
RETRY_ENV = "CIFAR_EXP_MLFLOW_RETRY_S"  # seconds a busy or silent store is retried (default 60)
FIRST_RETRY_S, LONGEST_RETRY_S = 0.25, 8.0  # the backoff between tries doubles from 0.25 s up to 8 s
T = TypeVar("T")


def tracking_uri(cfg: TrackingConfig) -> str:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project's SQLite store."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()


def default_store_uri() -> str:
    return f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Creates the store and the experiment when missing (once, before any job); returns its id.
    A local store that cannot be written, or whose disk is nearly full, stops here, before training,
    with one line (UserError)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    folder = local_store_folder(uri)
    if folder is not None:
        check_store(folder, uri, cfg.min_free_mb)
    mlflow.set_tracking_uri(uri)
    with creation_lock(uri):
        client = MlflowClient(uri)  # opening a new SQLite store creates its tables
        try:
            experiment = retrying(
                lambda: client.get_experiment_by_name(cfg.experiment_name), "opening the store"
            )
        except Exception as e:
            if not transient(e):
                raise
            raise UserError(f"the MLflow store {uri} does not answer: {first_line(e)}") from None
        if experiment is not None:
            return experiment.experiment_id
        artifacts = None  # a server or other store decides for itself
        if uri.startswith("sqlite:///"):  # artifacts beside the database, wherever it is run from
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        try:
            return client.create_experiment(cfg.experiment_name, artifact_location=artifacts)
        except Exception:  # another process (on a server) created it first
            experiment = client.get_experiment_by_name(cfg.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id


@contextlib.contextmanager
def creation_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: one process at a time opens it first, creating or migrating its tables,
    and creates the experiment. (MLflow's table creation races: of four processes opening a fresh
    file at once, three failed, with migrations colliding.) Locks <database>.lock; elsewhere a no-op."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    with open(f"{uri.removeprefix('sqlite:///')}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def local_store_folder(uri: str) -> Path | None:
    """The folder of a local store (SQLite file or file store), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return Path(uri)  # a plain path: MLflow's file store
    return None


def check_store(folder: Path, uri: str, min_free_mb: int) -> None:
    """The store's folder exists (or can be made) and takes a file, its database file can be
    written, and its disk has `min_free_mb` free: else one line saying which, before any training.
    Writing a probe file, not os.access, so it also holds for root and read-only mounts."""
    hint = "or point mlflow.tracking_uri elsewhere"
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    try:
        what = f"the MLflow store folder {folder}"
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(descriptor)
        os.unlink(probe)
        if database is not None and database.exists():
            what = f"the MLflow database {database}"
            database.open("r+b").close()
    except OSError as e:
        raise UserError(f"{what} cannot be written ({e.strerror}); fix it {hint}") from None
    free_mb = shutil.disk_usage(folder).free // 2**20
    if free_mb < min_free_mb:
        raise UserError(
            f"the MLflow store folder {folder} has {free_mb} MB free, less than mlflow.min_free_mb="
            f"{min_free_mb}; free some space {hint}"
        )


def retry_seconds() -> float:
    return float(os.environ.get(RETRY_ENV) or 60)


def transient(error: BaseException) -> bool:
    """Whether a store error can pass by itself: SQLite busy ("database is locked", which MLflow
    raises as TEMPORARILY_UNAVAILABLE), a server that does not answer or is overloaded, a full disk.
    Refusals (a bad value, a missing run, no permission) are not retried."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        DEADLINE_EXCEEDED,
        INTERNAL_ERROR,
        REQUEST_LIMIT_EXCEEDED,
        TEMPORARILY_UNAVAILABLE,
        ErrorCode,
    )

    if isinstance(error, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return False
    if isinstance(error, OSError):  # ConnectionError, TimeoutError, requests' errors, ENOSPC
        return True
    if isinstance(error, MlflowException):
        passing = (TEMPORARILY_UNAVAILABLE, REQUEST_LIMIT_EXCEEDED, DEADLINE_EXCEEDED)
        if error.error_code in {ErrorCode.Name(code) for code in passing}:
            return True
        # MLflow's HTTP client gave up on the connection after its own retries
        message = str(error.message)
        return error.error_code == ErrorCode.Name(INTERNAL_ERROR) and message.startswith("API request to")
    return type(error).__name__ == "OperationalError"  # sqlite3/SQLAlchemy: locked, busy


def retrying(call: Callable[[], T], what: str, retry_s: float | None = None, quiet: bool = False) -> T:
    """call(), retried with backoff for up to `retry_s` (default: retry_seconds()) while it fails
    with a transient error; then (or at once for any other error) that error is raised. Says so
    in one line when it starts retrying, unless `quiet`."""
    deadline = time.monotonic() + (retry_seconds() if retry_s is None else retry_s)
    delay = FIRST_RETRY_S
    while True:
        try:
            return call()
        except Exception as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            if delay == FIRST_RETRY_S and not quiet:
                log.warning(f"MLflow: {what} failed ({first_line(e)}); retrying")
            time.sleep(delay)
            delay = min(2 * delay, LONGEST_RETRY_S)


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


HASH_TAG = "config_hash"
CHECKPOINT_TAG = "checkpoint"


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
    parent = os.environ.get(PARENT_RUN_ENV)
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


class RecordWriter:
    """Writes metrics and params to the store from a background thread: the training loop only
    puts them on a queue. Whatever piles up while a write is in flight goes out as one batch.

    A store that is busy or does not answer (SQLite locked, a tracking server down) is retried with
    backoff, and what piles up meanwhile is written when it answers again. After `retry_s` of
    silence, or at once when the store refuses a write, those records go to `spill_path` (JSON
    lines, announced in one line) instead; later batches try the store again. Training never waits.

    MLflow's own asynchronous logging (`synchronous=False`) polls its queue with a 1 s timeout,
    and flushing it, then ending the run, each waited out that poll: ~2 s per run. Here closing
    waits only for what is still queued (or, with the store silent, until `retry_s` has passed)."""

    def __init__(
        self, client: Any, run_id: str, spill_path: Path | None = None, retry_s: float | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.spill_path = spill_path  # None: what the store does not take is lost (and counted)
        self.retry_s = retry_seconds() if retry_s is None else retry_s
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: str | None = None  # why the first records went unrecorded
        self.unrecorded = 0  # metrics and params the store did not take
        self.failing_since: float | None = None  # time.monotonic() of the first failed try of an outage
        self.store_down = False  # the store has not answered for retry_s (until it answers again)
        self.thread = threading.Thread(target=self._drain, name="mlflow-record-writer", daemon=True)
        self.thread.start()

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # ms since the epoch, as MLflow stamps metrics
        self.queue.put(("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()]))

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.queue.put(("params", [Param(k, v) for k, v in params.items()]))

    def close(self) -> str | None:
        """Waits until everything queued is written (or kept in spill_path); returns why some
        records went unrecorded, if any did."""
        self.queue.put(None)
        self.thread.join()
        return self.error

    def _drain(self) -> None:
        pending: dict[str, list] = {"metrics": [], "params": []}
        closing = False
        next_try: float | None = None  # while retrying: when to try again
        delay = FIRST_RETRY_S
        while not closing or pending["metrics"] or pending["params"]:
            closing |= self._take(pending, next_try)  # waits while nothing is pending
            if not (pending["metrics"] or pending["params"]):
                continue
            error = self._write(pending)
            now = time.monotonic()
            if error is None:
                if self.failing_since is not None:
                    again = "recording metrics and params again" if self.store_down else "nothing was lost"
                    log.warning(f"MLflow answers again: {again}")
                self.failing_since, next_try, delay, self.store_down = None, None, FIRST_RETRY_S, False
                continue
            if self.failing_since is None:
                self.failing_since = now
                log.warning(
                    f"MLflow: could not record metrics ({error}); retrying for up to {self.retry_s:.0f} s, "
                    "training goes on"
                )
            if self.store_down or now - self.failing_since >= self.retry_s:  # keep them in the file
                if not self.store_down:
                    self.store_down = True
                    error = f"no answer for {now - self.failing_since:.0f} s: {error}"
                self._spill(pending["metrics"], pending["params"], error)
                pending = {"metrics": [], "params": []}
                next_try = None
            else:  # keep them here and try again
                next_try, delay = now + delay, min(2 * delay, LONGEST_RETRY_S)

    def _take(self, pending: dict[str, list], until: float | None) -> bool:
        """Moves what is queued into `pending`: with `until` None it waits for the first item, else
        it collects until that time.monotonic(). True once close() has been called."""
        items = []
        if until is None:
            items.append(self.queue.get())  # blocks until there is something to write
        else:
            while (left := until - time.monotonic()) > 0:
                try:
                    items.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        while not self.queue.empty():
            items.append(self.queue.get())
        for item in items:
            if item is not None:
                pending[item[0]] += item[1]
        return None in items

    def _write(self, pending: dict[str, list]) -> str | None:
        """Writes `pending` and empties it; what the store refuses is spilled. When the store is
        busy or silent, returns that error and leaves in `pending` what is still to write."""
        # The store's limits per call: 1000 values of which at most 100 params.
        params, metrics = pending["params"], pending["metrics"]
        chunks = [([], params[i : i + 100]) for i in range(0, len(params), 100)]
        chunks += [(metrics[i : i + 1000], []) for i in range(0, len(metrics), 1000)]
        for n, (chunk_metrics, chunk_params) in enumerate(chunks):
            try:
                self.client.log_batch(self.run_id, metrics=chunk_metrics, params=chunk_params)
            except Exception as e:
                if transient(e):
                    pending["params"] = [p for _, ps in chunks[n:] for p in ps]
                    pending["metrics"] = [m for ms, _ in chunks[n:] for m in ms]
                    return first_line(e)
                self._spill(chunk_metrics, chunk_params, first_line(e))
        pending["params"], pending["metrics"] = [], []
        return None

    def _spill(self, metrics: list, params: list, error: str) -> None:
        """Appends records the store did not take to spill_path, one JSON object a line."""
        first = self.unrecorded == 0
        self.error = self.error or error
        self.unrecorded += len(metrics) + len(params)
        if self.spill_path is None:
            if first:
                log.error(f"MLflow: could not record metrics or params ({error}); they are lost")
            return
        run = {"run_id": self.run_id}
        lines = [{**run, "param": p.key, "value": p.value} for p in params]
        lines += [
            {**run, "metric": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
            for m in metrics
        ]
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        except OSError as e:
            log.error(f"MLflow: could not keep unrecorded metrics in {self.spill_path}: {e.strerror}")
            return
        if first:
            log.warning(
                f"MLflow: could not record metrics or params ({error}); they go to {self.spill_path}, "
                "training goes on"
            )


class Tracker:
    """The run's handle for the runner. With tracking off (run_id None) every call does nothing.
    A store that fails a call even after retries never stops training: it is said in one line, and
    artifacts it did not take are kept in the run's folder, under unrecorded_artifacts/."""

    def __init__(
        self, run_id: str | None, writer: RecordWriter | None = None, folder: Path | None = None
    ) -> None:
        self.run_id = run_id
        self.writer = writer
        self.folder = folder  # the run's Hydra output folder; None outside Hydra
        self.store_failed = False  # a call failed for good: later calls are tried once, not retried

    def store(self, call: Callable[[], Any], what: str) -> str | None:
        """call() against the store, retried while the store is busy or silent (unless it has already
        been found down); returns the error's first line when it still failed."""
        down = self.store_failed or (self.writer is not None and self.writer.store_down)
        said = self.writer is not None and self.writer.failing_since is not None  # by the writer
        try:
            retrying(call, what, 0 if down else None, quiet=said)
            return None
        except Exception as e:
            self.store_failed = self.store_failed or transient(e)  # down, not just refusing this call
            return first_line(e)

    def log_artifacts(self, folder: str, what: str) -> None:
        """Logs the files under `folder` (their paths under it are the artifact paths); those the
        store does not take are copied to <run folder>/unrecorded_artifacts/, said in one line."""
        import mlflow

        error = self.store(lambda: mlflow.log_artifacts(folder), f"recording {what}")
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
        if self.run_id is not None and path is not None:
            import mlflow

            where = str(path.resolve())
            if error := self.store(lambda: mlflow.set_tag(CHECKPOINT_TAG, where), "tagging the checkpoint"):
                log.warning(f"MLflow: could not tag the run's checkpoint ({error}); resume from {where}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not written on the spot: training never waits for the store."""
        if self.writer is not None:
            self.writer.metrics(metrics, step)

    def log_sample_images(self, data: Any) -> None:
        """A grid of the first 32 training images with their labels."""
        if self.run_id is None:
            return
        from cifar_exp import reports

        grid = reports.image_grid(data.train_images[:32], data.train_labels[:32], data.classes)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, TRAIN_SAMPLES_ARTIFACT)
            path.parent.mkdir()
            grid.save(path, compress_level=PNG_COMPRESSION)
            self.log_artifacts(tmp, "the sample images")

    def log_results(
        self,
        model: torch.nn.Module,
        data: Any,
        tensors: Any,
        confusion: torch.Tensor,
        metrics: dict[str, float],
    ) -> None:
        """Test predictions and the confusion matrix as figures, the per-class table and the final
        weights (loadable into the plain model), written to a folder and logged in one call."""
        if self.run_id is None:
            return
        from cifar_exp import reports

        with torch.no_grad():
            model.eval()
            logits = model(tensors.test_images[:32])
        predicted = logits.argmax(1).cpu()
        rows = reports.per_class_rows(confusion, data.classes)
        with tempfile.TemporaryDirectory() as tmp:
            files = {
                "figures/test_predictions.png": reports.image_grid(
                    data.test_images[:32], data.test_labels[:32], data.classes, predicted
                ),
                "figures/confusion_matrix.png": reports.confusion_image(confusion, data.classes),
                "tables/per_class_accuracy.md": reports.markdown_table(rows),
                "tables/per_class_accuracy.csv": reports.csv_table(rows),
                CLASSES_ARTIFACT: json.dumps({"classes": data.classes}, indent=2),
                WEIGHTS_ARTIFACT: {k: v.cpu() for k, v in model.state_dict().items()},
            }
            for name, content in files.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, str):
                    path.write_text(content)
                elif isinstance(content, dict):
                    torch.save(content, path)
                else:
                    content.save(path, compress_level=PNG_COMPRESSION)  # a Pillow image
            self.log_artifacts(tmp, "the figures, tables and weights")


@contextlib.contextmanager
def start_run(cfg: DictConfig, device: str, gpus: int, run_id: str | None = None) -> Iterator[Tracker]:
    """Opens the MLflow run for one job (or reopens `run_id` to continue it); ends it FINISHED,
    FAILED (error as a tag) or KILLED. A store that does not answer at the start stops the job with
    one line; one that stops answering later never stops training (see RecordWriter, Tracker)."""
    if not cfg.mlflow.enabled:
        yield Tracker(None)
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(cfg.mlflow)
    overrides = task_overrides()
    commit, dirty = git_state()
    tags = {
        "overrides": json.dumps(overrides),
        "git_commit": commit,
        "git_dirty": str(dirty),
        "device": device,
        "gpus": str(gpus),
        HASH_TAG: config_hash(cfg),
    }
    folder = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    if folder is not None:
        tags["hydra_output_dir"] = str(folder)
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    tags.update(json.loads(os.environ.get(EXTRA_TAGS_ENV, "{}")))
    name = tags.pop("mlflow.runName", run_name(overrides))
    resuming = run_id is not None
    uri = tracking_uri(cfg.mlflow)
    try:
        if resuming:  # continuing: params stay as first recorded (MLflow refuses changed values)
            active = retrying(lambda: mlflow.start_run(run_id=run_id), "reopening the run")
            name = active.info.run_name
            tags = {k: v for k, v in tags.items() if k not in ("overrides", HASH_TAG)}
            tags["resumed_with_overrides"] = json.dumps(overrides)
            retrying(lambda: mlflow.set_tags(tags), "tagging the run")
        else:
            active = retrying(
                lambda: mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags),
                "starting the run",
            )
    except Exception as e:
        if not transient(e):
            raise
        raise UserError(f"the MLflow store {uri} does not answer: {first_line(e)}") from None
    run_id = active.info.run_id
    spill = folder / UNRECORDED_METRICS if folder is not None else None
    tracker = Tracker(run_id, RecordWriter(MlflowClient(uri), run_id, spill), folder)
    try:
        if not resuming:
            tracker.writer.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        log_config(cfg, tracker)
        yield tracker
    except KeyboardInterrupt:
        _end(tracker, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        _end(tracker, "FAILED", first_line(e, most=5000))
        raise
    else:
        _end(tracker, "FINISHED", None)
    log.info(f"MLflow run {run_id} ({name}) in {uri}")


def log_config(cfg: DictConfig, tracker: Tracker) -> None:
    """The resolved config and, under Hydra, its .hydra snapshot, logged in one call."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, Path(CONFIG_ARTIFACT).parent)
        folder.mkdir()
        (folder / Path(CONFIG_ARTIFACT).name).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if HydraConfig.initialized():
            snapshot = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
            if snapshot.is_dir():
                shutil.copytree(snapshot, folder / "hydra")
        tracker.log_artifacts(tmp, "the config")


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
        if tags and (problem := tracker.store(lambda: mlflow.set_tags(tags), "tagging the run")):
            log.debug(f"MLflow: could not tag run {run_id} ({problem})")  # the store is down: said below
    finally:
        try:
            mlflow.end_run(status)  # takes the run off MLflow's stack first, then tells the store
        except Exception:
            client = MlflowClient(mlflow.get_tracking_uri())
            if problem := tracker.store(lambda: client.set_terminated(run_id, status), "ending the run"):
                log.error(
                    f"MLflow: could not end run {run_id} as {status} ({problem}); the store shows it "
                    "RUNNING, the training result stands"
                )


def summarise_sweep(client: Any, parent_id: str) -> str:
    """Logs the sweep table (swept values against each child's final test/acc and test/loss, as
    CSV and markdown) and a plot of test/acc against each swept numeric key to the parent run;
    returns the parent's status, which follows the children's."""
    from cifar_exp import reports

    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    linked = [k.removeprefix("linked/") for k in parent.data.tags if k.startswith("linked/")]
    children = [client.get_run(run_id) for run_id in linked] + list(children)
    swept: list[str] = []
    rows = []
    for child in children:
        row: dict[str, Any] = {"run": child.info.run_name, "status": child.info.status}
        for item in json.loads(child.data.tags.get("overrides", "[]")):
            key, _, value = item.lstrip("+~").partition("=")
            if not key.startswith(("mlflow.", "hydra.")):
                row[key] = value
                swept += [key] if key not in swept else []
        for metric in ("test/acc", "test/loss"):
            row[metric] = child.data.metrics.get(metric, "")
        row["run_id"] = child.info.run_id
        rows.append(row)
    columns = ["run", *swept, "test/acc", "test/loss", "status", "run_id"]
    rows = [{c: r.get(c, "") for c in columns} for r in rows]
    client.log_text(parent_id, reports.csv_table(rows), "sweep/summary.csv")
    client.log_text(parent_id, reports.markdown_table(rows), "sweep/summary.md")
    numeric = [k for k in swept if all(_is_number(r[k]) for r in rows if r[k] != "")]
    if rows and numeric:
        fig = reports.sweep_figure(rows, numeric)
        client.log_figure(parent_id, fig, "sweep/test_acc.png")
        reports.close(fig)
    finished = [r for r in rows if r["status"] == "FINISHED" and r["test/acc"] != ""]
    if finished:
        best = max(finished, key=lambda r: r["test/acc"])
        client.log_metric(parent_id, "best/test/acc", best["test/acc"])
        client.set_tag(parent_id, "best_run_id", best["run_id"])
    statuses = {r["status"] for r in rows}
    if not rows or "FAILED" in statuses:
        return "FAILED"
    return "FINISHED" if statuses == {"FINISHED"} else "KILLED"


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
