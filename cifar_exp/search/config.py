"""The sweeper's settings: `hydra/sweeper=optuna` (the plugin: hydra_plugins/cifar_exp_search).
Light on purpose: Hydra imports it on every start, so no Optuna or torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

TARGET = "hydra_plugins.cifar_exp_search.optuna_sweeper.OptunaSweeper"


class SamplerName(StrEnum):
    tpe = "tpe"  # Tree-structured Parzen Estimator: models good and bad trials so far
    random = "random"


class PrunerName(StrEnum):
    hyperband = "hyperband"  # successive halving over several brackets of starting budgets
    successive_halving = "successive_halving"  # asynchronous successive halving (ASHA)
    median = "median"  # stops a trial worse than the median of earlier trials at the same epoch
    none = "none"  # every trial trains all its epochs


class Direction(StrEnum):
    maximize = "maximize"
    minimize = "minimize"


@dataclass
class SamplerConfig:
    name: SamplerName = SamplerName.tpe
    seed: int | None = None  # set it: the same trials in the same order on every search
    n_startup_trials: int = 10  # tpe: random trials before it models the results


@dataclass
class PrunerConfig:
    name: PrunerName = PrunerName.hyperband
    # hyperband, successive_halving: reports (epochs x reports_per_epoch) every trial makes before
    # it can be stopped, and the fraction 1/reduction_factor of trials that go on at each rung
    min_resource: int = 1
    reduction_factor: int = 3
    # median: trials that finish before it prunes, and reports of each trial it never prunes
    n_startup_trials: int = 5
    n_warmup_steps: int = 1


@dataclass
class OptunaSweeperConfig:
    _target_: str = TARGET
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    direction: Direction = Direction.maximize
    # what each trial reports and returns at the end: the validation split's (a test metric only
    # when named: it chooses on the test split; with dataset.val_size=0, val/* reads test/*)
    metric: str = "val/acc"
    # reports to the pruner per epoch (each evaluates the validation split): more rungs for
    # Hyperband within few epochs; a pruner's min_resource counts these reports
    reports_per_epoch: int = 1
    n_trials: int = 20  # trials in the study in all: running the command again only adds the rest
    n_jobs: int = 1  # trials at once; more than 1 needs a parallel launcher (joblib, submitit)
    # null: <the MLflow store's folder>/optuna.journal (mlruns/ by default); a path: a journal
    # file; a URL (sqlite:///..., postgresql://...): Optuna's RDB storage
    storage: str | None = None
    # null: derived from the search (space, overrides, settings, base config), so the same command
    # continues the same study
    study_name: str | None = None
    # key: an override's value (choice(...), range(...), interval(...), tag(log, ...), a,b,c) or a
    # fixed value; command-line sweeps (key=a,b,c) join the space
    params: dict[str, Any] | None = None
