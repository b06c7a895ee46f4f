"""Checkpoint files: written atomically, read back with weights_only=True, and the random-number
states that make a resumed run continue exactly where it stopped."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_exp.errors import UserError, first_line

FILENAME = "checkpoint.pt"


def save(state: dict[str, Any], path: Path) -> None:
    """Writes `state` to a temporary file in the same folder, flushes and fsyncs it, then renames
    it over `path`: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint with weights_only=True; a missing, corrupt or foreign file is one line."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a checkpoint we can use
        reason = first_line(e)
        raise UserError(f"{path} is not a readable cifar_exp checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != "cifar_exp/1":
        raise UserError(f"{path} is not a cifar_exp checkpoint (no 'format: cifar_exp/1' entry)")
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
