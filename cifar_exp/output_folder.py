"""The run folder is checked before anything is written: a Hydra callback that makes the output
folder (hydra.run.dir, or hydra.sweep.dir for -m) before Hydra would, and refuses in one line when
it cannot be made or written to (a file in its path, a read-only parent), instead of Hydra's
traceback. Listed before the sweep callback, so a sweep opens no MLflow parent run either."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_exp.errors import UserError


def check_output_folder(key: str, folder: str) -> None:
    """Makes `folder` (Hydra makes it next anyway) and writes a file in it: a folder that exists
    but is read-only would otherwise fail at the first log line or checkpoint."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(
            f"{key}={folder}: cannot make the run folder ({_why(folder, e)}); choose a folder you "
            f"can write, e.g. {key}=outputs/my_run"
        ) from None


def _why(folder: str, error: OSError) -> str:
    """Says "/data/x is a file" rather than "Not a directory": the part of the path in the way."""
    for part in (Path(folder), *Path(folder).parents):
        if part.exists() and not part.is_dir():
            return f"{part} is a file"
    where = f": {error.filename}" if error.filename and os.fspath(error.filename) != folder else ""
    return f"{error.strerror or error}{where}"


class OutputFolderCheck(Callback):
    """Hydra turns an exception in a callback into a warning and goes on: a refusal exits here,
    as the sweep callback's do."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", str(config.hydra.sweep.dir))

    @staticmethod
    def _check(key: str, folder: str) -> None:
        try:
            check_output_folder(key, folder)
        except UserError as e:
            print(e, file=sys.stderr)
            sys.exit(1)
