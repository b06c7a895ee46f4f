"""trainer.half: airbench's precision scheme, float16 weights without autocast or GradScaler."""

from __future__ import annotations

import torch
from torch import nn

from cifar_exp.errors import UserError


def to_half(model: nn.Module) -> nn.Module:
    """airbench's precision (trainer.half): float16 weights, BatchNorm's kept in float32 (its
    running statistics need the range; cuDNN takes float16 inputs with float32 parameters)."""
    model.half()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.float()
    return model


def sum_loss_hyperparameters(optimizer: torch.optim.Optimizer, batch: int) -> None:
    """For a loss summed over `batch` images instead of averaged (gradients `batch` times larger):
    SGD with lr / batch and weight_decay * batch takes exactly the steps it took on the mean loss
    (momentum, Nesterov and decay are all linear in the gradient). airbench's parametrisation;
    with float16 gradients it keeps small ones from underflowing. Other optimizers differ."""
    if type(optimizer) is not torch.optim.SGD:
        raise UserError(f"trainer.half=true supports optimizer=sgd only, not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        group["lr"] /= batch
        group["weight_decay"] *= batch
