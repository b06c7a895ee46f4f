"""cifar_exp's Optuna sweeper as Hydra wants a plugin: a class in hydra_plugins (Hydra imports this
module at every start, so it stays light). The search itself is cifar_exp/search/trials.py."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # as in cifar_exp.search.config; read from the config in sweep()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from cifar_exp.search.trials import search

        return search(self.config, self.launcher, arguments)
