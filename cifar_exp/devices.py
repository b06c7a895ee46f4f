"""Device choice, DataParallel wrapping and unwrapping."""

from __future__ import annotations

import torch
from torch import nn

from cifar_exp.config import DeviceConfig, UserError

DEVICE_NAMES = ("auto", "cpu", "cuda")


def select_device(cfg: DeviceConfig) -> torch.device:
    """auto: CUDA when a GPU is visible, else CPU. Also applies `threads` for CPU work."""
    if cfg.name not in DEVICE_NAMES:
        raise UserError(f"device.name={cfg.name!r}: allowed are {', '.join(DEVICE_NAMES)}")
    if cfg.threads < 0:
        raise UserError(f"device.threads={cfg.threads}: must be 0 (torch's default) or more")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible here; use device=cpu or device=auto")
    if cfg.name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


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
