"""The Hydra callback that owns a sweep's parent MLflow run: opens it before any job, joins every job
to it, and closes it with the summary (cifar_exp/sweep_summary.py) when the sweep ends."""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_exp import run_names
from cifar_exp.errors import UserError
from cifar_exp.search import space
from cifar_exp.search import study as search_study
from cifar_exp.search import trial as search_trial
from cifar_exp.search import trials as search_trials
from cifar_exp.sweep_summary import STORAGE, STUDY, summarise
from cifar_exp.tracking import identity, store
from cifar_exp.tracking.identity import JobContext

log = logging.getLogger(__name__)

PARAM_KEY = re.compile(r"^[\w\-. /:]+$")  # the characters MLflow accepts in a param's name
PARAM_CHARS = 6000  # MLflow's longest param value


class Job:
    """Hydra's task function: `train(cfg, context)` with the JobContext the sweep callback hands it
    as each job starts. Hydra gives on_job_start the task function beside the job's config (the one
    the task gets is copied before), and pickles both to a job that runs elsewhere (joblib,
    submitit): the one way into a job on every launcher."""

    def __init__(self, train: Callable[[DictConfig, JobContext | None], float]) -> None:
        self.__wrapped__ = train  # Hydra names the job after the function it wraps, as @hydra.main's
        self.context: JobContext | None = None

    def __call__(self, cfg: DictConfig) -> float:
        return self.__wrapped__(cfg, self.context)


