"""Every config value's range, checked by validate(cfg) before a run builds or records anything:
what the schema's types (cifar_exp/config.py, checked at compose time) cannot say. Each refusal is
one line naming the key, the value and what is allowed.

Upper bounds stop values that would exhaust memory or never end, not unusual experiments: a
learning rate has none (one that diverges is a result, and the run says so), a batch larger than
the training set is the whole set (check_batch_size says so once).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from typing import Annotated, Any, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from cifar_exp.config import BUILT_GROUPS, locate
from cifar_exp.errors import UserError, first_line
from cifar_exp.ranges import MAX_EPOCHS, Range

log = logging.getLogger(__name__)

# Synthetic images per split: 200,000 are 2.4 GB once normalised to float32 (4x CIFAR-10's train set).
MAX_SYNTHETIC_IMAGES = 200_000
MAX_THREADS = 1024  # CPU threads for torch; far past any machine's cores
SEED_MAX = 2**32 - 1  # numpy's seeds are 0 ... 2**32 - 1 (torch takes more)


_PIXEL_STATS = "per-channel statistics of pixels in [0, 1]; 0-255 values? divide them by 255"
# A key absent from the composed config (another option's key) is not checked. A network's (or any
# built object's) arguments state their ranges in their type hints (cifar_exp/ranges.py), not here.
RANGES = {
    "seed": Range(0, SEED_MAX, note="numpy's seed range"),
    "dataset.mean": Range(0, 1, note=_PIXEL_STATS),
    "dataset.std": Range(0, 1, low_open=True, note=_PIXEL_STATS),
    "dataset.train_size": Range(10, MAX_SYNTHETIC_IMAGES, note="at least one image per class"),
    "dataset.test_size": Range(10, MAX_SYNTHETIC_IMAGES, note="at least one image per class"),
    "dataset.noise": Range(0, 10, note="std of the noise, pixels in [0, 1]; above 1 the images are noise"),
    "dataset.seed": Range(0, SEED_MAX, note="numpy's seed range"),
    "dataset.val_size": Range(0, note="a fraction below 1, or a number of images; 0: no validation split"),
    "dataset.split_seed": Range(0, SEED_MAX, note="numpy's seed range"),
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
    for key, rule in {**RANGES, **hinted_ranges(cfg)}.items():
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
    _validate_combinations(values)


def hinted_ranges(cfg: DictConfig) -> dict[str, Range]:
    """{"model.width1": Range(...)}: the ranges that the constructors of the built groups (model,
    dataset, optimizer) state in their arguments' type hints. Finding a constructor imports its
    module: config.locate first decides whether this config may run it (cfg.trust)."""
    found = {}
    for group in BUILT_GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig) and "_target_" in node:
            found |= {f"{group}.{k}": rule for k, rule in argument_ranges(locate(node, cfg.trust)).items()}
    return found


def argument_ranges(target: Any) -> dict[str, Range]:
    """{argument: Range} for the arguments hinted `Annotated[..., Range(...)]`."""
    try:
        hints = get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    except Exception:  # noqa: BLE001 - hints that do not resolve state no ranges
        return {}
    return {
        name: rule
        for name, hint in hints.items()
        if get_origin(hint) is Annotated
        for rule in hint.__metadata__
        if isinstance(rule, Range)
    }


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
