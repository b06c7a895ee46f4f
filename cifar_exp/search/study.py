"""The study a search runs in: where it is stored, its name, the lock that keeps one controller
per study, and the sampler and pruner built from the settings (the same in the controller, which
asks, and in each job, which reports)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cifar_exp.atomic_write import replacing
from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line
from cifar_exp.search.config import TARGET, PrunerName, SamplerName
from cifar_exp.tracking.identity import config_hash
from cifar_exp.tracking.store import STORE_DIR, local_store_folder, tracking_uri

if TYPE_CHECKING:
    from filelock import BaseFileLock

JOURNAL = "optuna.journal"  # the default storage's file, in the MLflow store's folder
OLD_PLUGIN = "hydra_plugins.hydra_optuna_sweeper"


def is_search(config: DictConfig) -> bool:
    """Does this sweep run on cifar_exp's Optuna sweeper? One line if the retired
    hydra-optuna-sweeper plugin, still installed, took its place."""
    target = str(config.hydra.sweeper.get("_target_", ""))
    if target.startswith(OLD_PLUGIN):
        raise UserError(
            "hydra/sweeper=optuna is hydra-optuna-sweeper's here, which cifar-exp no longer uses: "
            "pip uninstall hydra-optuna-sweeper"
        )
    return target == TARGET


@dataclass
class Claim:
    """A study taken by its holder (the sweep callback, the sweeper): its name, storage, and the
    lock, held until the holder releases it or the process ends."""

    name: str
    storage: str
    lock: BaseFileLock

    def release(self) -> None:
        """Lets the study go; another process may search it once every holder here released it."""
        self.lock.release()


def claim(config: DictConfig) -> Claim:
    """Takes the study this sweep config names: one line if another process searches it now. Holders
    in this process share one lock (a singleton, counted: the sweep callback and the sweeper both
    hold it); a file lock, so a crashed controller leaves none behind. The holder's pid is in
    optuna-<study>.pid beside it, for that line."""
    from filelock import FileLock, Timeout

    name, storage = study_name(config), storage_of(config)
    folder = _store_folder(config.mlflow)
    folder.mkdir(parents=True, exist_ok=True)
    # the process's lock, not a thread's; one object per file, so this process may take it again
    lock = FileLock(folder / f"optuna-{name}.lock", thread_local=False, is_singleton=True)
    holder = folder / f"optuna-{name}.pid"
    try:
        lock.acquire(blocking=False)
    except Timeout:
        pid = holder.read_text().strip() if holder.is_file() else ""
        raise UserError(
            f"study {name} is being searched by another process (pid {pid or '?'}); wait for it or stop it"
        ) from None
    with replacing(holder) as f:
        f.write(str(os.getpid()).encode())
    return Claim(name, storage, lock)


def study_name(config: DictConfig) -> str:
    """hydra.sweeper.study_name, else 'search-' and a digest of what decides the trials: the base
    config, the search space, the command line, the sampler, pruner, direction, metric and
    reports_per_epoch (what a report's step means) (not n_trials or n_jobs: a larger n_trials
    continues the same study)."""
    sweeper = config.hydra.sweeper
    if sweeper.study_name:
        return str(sweeper.study_name)
    base = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    settings = OmegaConf.to_container(sweeper, resolve=True, enum_to_str=True)
    what = {
        "config": config_hash(base),
        "overrides": list(config.hydra.overrides.task),
        **{
            key: settings[key]
            for key in ("params", "sampler", "pruner", "direction", "metric", "reports_per_epoch")
        },
    }
    return "search-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def storage_of(config: DictConfig) -> str:
    """hydra.sweeper.storage, else the journal file in the MLflow store's folder (mlruns/ for a
    server). A relative path is made absolute, so jobs in other folders find the same study."""
    storage = config.hydra.sweeper.storage
    if storage is None:
        return str(_store_folder(config.mlflow) / JOURNAL)
    if "://" in storage:
        return str(storage)
    return str(Path(storage).expanduser().resolve())


def _store_folder(mlflow: DictConfig | TrackingConfig) -> Path:
    return (local_store_folder(tracking_uri(mlflow)) or STORE_DIR).resolve()


def open_storage(storage: str) -> Any:
    """Optuna's storage: RDB for a URL, a journal file (safe for many processes) for a path."""
    import optuna

    try:
        if "://" in storage:
            return optuna.storages.RDBStorage(storage)
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(storage)
        return optuna.storages.JournalStorage(backend)
    except Exception as e:  # a bad URL, a missing database driver, a read-only folder
        raise UserError(f"hydra.sweeper.storage={storage}: {first_line(e)}") from None