class SweepCallback(Callback):
    """Creates the parent run before any job starts (so parallel jobs find the store and the
    experiment ready) and closes it with a summary when the sweep ends, also when a job failed:
    Hydra skips on_multirun_end then, so an atexit hook closes it."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.uri = ""
        self.search = False  # the sweeper picks trials from earlier results (Optuna), not a grid
        self.swept: list[str] = []  # the keys the sweep varies; its jobs are named by them
        self.claim: search_study.Claim | None = None  # a search's study, held while the sweep runs

    def __getstate__(self) -> dict[str, Any]:
        """Pickled to a job that runs elsewhere: without the study's lock, which stays here."""
        return {**self.__dict__, "claim": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            search = search_study.is_search(config)
            if search:  # its settings and space, before anything is written
                search_trials.check(config, list(config.hydra.overrides.task))
            if not config.mlflow.enabled:
                return
            swept, fixed = sweep_overrides(config)
            self.claim = claim = search_study.claim(config) if search else None
            experiment_id = store.ensure_experiment(config.mlflow)
        except UserError as e:  # a bad store, a busy study, an unreadable search space: before any job
            self.release()
            print(e, file=sys.stderr)
            sys.exit(1)
        from mlflow.tracking import MlflowClient

        self.uri = store.tracking_uri(config.mlflow)
        self.search = not str(config.hydra.sweeper._target_).endswith(".BasicSweeper")
        self.swept = list(swept)
        client = MlflowClient(self.uri)
        tags = {
            "sweep": "true",
            "overrides": json.dumps(list(config.hydra.overrides.task)),
            "sweep_params": json.dumps(swept),
            "hydra_sweep_dir": str(config.hydra.sweep.dir),
        }
        earlier = None
        if claim is not None:  # the parent of an earlier search of this study (stopped, or fewer trials)
            sweeper = config.hydra.sweeper
            tags[STUDY], tags[STORAGE] = claim.name, claim.storage
            tags["search/metric"], tags["search/direction"] = sweeper.metric, str(sweeper.direction)
            found = client.search_runs([experiment_id], f"tags.`{STUDY}` = '{claim.name}'", max_results=1)
            earlier = found[0].info.run_id if found else None
        name = sweep_name(swept, self.search, time.time())
        self.parent_id = open_parent(client, experiment_id, name, tags, {**fixed, **swept}, earlier)
        atexit.register(self.close)
        log.info(f"MLflow parent run {self.parent_id} for this sweep ({name})")

    def on_job_start(self, config: DictConfig, task_function: Any = None, **kwargs: Any) -> None:
        """Hands the job its context: the parent run, the swept keys and the store (in a job that runs
        in another process, this callback is the sweep's, unpickled: the job finds them whatever
        environment it inherited, as with sbatch --export=NONE), and a search's trial."""
        if isinstance(task_function, Job):  # each job's own: the next one's start replaces it
            trial = search_trial.link(config)
            task_function.context = JobContext(self.parent_id, tuple(self.swept), self.uri or None, trial)
        # Parallel jobs (hydra/launcher=joblib) on several GPUs: one GPU per worker, so keep
        # hydra.launcher.n_jobs at most the GPU count. Does nothing on CPU or with one GPU.
        if "joblib" in str(config.hydra.launcher.get("_target_")) and config.device.name != "cpu":
            from cifar_exp.devices import claim_gpu

            claim_gpu(config.hydra.job.num, Path(config.hydra.sweep.dir) / ".gpu_locks")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close(completed=True)

    def close(self, completed: bool = False) -> None:
        """Writes the summary and sets the parent's status from its children (once). A search
        that `completed` (every trial told to its study) ends FINISHED with a best trial, FAILED
        without one, whatever an earlier controller of the study left behind."""
        if self.parent_id is None:
            return
        parent_id, self.parent_id = self.parent_id, None
        self.release()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        status, text = "FAILED", ""
        try:
            status, text = summarise(client, parent_id, self.search, completed)
        finally:
            client.set_terminated(parent_id, status)
        print(f"\n{text}", end="", flush=True)  # the sweep's answer, as `cifar-exp compare` prints it

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


def open_parent(
    client: Any,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    params: dict[str, str],
    run_id: str | None,
) -> str:
    """Creates the sweep's parent run, or reopens `run_id`; tags it with the code's state and
    records what the sweep holds fixed and what it varies (as typed: "8,16,32") as its params."""
    from mlflow.entities import Param

    commit, dirty = identity.git_state()
    tags = {**tags, "git_commit": commit, "git_dirty": str(dirty)}
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    recorded = client.get_run(run_id).data.params
    batch = [
        Param(key, str(value)[:PARAM_CHARS])
        for key, value in params.items()
        if PARAM_KEY.match(key) and key not in recorded  # MLflow refuses a changed value
    ]
    client.log_batch(run_id, params=batch)
    return run_id


# ---------------------------------------------------------------- what a sweep varies
def sweep_overrides(config: DictConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(swept, fixed): the keys the sweep varies with their values as written ({'model.conv1_out':
    '8,16,32'}, an Optuna search's 'tag(log, interval(0.001, 0.3))'), and the overrides it holds
    fixed ({'dataset': 'synthetic'}), from hydra.sweeper.params and the command line, in that
    order: a later override of a key wins, as in Hydra."""
    items = space.items(config.hydra.sweeper.get("params"), list(config.hydra.overrides.task))
    swept: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for item, override in space.last_overrides(items):
        key, value = override.key_or_group, item.partition("=")[2]
        if override.is_sweep_override():
            swept[key] = value
        else:
            fixed[key] = value if not override.is_delete() else "(deleted)"
    return swept, fixed


def sweep_name(swept: dict[str, str], search: bool, started: float) -> str:
    """'sweep conv1_out=8,16,32 lr=0.01,0.1 @ 06-12 15:30:12': what it varies (short keys; only the
    keys when the values are long, or for a search, whose values are distributions) and when it
    started, which tells two sweeps of the same keys apart."""
    short = run_names.short_keys(list(swept))
    what = " ".join(f"{short[key]}={values}" for key, values in swept.items())
    if search or len(what) > 48:
        what = ",".join(short.values())
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(started))
    return f"{'search' if search else 'sweep'} {what or 'default'} @ {stamp}"
