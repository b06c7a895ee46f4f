"""An epoch's training time as time/epoch_s and throughput/images_per_s count it: the seconds
spent in training steps, not between them."""

from __future__ import annotations

import time

import torch


class StepClock:
    """Seconds spent in training steps, and in the syncs that wait for them (`with clock:` around
    each): what time/epoch_s and images/s count. What the loop does between steps is left out:
    the progress bar, logging and recording, a checkpoint on a signal, a search's reports. On a
    GPU the steps run ahead of the host, so the work they queue is counted when a sync waits for
    it. Other threads that slow the steps down (the record writer importing MLflow and opening
    the run, holding the GIL) still count: the steps did take that long."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> StepClock:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._started

    @staticmethod
    def wait_for(device: torch.device) -> None:
        """Until the steps queued on `device` are done (this syncs a GPU; a CPU's are done)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
