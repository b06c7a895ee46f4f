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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import TrackingConfig, UserError

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


def tracking_uri(cfg: TrackingConfig) -> str:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project's SQLite store."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()


def default_store_uri() -> str:
    return f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Creates the store and the experiment when missing (once, before any job); returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the MLflow store folder {folder}: {e.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(
                f"the MLflow store folder {folder} is not writable; fix its permissions "
                "or set mlflow.tracking_uri"
            )
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None  # a server or other store decides for itself
    if uri.startswith("sqlite:///"):  # artifacts beside the database, wherever it is run from
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(cfg.experiment_name, artifact_location=artifacts)
    except Exception:  # another process created it first
        experiment = client.get_experiment_by_name(cfg.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


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

    MLflow's own asynchronous logging (`synchronous=False`) polls its queue with a 1 s timeout,
    and flushing it, then ending the run, each waited out that poll: ~2 s per run. Here closing
    waits only for what is still queued."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: str | None = None  # the first failed write
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
        """Waits until everything queued is written; returns the first error, if any."""
        self.queue.put(None)
        self.thread.join()
        return self.error

    def _drain(self) -> None:
        done = False
        while not done:
            pending = [self.queue.get()]  # blocks until there is something to write
            while not self.queue.empty():
                pending.append(self.queue.get())
            done = None in pending
            batch: dict[str, list] = {"metrics": [], "params": []}
            for kind, items in (item for item in pending if item is not None):
                batch[kind] += items
            self._write(batch["metrics"], batch["params"])

    def _write(self, metrics: list, params: list) -> None:
        # The store's limits per call: 1000 values of which at most 100 params.
        chunks = [([], params[i : i + 100]) for i in range(0, len(params), 100)]
        chunks += [(metrics[i : i + 1000], []) for i in range(0, len(metrics), 1000)]
        for chunk_metrics, chunk_params in chunks:
            try:
                self.client.log_batch(self.run_id, metrics=chunk_metrics, params=chunk_params)
            except Exception as e:  # reported when the run ends; training goes on
                if self.error is None:
                    log.error(f"MLflow: could not record metrics or params: {e}")
                    self.error = (str(e).splitlines() or [type(e).__name__])[0]


class Tracker:
    """The run's handle for the runner. With tracking off (run_id None) every call does nothing."""

    def __init__(self, run_id: str | None, writer: RecordWriter | None = None) -> None:
        self.run_id = run_id
        self.writer = writer

    def set_checkpoint(self, path: Path | None) -> None:
        """Where this run's checkpoints go, for `cifar-exp resume RUN_ID`."""
        if self.run_id is not None and path is not None:
            import mlflow

            mlflow.set_tag(CHECKPOINT_TAG, str(path.resolve()))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not written on the spot: training never waits for the store."""
        if self.writer is not None:
            self.writer.metrics(metrics, step)

    def log_sample_images(self, data: Any) -> None:
        """A grid of the first 32 training images with their labels."""
        if self.run_id is None:
            return
        import mlflow

        from cifar_exp import reports

        grid = reports.image_grid(data.train_images[:32], data.train_labels[:32], data.classes)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, Path(TRAIN_SAMPLES_ARTIFACT).name)
            grid.save(path, compress_level=PNG_COMPRESSION)
            mlflow.log_artifact(str(path), Path(TRAIN_SAMPLES_ARTIFACT).parent.as_posix())

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
        import mlflow

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
            mlflow.log_artifacts(tmp)


@contextlib.contextmanager
def start_run(cfg: DictConfig, device: str, gpus: int, run_id: str | None = None) -> Iterator[Tracker]:
    """Opens the MLflow run for one job (or reopens `run_id` to continue it); ends it FINISHED,
    FAILED (error as a tag) or KILLED."""
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
    if HydraConfig.initialized():
        tags["hydra_output_dir"] = HydraConfig.get().runtime.output_dir
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    tags.update(json.loads(os.environ.get(EXTRA_TAGS_ENV, "{}")))
    name = tags.pop("mlflow.runName", run_name(overrides))
    resuming = run_id is not None
    if resuming:  # continuing: params stay as first recorded (MLflow refuses changed values)
        active = mlflow.start_run(run_id=run_id)
        name = active.info.run_name
        tags = {k: v for k, v in tags.items() if k not in ("overrides", HASH_TAG)}
        mlflow.set_tags({**tags, "resumed_with_overrides": json.dumps(overrides)})
    else:
        active = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
    run_id = active.info.run_id
    writer = RecordWriter(MlflowClient(tracking_uri(cfg.mlflow)), run_id)
    try:
        if not resuming:
            writer.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        log_config(cfg)
        yield Tracker(run_id, writer)
    except KeyboardInterrupt:
        _end(writer, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        _end(writer, "FAILED", (str(e).splitlines() or [type(e).__name__])[0])
        raise
    else:
        _end(writer, "FINISHED", None)
    log.info(f"MLflow run {run_id} ({name}) in {tracking_uri(cfg.mlflow)}")


def log_config(cfg: DictConfig) -> None:
    """The resolved config and, under Hydra, its .hydra snapshot, logged in one call."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, Path(CONFIG_ARTIFACT).parent)
        folder.mkdir()
        (folder / Path(CONFIG_ARTIFACT).name).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if HydraConfig.initialized():
            snapshot = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
            if snapshot.is_dir():
                shutil.copytree(snapshot, folder / "hydra")
        mlflow.log_artifacts(tmp)


def _end(writer: RecordWriter, status: str, error: str | None) -> None:
    """Waits for queued metrics and params, then ends the run; a run whose metrics or params
    could not all be written ends FAILED with that error, not FINISHED."""
    import mlflow

    try:
        problem = writer.close()
        if problem and status == "FINISHED":
            status, error = "FAILED", f"metrics or params not recorded: {problem}"
        if error:
            mlflow.set_tag("error", error[:5000])
    finally:
        mlflow.end_run(status)


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
