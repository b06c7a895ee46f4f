"""The Hydra callback that owns a sweep's parent MLflow run and its summary."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_exp import tracking
from cifar_exp.errors import UserError

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
            experiment_id = tracking.ensure_experiment(config.mlflow)
        except UserError as e:  # a bad store stops the sweep before any job (Hydra would only warn)
            print(e, file=sys.stderr)
            sys.exit(1)
        self.uri = tracking.tracking_uri(config.mlflow)
        overrides = list(config.hydra.overrides.task)
        params = dict(config.hydra.sweeper.get("params") or {})
        commit, dirty = tracking.git_state()
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
        os.environ[tracking.PARENT_RUN_ENV] = self.parent_id
        atexit.register(self.close)
        log.info(f"MLflow parent run {self.parent_id} for this sweep")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In a job that runs in another process (submitit, joblib), this callback is the sweep's,
        unpickled: its parent id and store go to the job whatever environment the job inherited
        (a cluster may start jobs with a clean one, as sbatch --export=NONE does)."""
        if self.parent_id and os.getpid() != self.pid:
            os.environ[tracking.PARENT_RUN_ENV] = self.parent_id
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
        os.environ.pop(tracking.PARENT_RUN_ENV, None)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        status = "FAILED"
        try:
            status = tracking.summarise_sweep(client, parent_id)
            if self.search:
                record_search(client, parent_id)
        finally:
            client.set_terminated(parent_id, status)


def record_search(client: Any, parent_id: str) -> None:
    """A search's parent gets the best child's value of every searched key as a `best/<key>` tag
    (best/test/acc and best_run_id come from tracking.summarise_sweep) and search/history.png:
    each child's test/acc in the order the children started, with the best so far."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from mlflow.entities import RunTag

    from cifar_exp import reports

    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=10000,
    )
    linked = [client.get_run(k.removeprefix("linked/")) for k in parent.data.tags if k.startswith("linked/")]
    children = sorted([*linked, *children], key=lambda run: run.info.start_time)
    values = [c.data.metrics.get("test/acc") if c.info.status == "FINISHED" else None for c in children]
    fig = reports.search_history_figure(values)
    client.log_figure(parent_id, fig, "search/history.png")
    reports.close(fig)

    best_id = parent.data.tags.get("best_run_id")
    if best_id is None:  # no child finished
        return
    overrides = json.loads(parent.data.tags.get("overrides", "[]"))
    searched = list(json.loads(parent.data.tags.get("sweep_params", "{}")))  # hydra.sweeper.params
    searched += [
        o.get_key_element()
        for o in OverridesParser.create().parse_overrides(overrides)
        if o.is_sweep_override()
    ]
    chosen = dict(
        item.lstrip("+~").partition("=")[::2]
        for item in json.loads(client.get_run(best_id).data.tags.get("overrides", "[]"))
    )
    tags = [RunTag(f"best/{key}", chosen[key]) for key in dict.fromkeys(searched) if key in chosen]
    client.log_batch(parent_id, tags=tags)
