"""Typed schemas for every config group, registered in Hydra's ConfigStore, and the one
place that instantiates `_target_`s (with the allowed namespaces listed).

Each YAML option under `conf/<group>/` extends its schema (`defaults: [/<group>_<option>_schema@_here_]`)
so a wrong type (`trainer.epochs=two`), an unknown key (`model.conv1_ot=32`) or a value outside a
closed set of choices (`trainer.lr_schedule=linear`) fails at compose time with Hydra's own message,
before anything is built. The schemas are stored at the top level, not in a group, so `--help` and
Hydra's "Available options" lists show only the real options.

Each default lives in one place. A schema holds the types of its group and the defaults that every
option of the group shares, and all of `trainer`, `mlflow`, `seed` and `resume` (they have no
options); an option's own values live in its YAML file. The functions and classes built from a
config take those values as required keyword arguments, without defaults of their own.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from omegaconf import MISSING, DictConfig, OmegaConf

from cifar_exp.errors import UserError, first_line

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- closed sets of choices
# StrEnum: members compare equal to their names, str() is the name (so MLflow params read
# `onecycle`), and OmegaConf accepts the name from YAML and the command line.
class LRSchedule(StrEnum):
    constant = "constant"
    onecycle = "onecycle"  # linear warm-up, then linear decay to 0


class AutocastDtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"  # adds gradient scaling


class DeviceName(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    ddp = "ddp"


# ---------------------------------------------------------------- dataset
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    root: str = "data"  # folder holding the dataset files, relative to the working directory
    # Per channel, pixels in [0, 1]; 0.5 and 0.5 map pixels to [-1, 1] (the tutorial's normalisation).
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class DecodedDatasetConfig(DatasetConfig):
    """Datasets decoded from files: the decoded tensors are cached (cifar_exp/decoded_cache.py)."""

    cache: bool = True  # keep decoded tensors in cache_dir for the next run; false: decode every run
    # null: $CIFAR_EXP_CACHE_DIR, else $XDG_CACHE_HOME/cifar_exp, else ~/.cache/cifar_exp
    cache_dir: str | None = None


@dataclass
class Cifar10Config(DecodedDatasetConfig):
    _target_: str = "cifar_exp.data.load_cifar10"
    download: bool = MISSING
    fallback: bool = MISSING


@dataclass
class Cifar10SampleConfig(DecodedDatasetConfig):
    _target_: str = "cifar_exp.data.load_cifar10_sample"


@dataclass
class ImageFolderConfig(DecodedDatasetConfig):
    _target_: str = "cifar_exp.data.load_imagefolder"


@dataclass
class SyntheticConfig(DatasetConfig):
    _target_: str = "cifar_exp.data.load_synthetic"
    train_size: int = MISSING
    test_size: int = MISSING
    noise: float = MISSING
    seed: int = MISSING


# ---------------------------------------------------------------- model
@dataclass
class CNNConfig:
    _target_: str = "cifar_exp.models.CNN"
    conv1_out: int = MISSING
    conv2_out: int = MISSING
    fc1_out: int = MISSING
    fc2_out: int = MISSING
    kernel_size: int = MISSING


@dataclass
class AirbenchConfig:
    _target_: str = "cifar_exp.models.Airbench94"
    whiten_width: int = MISSING
    block1: int = MISSING
    block2: int = MISSING
    block3: int = MISSING
    batchnorm_momentum: float = MISSING
    whiten_bias_epochs: int = MISSING


# ---------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    _partial_: bool = True  # built later with the model's parameters
    lr: float = 0.001  # the tutorial's learning rate
    weight_decay: float = 0.0
    # lr multiplier for BatchNorm shifts (airbench uses 64); read by run.param_groups, not passed
    # to torch.optim (see OWN_KEYS)
    norm_bias_lr_scale: float = 1.0


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: list[float] = MISSING


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"


# ---------------------------------------------------------------- device, trainer, tracking
@dataclass
class DeviceConfig:
    name: DeviceName = MISSING
    data_parallel: bool = True  # several GPUs visible: wrap the model in torch.nn.DataParallel
    threads: int = 0  # CPU threads for torch; 0: 1 thread below batch 32 (faster there), else torch's default


@dataclass
class TrainerConfig:
    epochs: int = 2
    batch_size: int = 4  # images per optimizer step
    log_every_n_steps: int = 2000  # mean training loss printed and logged over this many steps
    test_batch_size: int = 1000  # evaluation only: no gradients, so larger batches are cheaper
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_fraction: float = 0.2  # onecycle only: share of all steps spent warming up
    label_smoothing: float = 0.0
    flip: bool = False  # random horizontal flips of training batches
    translate: int = 0  # random shifts of training batches by up to this many pixels
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (slower to start; pays off on long runs)
    autocast: bool = False  # mixed precision on CUDA
    autocast_dtype: AutocastDtype = AutocastDtype.bfloat16
    drop_last: bool = False  # skip a last training batch smaller than batch_size
    tta: int = 0  # test-time augmentation: 0 none, 1 + mirror, 2 + mirror and 1-pixel shifts
    lookahead: bool = False  # pull weights onto their moving average every 5 steps (airbench)
    checkpoint: bool = True  # <hydra output dir>/checkpoint.pt after each epoch and on Ctrl-C/SIGTERM


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db
    experiment_name: str = "cifar_exp"
    min_free_mb: int = 100  # a local store's disk needs this much free space (MB) before a run starts


@dataclass
class Config:
    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0  # seeds torch, numpy, python and the data order
    resume: str | None = None  # an MLflow run id or a checkpoint file: continue that run


# ---------------------------------------------------------------- ranges
# What the schema's types cannot say, checked by validate() before anything is built or recorded.
# Upper bounds stop values that would exhaust memory or never end, not unusual experiments.
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
    "trainer.epochs": Range(1, MAX_EPOCHS),
    # No upper bound: a batch never holds more than the training set (run.py warns when it would).
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
# Where each group's `_target_` may come from (build() allows the union of these).
TARGETS = {"dataset": "cifar_exp.data.", "model": "cifar_exp.models.", "optimizer": "torch.optim."}


def validate(cfg: DictConfig) -> None:
    """Checks every range the schema's types cannot express, before anything is built or
    recorded; the first bad value raises a UserError: one line naming the key and what is allowed."""
    values = OmegaConf.to_container(cfg, resolve=True)
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


SCHEMAS = {  # name in the ConfigStore (top level, outside the option lists): schema
    "dataset_cifar10_schema": Cifar10Config,
    "dataset_cifar10_sample_schema": Cifar10SampleConfig,
    "dataset_imagefolder_schema": ImageFolderConfig,
    "dataset_synthetic_schema": SyntheticConfig,
    "model_cnn_schema": CNNConfig,
    "model_airbench94_schema": AirbenchConfig,
    "optimizer_sgd_schema": SGDConfig,
    "optimizer_adam_schema": AdamConfig,
    "optimizer_adamw_schema": AdamWConfig,
    "device_schema": DeviceConfig,
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


# Targets may only come from these namespaces: a config is data, not a way to run any callable.
ALLOWED_TARGETS = tuple(TARGETS.values())
# Keys this project reads itself, never arguments of the `_target_`: build() leaves them out.
OWN_KEYS = ("norm_bias_lr_scale",)  # optimizer: run.param_groups uses it


def build(node: Any, **kwargs: Any) -> Any:
    """instantiate() behind an allow-list; every object built from config goes through here. A
    constructor's own complaint (torch.optim's ValueError, a wrong keyword) becomes one line naming
    the config node, also when a `_partial_` node is called later."""
    target = str(node.get("_target_", ""))
    if not target.startswith(ALLOWED_TARGETS):
        raise UserError(f"_target_ {target!r} is not allowed; allowed: {', '.join(ALLOWED_TARGETS)}*")
    where = f"{_full_key(node) or 'config'} ({target})"  # e.g. "optimizer (torch.optim.SGD)"
    if isinstance(node, DictConfig) and any(key in node for key in OWN_KEYS):
        arguments = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in arguments.items() if k not in OWN_KEYS})
    try:
        built = hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):  # the target's own check: show just its message
            raise e.__cause__ from None
        raise UserError(f"{where}: {first_line(e.__cause__ or e)}") from e
    if isinstance(built, functools.partial):
        return functools.partial(_reporting, where, built)
    return built


def _reporting(where: str, make: functools.partial, *args: Any, **kwargs: Any) -> Any:
    try:
        return make(*args, **kwargs)
    except (ValueError, TypeError) as e:  # e.g. torch.optim.SGD: "Invalid learning rate: -1.0"
        raise UserError(f"{where}: {first_line(e)}") from e


def _full_key(node: Any) -> str:
    """Where a node sits in the composed config ("optimizer"); "" for a free-standing one."""
    try:
        return str(node._get_full_key(None))
    except AttributeError:
        return ""