def best_trial(found: Any) -> Any:
    """The study's best trial (a FrozenTrial), None before one completed: the best value among
    COMPLETE trials, pruned and failed ones never, the lowest number among equal values (Optuna's
    rule). The one source of a search's best: the console's "best trial N", the parent run's
    best (sweep_summary) and optimization_results.yaml all name it."""
    import optuna

    if not found.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    return found.best_trial


def stored_best(name: str, storage: str) -> int | None:
    """The number of study `name`'s best trial (best_trial), read from `storage`; None when it
    has none yet or cannot be read here (a storage on another machine)."""
    import optuna

    if "://" not in storage and not Path(storage).is_file():
        return None  # not here: opening it would create an empty journal
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        best = best_trial(optuna.load_study(study_name=name, storage=open_storage(storage)))
    except Exception:  # noqa: BLE001 - the summary then ranks the children itself
        return None
    return None if best is None else best.number


def make_sampler(sampler: DictConfig, trials_so_far: int) -> Any:
    """The sampler, seeded with sampler.seed plus the trials the study holds already: a continued
    study draws new values (seeded afresh, it would repeat its first trials), still reproducibly."""
    import optuna

    seed = None if sampler.seed is None else sampler.seed + trials_so_far
    if sampler.name == SamplerName.random:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sampler.n_startup_trials)


def make_pruner(pruner: DictConfig, epochs: float, reports_per_epoch: int) -> Any:
    """The pruner; its steps are a trial's reports (1-based; reports_per_epoch an epoch), and its
    whole budget the reports of a trial never pruned (its epochs rounded up, as the loop counts)."""
    import optuna

    if pruner.name == PrunerName.hyperband:
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_resource,
            max_resource=max(pruner.min_resource, math.ceil(epochs) * reports_per_epoch),
            reduction_factor=pruner.reduction_factor,
        )
    if pruner.name == PrunerName.successive_halving:
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner.min_resource, reduction_factor=pruner.reduction_factor
        )
    if pruner.name == PrunerName.median:
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps
        )
    return optuna.pruners.NopPruner()


def check_settings(sweeper: DictConfig) -> None:
    """Ranges the schema's types cannot say, one line each, before anything is asked."""
    for key, least in (("n_trials", 1), ("n_jobs", 1), ("reports_per_epoch", 1)):
        if sweeper[key] < least:
            raise UserError(f"hydra.sweeper.{key}={sweeper[key]} must be at least {least}")
    pruner = sweeper.pruner
    if pruner.min_resource < 1:
        raise UserError(
            f"hydra.sweeper.pruner.min_resource={pruner.min_resource} must be at least 1 (reports)"
        )
    if pruner.reduction_factor < 2:
        raise UserError(f"hydra.sweeper.pruner.reduction_factor={pruner.reduction_factor} must be at least 2")
    if pruner.n_startup_trials < 0 or pruner.n_warmup_steps < 0:
        raise UserError("hydra.sweeper.pruner.n_startup_trials and n_warmup_steps must be 0 or more")
    if sweeper.sampler.n_startup_trials < 0:
        raise UserError("hydra.sweeper.sampler.n_startup_trials must be 0 or more")
