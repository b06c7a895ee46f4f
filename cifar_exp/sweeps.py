"""The Hydra callback that owns a sweep's parent MLflow run and its summary."""

from __future__ import annotations

import atexit
import json
import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_exp import tracking

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """Creates the parent run before any job starts (so parallel jobs find the store and the
    experiment ready) and closes it with a summary when the sweep ends, also when a job failed:
    Hydra skips on_multirun_end then, so an atexit hook closes it."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.uri = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.mlflow.enabled:
            return
        from mlflow.tracking import MlflowClient

        experiment_id = tracking.ensure_experiment(config.mlflow)
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
        os.environ[tracking.PARENT_RUN_ENV] = self.parent_id
        atexit.register(self.close)
        log.info(f"MLflow parent run {self.parent_id} for this sweep")

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
        finally:
            client.set_terminated(parent_id, status)
