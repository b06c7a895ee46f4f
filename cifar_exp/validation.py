"""Every config value's range, checked by validate(cfg) before a run builds or records anything:
what the schema's types (cifar_exp/config.py, checked at compose time) cannot say. Each refusal is
one line naming the key, the value and what is allowed.

Upper bounds stop values that would exhaust memory or never end, not unusual experiments: a
learning rate has none (one that diverges is a result, and the run says so), a batch larger than
the training set is the whole set (check_batch_size says so once).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from cifar_exp.config import TARGETS
from cifar_exp.errors import UserError, first_line

log = logging.getLogger(__name__)

MAX_EPOCHS = 10_000  # CIFAR-10 for 10,000 epochs is weeks on one GPU: more is a typo
# Synthetic images per split: 200,000 are 2.4 GB once normalised to float32 (4x CIFAR-10's train set).
MAX_SYNTHETIC_IMAGES = 200_000
# Channels or units of one layer. Common CIFAR networks stop at 512-1024; at 4096 the CNN's fc1
# alone (conv2_out=4096 x 5 x 5 -> fc1_out=4096) holds 420 M weights, 1.7 GB before optimizer
# state. Larger widths would not fit in memory, or take minutes to allocate before failing.
MAX_WIDTH = 4096
MAX_THREADS = 1024  # CPU threads for torch; far past any machine's cores
SEED_MAX = 2**32 - 1  # numpy's seeds are 0 ... 2**32 - 1 (torch takes more)


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


_PIXEL_STATS = "per-channel statistics of pixels in [0, 1]; 0-255 values? divide them by 255"
_WIDTH = "wider layers would not fit in memory"
RANGES = {  # a key absent from the composed config (another option's key) is not checked
    "seed": Range(0, SEED_MAX, note="numpy's seed range"),
    "dataset.mean": Range(0, 1, note=_PIXEL_STATS),
    "dataset.std": Range(0, 1, low_open=True, note=_PIXEL_STATS),
    "dataset.train_size": Range(10, MAX_SYNTHETIC_IMAGES, note="at least one image per class"),
    "dataset.test_size": Range(10, MAX_SYNTHETIC_IMAGES, note="at least one image per class"),
    "dataset.noise": Range(0, 10, note="std of the noise, pixels in [0, 1]; above 1 the images are noise"),
    "dataset.seed": Range(0, SEED_MAX, note="numpy's seed range"),
    "dataset.val_size": Range(0, note="a fraction below 1, or a number of images; 0: no validation split"),
    "dataset.split_seed": Range(0, SEED_MAX, note="numpy's seed range"),
    "model.conv1_out": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.conv2_out": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.fc1_out": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.fc2_out": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.kernel_size": Range(1, 32, note="pixels; the 32x32 image is the widest"),
    "model.whiten_width": Range(2, 24, note="even: +/- pairs of the 12 eigenvectors of 2x2x3 patches"),
    "model.block1": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.block2": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.block3": Range(1, MAX_WIDTH, note=_WIDTH),
    "model.batchnorm_momentum": Range(0, 1, high_open=True, note="weight of the old running statistics"),
    "model.whiten_bias_epochs": Range(0, MAX_EPOCHS),
    "optimizer.lr": Range(0, low_open=True),
    "optimizer.weight_decay": Range(0),
    "optimizer.norm_bias_lr_scale": Range(0, low_open=True),
    "optimizer.momentum": Range(0, 1, high_open=True),
    "optimizer.betas": Range(0, 1, high_open=True),
    "device.threads": Range(0, MAX_THREADS, note="0: automatic"),
    "trainer.epochs": Range(0, MAX_EPOCHS, low_open=True, note="fractions allowed, e.g. 9.9"),
    # No upper bound: a batch never holds more than the training set (check_batch_size says so).
    "trainer.batch_size": Range(1),
    "trainer.log_every_n_steps": Range(1),
    "trainer.test_batch_size": Range(1),
    "trainer.warmup_fraction": Range(0, 1),
    "trainer.label_smoothing": Range(0, 1, high_open=True),
    "trainer.translate": Range(0, 31, note="pixels; reflect padding needs fewer than the image's 32"),
    "trainer.tta": Range(0, 2, note="0: none, 1: + mirror, 2: + mirror and 1-pixel shifts"),
    "mlflow.min_free_mb": Range(0),
}
LENGTHS = {"dataset.mean": 3, "dataset.std": 3, "optimizer.betas": 2}  # lists of exactly this many
# Strings that may be null (the default) but not empty: an empty value is usually a shell
# variable that expanded to nothing (`resume=$RUN_ID`), which would silently mean the default.
NOT_EMPTY = {
    "resume": "a run id or a checkpoint file, or null",
    "dataset.root": "a folder; . for the working directory",
    "dataset.cache_dir": "a folder, or null for the default",
    "mlflow.tracking_uri": "a URI (sqlite:///path/mlflow.db, http://host:5000), or null for the default",
    "mlflow.experiment_name": "a name",
}


def validate(cfg: DictConfig) -> None:
    """Checks every range the schema's types cannot express, before anything is built or
    recorded; the first bad value raises a UserError: one line naming the key and what is allowed."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        values = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:  # key=${nowhere}
        raise UserError(f"{e.full_key}: {first_line(e)}; fix or remove the ${{...}} reference") from None
    for key in missing:
        raise UserError(f"{key}=???: no value; set {key}=VALUE")
    for key, rule in RANGES.items():
        value = _get(values, key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if key in LENGTHS and len(items) != LENGTHS[key]:
            raise UserError(f"{key}={value}: must be a list of {LENGTHS[key]} numbers, each {rule}")
        if not all(rule.allows(x) for x in items):
            each = "each number " if isinstance(value, list) else ""
            finite = "" if all(math.isfinite(x) for x in items) else "finite and "
            raise UserError(f"{key}={value}: {each}must be {finite}{rule}")
    for key, allowed in NOT_EMPTY.items():
        value = _get(values, key)
        if value is not None and not str(value).strip():
            raise UserError(f"{key}={value!r}: empty; must be {allowed}")
    for group, namespace in TARGETS.items():
        target = _get(values, f"{group}._target_")
        if target is not None and not str(target).startswith(namespace):
            raise UserError(f"{group}._target_={target!r}: must name a callable in {namespace}*")
    _validate_combinations(values)


def _validate_combinations(values: dict[str, Any]) -> None:
    """Rules over more than one key, and single-key rules a range cannot say."""
    optimizer = values.get("optimizer") or {}
    if optimizer.get("_partial_", True) is not True:
        raise UserError(
            f"optimizer._partial_={optimizer['_partial_']}: must be true (the optimizer is built "
            "later, with the model's parameters)"
        )
    if optimizer.get("nesterov") and optimizer.get("momentum", 0) <= 0:  # torch.optim.SGD's rule
        raise UserError(
            f"optimizer.nesterov=true needs optimizer.momentum > 0 (it is {optimizer.get('momentum')}); "
            "set optimizer.momentum or optimizer.nesterov=false"
        )
    lr, scale = optimizer.get("lr", 1), optimizer.get("norm_bias_lr_scale", 1)
    if not math.isfinite(lr * scale):
        raise UserError(f"optimizer.lr={lr} x optimizer.norm_bias_lr_scale={scale} overflows: lower either")
    uri = _get(values, "mlflow.tracking_uri")
    if uri is not None and not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", str(uri)):  # a scheme, not C:
        raise UserError(
            f"mlflow.tracking_uri={uri}: not a URI; use sqlite:///path/mlflow.db, http://host:5000, or "
            "null for the default (a plain folder is MLflow's file store, which MLflow 3 refuses)"
        )
    trainer = values.get("trainer") or {}
    if trainer.get("half") and trainer.get("autocast"):
        raise UserError(
            "trainer.half=true trains float16 weights, without autocast: add trainer.autocast=false"
        )
    width = _get(values, "model.whiten_width")
    if width is not None and width % 2:
        raise UserError(f"model.whiten_width={width}: must be even (+/- pairs of eigenvectors), from 2 to 24")


def _get(values: dict[str, Any], key: str) -> Any:
    """values["a"]["b"] for "a.b"; None where there is no such key."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def check_batch_size(cfg: DictConfig, train_images: int) -> None:
    """A batch larger than the training set is the whole set: say so once (not an error, so a
    recipe can be tried on a small dataset unchanged)."""
    if cfg.trainer.batch_size > train_images:
        log.warning(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {train_images} training "
            f"images: every epoch is one batch of {train_images}"
        )


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)
