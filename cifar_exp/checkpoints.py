"""The checkpoint format, written and read in one place: which entries a checkpoint holds (the
training loop's state, the process-wide random-number states that make a resumed run continue
exactly where it stopped, the MLflow run it belongs to), where the file goes, and the atomic
write and weights_only read."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cifar_exp.atomic_write import replacing
from cifar_exp.errors import UserError, first_line

FILENAME = "checkpoint.pt"
FORMAT = "cifar_exp/1"
# The training loop's own state (Loop.state_dict()); beside it a checkpoint holds "format",
# "rng" (rng_states()) and "mlflow_run_id".
LOOP_KEYS = ("model", "optimizer", "scheduler", "lookahead", "scaler", "progress", "generator")


class Resumable(Protocol):
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def file_path(enabled: bool) -> Path | None:
    """<hydra output dir>/checkpoint.pt, or None with checkpoints off or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not enabled or not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir) / FILENAME


def writer(
    path: Path | None,
    run_id: Callable[[], str | None],
    before: Callable[[], None] = lambda: None,
    after: Callable[[Path], None] = lambda path: None,
) -> Callable[[dict[str, Any]], None] | None:
    """What the training loop calls with its state to checkpoint it into `path` (None: no
    checkpoints): the state, the random-number states of this moment and the run id (asked for
    at each write: the run may still be opening when training starts), saved. `before()` runs
    first (the tracker records the metrics of the steps this checkpoint holds: a kill then loses
    none), `after(path)` once the file is in place (the tracker names it)."""
    if path is None:
        return None

    def write(loop_state: dict[str, Any]) -> None:
        if set(loop_state) != set(LOOP_KEYS):
            raise ValueError(f"loop state has {sorted(loop_state)}, the format {sorted(LOOP_KEYS)}")
        before()
        save({"format": FORMAT, **loop_state, "rng": rng_states(), "mlflow_run_id": run_id()}, path)
        after(path)

    return write


def run_id(state: dict[str, Any]) -> str | None:
    """The MLflow run a checkpoint belongs to (None if it was written without tracking)."""
    return state.get("mlflow_run_id")


def resume(loop: Resumable, state: dict[str, Any]) -> None:
    """Puts a loaded checkpoint back: the loop's state, then the random-number states (last,
    because building the model and optimizer drew from them)."""
    loop.load_state_dict({key: state[key] for key in LOOP_KEYS})
    restore_rng_states(state["rng"])


def save(state: dict[str, Any], path: Path) -> None:
    """Writes `state` whole or not at all (atomic_write.replacing): a crash mid-write leaves the
    previous checkpoint intact."""
    try:
        with replacing(path) as f:
            torch.save(state, f)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint with weights_only=True; a missing, corrupt or foreign file is one line."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a checkpoint we can use
        raise UserError(f"{path} is not a readable cifar_exp checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a cifar_exp checkpoint (no 'format: {FORMAT}' entry)")
    return state


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python states, in types weights_only loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
