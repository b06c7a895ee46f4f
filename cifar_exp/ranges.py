"""What a number may be: `Range`, and the bounds shared by the config's keys and the networks'
arguments. A constructor states an argument's range in its type hint,
`width: Annotated[int, Range(1, MAX_WIDTH)]`, and validation.validate checks it under the
argument's config key before anything is built, as it checks validation.RANGES."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

MAX_EPOCHS = 10_000  # CIFAR-10 for 10,000 epochs is weeks on one GPU: more is a typo
# Channels or units of one layer. Common CIFAR networks stop at 512-1024; at 4096 the CNN's fc1
# alone (conv2_out=4096 x 5 x 5 -> fc1_out=4096) holds 420 M weights, 1.7 GB before optimizer
# state. Larger widths would not fit in memory, or take minutes to allocate before failing.
MAX_WIDTH = 4096


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (ends excluded where open), finite; for a list, each item."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # said after the range: why, or what the values mean

    def allows(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        low = _number(self.low)
        if self.high == math.inf:
            text = f"> {low}" if self.low_open else f">= {low}"
        else:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{low}, {_number(self.high)}{right}"
        return f"{text} ({self.note})" if self.note else text


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


# Channels or units of a layer, as a network's argument: `conv1_out: Width`.
Width = Annotated[int, Range(1, MAX_WIDTH, note="wider layers would not fit in memory")]
