"""How training moves over its steps, beside the optimizer: the learning rate's schedule and
airbench's lookahead (the weights pulled onto their running average). Both depend only on the
step and the run's total steps, so a resumed run continues them exactly."""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    """hlb-cifar10/airbench's lookahead: every 5 steps the weights and BatchNorm statistics are
    pulled onto an exponential moving average of themselves, harder as training ends (decay
    0.95^5 * progress^3); after the last step the model becomes the average (as in airbench, a
    last step that is a multiple of 5 first takes its regular pull)."""

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.total_steps = total_steps

    def update(self, model: nn.Module, step: int) -> None:
        if step % 5 == 0:
            self._pull(model, 0.95**5 * (step / self.total_steps) ** 3)
        if step >= self.total_steps:
            self._pull(model, 1.0)

    @torch.no_grad()
    def _pull(self, model: nn.Module, decay: float) -> None:
        for average, current in zip(self.average.values(), model.state_dict().values(), strict=True):
            if current.dtype.is_floating_point:
                average.lerp_(current, 1 - decay)
                current.copy_(average)


def onecycle(step: int, total_steps: int, warmup_fraction: float) -> float:
    """trainer.lr_schedule=onecycle's multiplier of the base learning rate at `step`: linear
    0.2 -> 1 over the warm-up, then linear 1 -> 0.07 to the end (airbench's shape)."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 - 0.93 * (step - warmup) / max(1, total_steps - warmup)
