"""Reading a store from a command: open it without creating it, ask it with a store that does not
answer said in one line, and find the experiment and a sweep's parent run by reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line


def open_store(uri: str) -> Any:
    """An MlflowClient on an existing store: a SQLite file that is not there is not created (one
    line: nothing recorded yet); one that cannot be read is said in one line."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"nothing recorded yet: no MLflow store at {uri.removeprefix('sqlite:///')}")
    try:
        return MlflowClient(uri)  # opens (and for SQLite reads) the store
    except Exception as e:  # noqa: BLE001 - a file that is not a database, a bad URI
        raise UserError(f"the MLflow store {uri} cannot be read: {first_line(e)}") from None


def asking(client: Any, call: Callable[[], Any]) -> Any:
    """call(), with a store that does not answer (or cannot be read) said in one line."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except Exception as e:  # MLflow's, sqlite3/SQLAlchemy's, requests': no server, not a database
        if isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"the MLflow store {client.tracking_uri} does not answer: {first_line(e)}") from None


def find_experiment(client: Any) -> Any:
    name = TrackingConfig().experiment_name
    experiment = asking(client, lambda: client.get_experiment_by_name(name))
    if experiment is None:
        raise UserError(f"nothing recorded yet: no experiment {name} in {client.tracking_uri}")
    return experiment


def find_sweep(client: Any, experiment_id: str, ref: str) -> Any:
    """The parent run of a sweep: `latest`, its run id, or the start of its id (unique)."""
    from mlflow.exceptions import MlflowException

    if ref != "latest" and len(ref) == 32:
        try:
            run = asking(client, lambda: client.get_run(ref))
        except MlflowException:
            raise UserError(f"no run {ref} in {client.tracking_uri}") from None
        if run.data.tags.get("sweep") != "true":
            raise UserError(f"run {ref} ({run.info.run_name}) is not a sweep's parent run")
        return run
    parents = asking(
        client,
        lambda: client.search_runs(
            [experiment_id], "tags.sweep = 'true'", order_by=["attributes.start_time DESC"], max_results=1000
        ),
    )
    if not parents:
        raise UserError(f"no sweeps in {client.tracking_uri} yet (one: cifar-exp model.conv1_out=8,16,32 -m)")
    if ref == "latest":
        return parents[0]
    matches = [p for p in parents if p.info.run_id.startswith(ref)]
    if len(matches) != 1:
        said = "no sweep" if not matches else f"{len(matches)} sweeps"
        raise UserError(
            f"{said} with a run id starting {ref} in {client.tracking_uri} (cifar-exp runs lists them)"
        )
    return matches[0]
