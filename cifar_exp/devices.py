"""Device choice, DataParallel wrapping and unwrapping."""

from __future__ import annotations

import torch
from torch import nn

from cifar_exp.config import DeviceConfig, UserError

DEVICE_NAMES = ("auto", "cpu", "cuda")


# Below this batch size a step is mostly per-op overhead, and waking a second thread for each
# tiny op costs more than it saves (measured on 2 cores: batch 4 runs ~2x faster on 1 thread).
SMALL_BATCH = 32


def select_device(cfg: DeviceConfig, batch_size: int) -> torch.device:
    """auto: CUDA when a GPU is visible, else CPU. On CPU also sets torch's thread count:
    `threads`, or with threads=0 one thread for small batches and torch's default otherwise."""
    if cfg.name not in DEVICE_NAMES:
        raise UserError(f"device.name={cfg.name!r}: allowed are {', '.join(DEVICE_NAMES)}")
    if cfg.threads < 0:
        raise UserError(f"device.threads={cfg.threads}: must be 0 (automatic) or more")
    if cfg.name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible here; use device=cpu or device=auto")
    if cfg.name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif batch_size < SMALL_BATCH:
        torch.set_num_threads(1)
    return torch.device("cpu")


def wrap_model(model: nn.Module, device: torch.device, data_parallel: bool) -> tuple[nn.Module, int]:
    """Moves the model to `device`; with several GPUs visible and `data_parallel`, wraps it in
    DataParallel. Returns the model to train and the number of GPUs it uses (0 on CPU)."""
    model = model.to(device)
    if device.type != "cuda":
        return model, 0
    gpus = torch.cuda.device_count()
    if data_parallel and gpus > 1:
        return nn.DataParallel(model), gpus
    return model, 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DataParallel/DDP/torch.compile, so saved weights carry no prefix."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
