"""The store: where it is, whether it can take a run, and the retry policy for calls that may pass
by themselves."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STORE_DIR = PROJECT_ROOT / "mlruns"
RETRY_ENV = "CIFAR_EXP_MLFLOW_RETRY_S"  # seconds a busy or silent store is retried (default 60)
FIRST_RETRY_S, LONGEST_RETRY_S = 0.25, 8.0  # the backoff between tries doubles from 0.25 s up to 8 s
# MLflow's own retries of each HTTP request: its defaults (7 retries, backoff factor 2, 120 s timeout)
# spend ~4 minutes on every request to a dead server. These spend ~2 s on a refused connection and
# 3 x 20 s on a server that never answers; our own retrying decides how long an outage is waited
# out. A user's own values in the environment win.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # seconds; urllib3 sleeps factor * 2**(n-1), n >= 2
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",  # seconds to connect, and to wait for each answer
}
T = TypeVar("T")


def tracking_uri(cfg: TrackingConfig) -> str:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project's SQLite store."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def limit_http_retries() -> None:
    """MLflow's HTTP retries bounded (HTTP_RETRY_DEFAULTS) for this process and the ones it
    starts, unless the environment already sets them. Read by MLflow at each request."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # urllib3 says each of those retries in a line of its own; our own retrying says an outage once
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def ensure_experiment(cfg: TrackingConfig, retry: bool = True) -> str:
    """Creates the store and the experiment when missing (once, before any job); returns its id.
    A local store that cannot be written, or whose disk is nearly full, stops here, before training,
    with one line (UserError); so does one that does not answer, after retry_seconds() (without
    `retry`: its error is raised at once, for the caller to retry)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    folder = local_store_folder(uri)
    if folder is not None:
        check_store(folder, uri, cfg.min_free_mb)
    limit_http_retries()  # also in processes that did not start at cifar-exp's front door (submitit jobs)
    mlflow.set_tracking_uri(uri)
    with creation_lock(uri):
        client = MlflowClient(uri)  # opening a new SQLite store creates its tables
        try:
            find = lambda: client.get_experiment_by_name(cfg.experiment_name)  # noqa: E731
            experiment = retrying(find, "opening the store") if retry else find()
        except Exception as e:
            if not retry or not transient(e):
                raise
            raise UserError(f"the MLflow store {uri} does not answer: {first_line(e)}") from None
        if experiment is not None:
            return experiment.experiment_id
        try:
            experiment_id = client.create_experiment(
                cfg.experiment_name, artifact_location=artifact_root(uri), tags=EXPERIMENT_TAGS
            )
        except Exception:  # another process (on a server) created it first
            experiment = client.get_experiment_by_name(cfg.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id
        if folder is not None:
            hide_default_experiment(client)
        return experiment_id


# MLflow 3 shows an experiment in its "Model training" view (runs, params, metrics) or its "GenAI"
# view (traces). The experiment's kind is this tag; 3.17's UI, though, follows its own sidebar
# switch (GenAI by default, remembered by the browser) or a workflowType in the page's URL, which
# the links `cifar-exp ui` prints carry.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the UI's query for its model-training view


def artifact_root(uri: str) -> str | None:
    """Where a SQLite store keeps artifacts: <database folder>/artifacts, wherever it is run from.
    None for other stores (a server, a file store decides for itself)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def hide_default_experiment(client: Any) -> None:
    """Deletes (restorably: `mlflow experiments restore --experiment-id 0`) the empty "Default"
    experiment of a local store. MLflow's SQL store inserts it, id 0, when it creates its tables
    (SqlAlchemyStore.__init__), with its artifacts under the working directory of whichever process
    came first; it cannot be kept from being created, and this project never uses it. One with
    runs in it is kept."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    try:
        default = client.get_experiment("0")
        if default.name != "Default" or default.lifecycle_stage != "active":
            return
        if client.search_runs(["0"], run_view_type=ViewType.ALL, max_results=1):
            return
        client.delete_experiment("0")
    except MlflowException as e:
        log.debug(f"MLflow: kept the Default experiment ({first_line(e)})")


def creation_lock(uri: str) -> contextlib.AbstractContextManager:
    """For a SQLite store: one process at a time opens it first, creating or migrating its tables,
    and creates the experiment. (MLflow's table creation races: of four processes opening a fresh
    file at once, three failed, with migrations colliding.) Locks <database>.lock; elsewhere a no-op."""
    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(f"{uri.removeprefix('sqlite:///')}.lock")


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


# ---------------------------------------------------------------- retries and health
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


def backoff() -> Any:
    """tenacity's wait between tries: FIRST_RETRY_S, doubling up to LONGEST_RETRY_S."""
    import tenacity

    return tenacity.wait_exponential(multiplier=FIRST_RETRY_S, max=LONGEST_RETRY_S)


def retrying(call: Callable[[], T], what: str, retry_s: float | None = None) -> T:
    """call(), retried with backoff for up to `retry_s` (default: retry_seconds()) while it fails
    with a transient error; then (or at once for any other error) that error is raised. Says so
    in one line when it starts retrying."""
    import tenacity

    def say(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            log.warning(f"MLflow: {what} failed ({first_line(state.outcome.exception())}); retrying")

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        wait=backoff(),
        stop=tenacity.stop_before_delay(retry_seconds() if retry_s is None else retry_s),
        before_sleep=say,
        reraise=True,
    )(call)
