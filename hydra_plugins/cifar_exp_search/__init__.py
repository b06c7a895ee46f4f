"""Registers cifar_exp's Optuna sweeper as `hydra/sweeper=optuna` (Hydra imports every module under
hydra_plugins at start). The sweeper is cifar_exp.search.sweeper.OptunaSweeper."""

from hydra.core.config_store import ConfigStore

from cifar_exp.search.config import OptunaSweeperConfig

ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConfig, provider="cifar_exp"
)
