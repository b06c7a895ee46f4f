"""Everything MLflow: the store, runs, params, metrics, artifacts and statuses."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
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


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the project's checkout, ('unknown', None) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


class Tracker:
    """The run's handle for the runner. With tracking off (run_id None) every call does nothing."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not written on the spot: training never waits for the store."""
        if self.run_id is None:
            return
        import mlflow

        mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_sample_images(self, data: Any) -> None:
        if self.run_id is None:
            return
        import mlflow

        from cifar_exp import reports

        fig = reports.image_grid(data.train_images[:32], data.train_labels[:32], data.classes)
        mlflow.log_figure(fig, "figures/train_samples.png")
        reports.close(fig)

    def log_results(
        self,
        model: torch.nn.Module,
        data: Any,
        tensors: Any,
        confusion: torch.Tensor,
        metrics: dict[str, float],
    ) -> None:
        """Figures, the per-class table and the final weights (loadable into the plain model)."""
        if self.run_id is None:
            return
        import mlflow

        from cifar_exp import reports

        with torch.no_grad():
            model.eval()
            logits = model(tensors.test_images[:32])
        predicted = logits.argmax(1).cpu()
        fig = reports.image_grid(data.test_images[:32], data.test_labels[:32], data.classes, predicted)
        mlflow.log_figure(fig, "figures/test_predictions.png")
        reports.close(fig)
        fig = reports.confusion_figure(confusion, data.classes)
        mlflow.log_figure(fig, "figures/confusion_matrix.png")
        reports.close(fig)
        rows = reports.per_class_rows(confusion, data.classes)
        mlflow.log_text(reports.markdown_table(rows), "tables/per_class_accuracy.md")
        mlflow.log_text(reports.csv_table(rows), "tables/per_class_accuracy.csv")
        mlflow.log_dict({"classes": data.classes}, CLASSES_ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(WEIGHTS_ARTIFACT).name
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
            mlflow.log_artifact(str(path), Path(WEIGHTS_ARTIFACT).parent.as_posix())


@contextlib.contextmanager
def start_run(cfg: DictConfig, device: str, gpus: int) -> Iterator[Tracker]:
    """Opens the MLflow run for one job; ends it FINISHED, FAILED (error as a tag) or KILLED."""
    if not cfg.mlflow.enabled:
        yield Tracker(None)
        return
    import mlflow

    experiment_id = ensure_experiment(cfg.mlflow)
    overrides = task_overrides()
    commit, dirty = git_state()
    tags = {
        "overrides": json.dumps(overrides),
        "git_commit": commit,
        "git_dirty": str(dirty),
        "device": device,
        "gpus": str(gpus),
    }
    if HydraConfig.initialized():
        tags["hydra_output_dir"] = HydraConfig.get().runtime.output_dir
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    tags.update(json.loads(os.environ.get(EXTRA_TAGS_ENV, "{}")))
    name = tags.pop("mlflow.runName", run_name(overrides))
    active = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
    run_id = active.info.run_id
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        mlflow.log_params(flatten(resolved), synchronous=False)
        mlflow.log_dict(resolved, CONFIG_ARTIFACT)
        if HydraConfig.initialized():
            snapshot = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
            if snapshot.is_dir():
                mlflow.log_artifacts(str(snapshot), "config/hydra")
        yield Tracker(run_id)
    except KeyboardInterrupt:
        _end(mlflow, "KILLED", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        _end(mlflow, "FAILED", (str(e).splitlines() or [type(e).__name__])[0])
        raise
    else:
        _end(mlflow, "FINISHED", None)
    log.info(f"MLflow run {run_id} ({name}) in {tracking_uri(cfg.mlflow)}")


def _end(mlflow: Any, status: str, error: str | None) -> None:
    try:
        mlflow.flush_async_logging()
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
