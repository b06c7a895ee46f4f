"""The Hydra callback that owns a sweep's parent MLflow run, and the sweep's summary."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_exp import reports
from cifar_exp.errors import UserError
from cifar_exp.tracking import identity, store

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """Creates the parent run before any job starts (so parallel jobs find the store and the
    experiment ready) and closes it with a summary when the sweep ends, also when a job failed:
    Hydra skips on_multirun_end then, so an atexit hook closes it."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.uri = ""
        self.search = False  # the sweeper picks trials from earlier results (Optuna), not a grid
        self.pid = 0  # the process that owns the parent run

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.mlflow.enabled:
            return
        from mlflow.tracking import MlflowClient

        try:
            experiment_id = store.ensure_experiment(config.mlflow)
        except UserError as e:  # a bad store stops the sweep before any job (Hydra would only warn)
            print(e, file=sys.stderr)
            sys.exit(1)
        self.uri = store.tracking_uri(config.mlflow)
        overrides = list(config.hydra.overrides.task)
        params = dict(config.hydra.sweeper.get("params") or {})
        commit, dirty = identity.git_state()
        run = MlflowClient(self.uri).create_run(
            experiment_id,
            run_name="sweep:" + (",".join(overrides + [f"{k}={v}" for k, v in params.items()]) or "default"),
            tags={
                "sweep": "true",
                "overrides": json.dumps(overrides),
                "sweep_params": json.dumps(params),
                "git_commit": commit,
                "git_dirty": str(dirty),
                "hydra_sweep_dir": str(config.hydra.sweep.dir),
            },
        )
        self.parent_id = run.info.run_id
        self.search = not str(config.hydra.sweeper._target_).endswith(".BasicSweeper")
        self.pid = os.getpid()
        identity.join_sweep(self.parent_id)
        atexit.register(self.close)
        log.info(f"MLflow parent run {self.parent_id} for this sweep")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In a job that runs in another process (submitit, joblib), this callback is the sweep's,
        unpickled: its parent id and store go to the job whatever environment the job inherited
        (a cluster may start jobs with a clean one, as sbatch --export=NONE does)."""
        if self.parent_id and os.getpid() != self.pid:
            identity.join_sweep(self.parent_id)
            os.environ["MLFLOW_TRACKING_URI"] = self.uri  # unless mlflow.tracking_uri names it
        # Parallel jobs (hydra/launcher=joblib) on several GPUs: one GPU per worker, so keep
        # hydra.launcher.n_jobs at most the GPU count. Does nothing on CPU or with one GPU.
        if "joblib" in str(config.hydra.launcher.get("_target_")) and config.device.name != "cpu":
            from cifar_exp.devices import claim_gpu

            claim_gpu(config.hydra.job.num, Path(config.hydra.sweep.dir) / ".gpu_locks")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Writes the summary and sets the parent's status from its children (once)."""
        if self.parent_id is None:
            return
        parent_id, self.parent_id = self.parent_id, None
        identity.join_sweep(None)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        status = "FAILED"
        try:
            status = summarise(client, parent_id, self.search)
        finally:
            client.set_terminated(parent_id, status)


# ---------------------------------------------------------------- the summary
def summarise(client: Any, parent_id: str, search: bool = False) -> str:
    """Records on the parent run the sweep table (swept values against each child's final
    test/acc and test/loss, CSV and markdown), a plot of test/acc against each swept numeric key,
    best/test/acc and best_run_id; for a search also the best child's value of every searched key
    (`best/<key>` tags) and search/history.png. Returns the parent's status, which follows the
    children's."""
    from mlflow.entities import Metric, RunTag

    parent = client.get_run(parent_id)
    children = sweep_children(client, parent)
    rows, swept = summary_rows(children)
    files: dict[str, str | bytes] = {
        "sweep/summary.csv": reports.csv_table(rows),
        "sweep/summary.md": reports.markdown_table(rows),
    }
    numeric = [k for k in swept if all(_is_number(r[k]) for r in rows if r[k] != "")]
    if rows and numeric:
        files["sweep/test_acc.png"] = reports.figure_png(reports.sweep_figure(rows, numeric))
    tags, metrics = [], []
    finished = [r for r in rows if r["status"] == "FINISHED" and r["test/acc"] != ""]
    best = max(finished, key=lambda r: r["test/acc"]) if finished else None
    if best is not None:
        metrics.append(Metric("best/test/acc", best["test/acc"], int(time.time() * 1000), 0))
        tags.append(RunTag("best_run_id", best["run_id"]))
    if search:
        values = [c.data.metrics.get("test/acc") if c.info.status == "FINISHED" else None for c in children]
        files["search/history.png"] = reports.figure_png(reports.search_history_figure(values))
        if best is not None:
            chosen = next(c for c in children if c.info.run_id == best["run_id"])
            tags += [RunTag(f"best/{k}", v) for k, v in searched_values(parent, chosen).items()]
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        client.log_artifacts(parent_id, tmp)
    statuses = {r["status"] for r in rows}
    if not rows or "FAILED" in statuses:
        return "FAILED"
    return "FINISHED" if statuses == {"FINISHED"} else "KILLED"


def sweep_children(client: Any, parent: Any) -> list[Any]:
    """The parent's children and the runs it linked (finished in an earlier sweep), in the order
    they started."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=10000,
    )
    linked = [client.get_run(k.removeprefix("linked/")) for k in parent.data.tags if k.startswith("linked/")]
    return sorted([*linked, *children], key=lambda run: run.info.start_time)


def summary_rows(children: list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per child: name, overridden values, final test/acc and test/loss, status, run id;
    and the overridden keys."""
    swept: list[str] = []
    rows = []
    for child in children:
        row: dict[str, Any] = {"run": child.info.run_name, "status": child.info.status}
        for key, value in _overrides(child).items():
            row[key] = value
            swept += [key] if key not in swept else []
        for metric in ("test/acc", "test/loss"):
            row[metric] = child.data.metrics.get(metric, "")
        row["run_id"] = child.info.run_id
        rows.append(row)
    columns = ["run", *swept, "test/acc", "test/loss", "status", "run_id"]
    return [{c: r.get(c, "") for c in columns} for r in rows], swept


def searched_values(parent: Any, best: Any) -> dict[str, str]:
    """The best child's value of every key the search chose: hydra.sweeper.params and the sweep
    overrides of the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = json.loads(parent.data.tags.get("overrides", "[]"))
    searched = list(json.loads(parent.data.tags.get("sweep_params", "{}")))
    searched += [
        o.get_key_element()
        for o in OverridesParser.create().parse_overrides(overrides)
        if o.is_sweep_override()
    ]
    chosen = _overrides(best, keep_internal=True)
    return {key: chosen[key] for key in dict.fromkeys(searched) if key in chosen}


def _overrides(run: Any, keep_internal: bool = False) -> dict[str, str]:
    """A run's command-line overrides as {key: value}, without mlflow.* and hydra.* ones."""
    out = {}
    for item in json.loads(run.data.tags.get("overrides", "[]")):
        key, _, value = item.lstrip("+~").partition("=")
        if keep_internal or not key.startswith(("mlflow.", "hydra.")):
            out[key] = value
    return out


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
