"""The front door: `python -m cifar_exp [overrides]` trains; `cifar-exp ui|rerun|resume|predict`
use what MLflow recorded. Bad input ends in one line on stderr and a non-zero exit
(HYDRA_FULL_ERROR=1 shows the traceback)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cifar_exp import signals
from cifar_exp.config import register_schemas

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_schemas()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> float:
    from cifar_exp.run import run

    return run(cfg)["test/acc"]


def main() -> None:
    signals.install()
    try:
        if len(sys.argv) > 1 and sys.argv[1] in ("ui", "rerun", "resume", "predict"):
            from cifar_exp import commands

            sys.exit(commands.dispatch(sys.argv[1], sys.argv[2:], train))
        train()
    except KeyboardInterrupt as e:
        terminated = isinstance(e, signals.Terminated)
        print("terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(143 if terminated else 130)


if __name__ == "__main__":
    main()
