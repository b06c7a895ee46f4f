"""Typed schemas for every config group, registered in Hydra's ConfigStore, and the one
place that instantiates `_target_`s (with the allowed namespaces listed).

Each YAML option under `conf/<group>/` extends its schema (`defaults: [/<group>_<option>_schema@_here_]`)
so a wrong type (`trainer.epochs=two`), an unknown key (`model.conv1_ot=32`) or a value outside a
closed set of choices (`trainer.lr_schedule=linear`) fails at compose time with Hydra's own message,
before anything is built; ranges the types cannot say (lr > 0, widths up to 4096) are
cifar_exp/validation.py's, checked before a run opens. The schemas are stored at the top level,
not in a group, so `--help` and Hydra's "Available options" lists show only the real options.

Each default lives in one place. A schema holds the types of its group and the defaults that every
option of the group shares, and all of `trainer`, `mlflow`, `seed` and `resume` (they have no
options); an option's own values live in its YAML file. The functions and classes built from a
config take those values as required keyword arguments, without defaults of their own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from omegaconf import MISSING, DictConfig, OmegaConf

from cifar_exp.errors import UserError, first_line


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
    # Training images held out as the validation split, which every epoch is evaluated on and
    # everything that chooses (a sweep's best, a search) reads; the test split is evaluated once, at
    # the end. Below 1 a fraction (0.1: 5,000 of CIFAR-10's 50,000), 1 or more a number of images,
    # 0 none (each epoch is then evaluated on the test split, as the tutorial does). Stratified by class.
    val_size: float = 0.1
    split_seed: int = 0  # draws the validation images; not `seed`, so every run of a sweep holds out the same


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
    # may be fractional (airbench: 9.9): training stops after ceil(epochs * steps per epoch) steps,
    # the last epoch cut short (and still evaluated); the lr schedule spans those steps
    epochs: float = 2
    batch_size: int = 4  # images per optimizer step
    log_every_n_steps: int = 2000  # mean training loss printed and logged over this many steps
    test_batch_size: int = 1000  # evaluation only: no gradients, so larger batches are cheaper
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_fraction: float = 0.2  # onecycle only: share of all steps spent warming up
    label_smoothing: float = 0.0
    flip: bool = False  # random horizontal flips of training batches
    # with flip: mirror each image at random once, then the whole set on every second epoch, so each
    # is seen both ways round every two epochs (airbench's alternating flip, about +0.2 points)
    alternate_flip: bool = False
    translate: int = 0  # random shifts of training batches by up to this many pixels
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (slower to start; pays off on long runs)
    autocast: bool = False  # mixed precision on CUDA
    autocast_dtype: AutocastDtype = AutocastDtype.bfloat16
    # airbench's precision instead of autocast: float16 weights (BatchNorm float32), no GradScaler;
    # the loss is summed over the batch (with SGD's lr / batch and weight_decay * batch, the same
    # steps) so small gradients stay within float16's range
    half: bool = False
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


# Where each group's `_target_` may come from (validation checks each group against its own).
TARGETS = {"dataset": "cifar_exp.data.", "model": "cifar_exp.models.", "optimizer": "torch.optim."}
# Targets may only come from these namespaces: a config is data, not a way to run any callable.
ALLOWED_TARGETS = tuple(TARGETS.values())
# Keys this project reads itself, never arguments of the `_target_`: build() leaves them out.
# optimizer: run.param_groups uses norm_bias_lr_scale; dataset: data.hold_out the split's keys
OWN_KEYS = ("norm_bias_lr_scale", "val_size", "split_seed")


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
