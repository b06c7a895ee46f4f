"""Typed schemas for every config group, registered in Hydra's ConfigStore, and the one
place that instantiates `_target_`s (with the allowed namespaces listed).

Each YAML option under `conf/<group>/` starts from one of these schemas (`defaults: [<name>_schema]`)
so a wrong type (`trainer.epochs=two`) or an unknown key (`model.conv1_ot=32`) fails at compose
time with Hydra's own message, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from omegaconf import MISSING

from cifar_exp.errors import UserError


# ---------------------------------------------------------------- dataset
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    root: str = "data"  # folder holding the dataset files, relative to the working directory
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, pixels in [0, 1]
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
    download: bool = True
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
    train_size: int = 5000
    test_size: int = 1000
    noise: float = 0.25  # std of the per-pixel noise, pixels in [0, 1]
    seed: int = 0  # the data's own seed, so every run trains on the same images


# ---------------------------------------------------------------- model
@dataclass
class CNNConfig:
    _target_: str = "cifar_exp.models.CNN"
    conv1_out: int = 6
    conv2_out: int = 16
    fc1_out: int = 120
    fc2_out: int = 84
    kernel_size: int = 5


@dataclass
class AirbenchConfig:
    _target_: str = "cifar_exp.models.Airbench94"
    whiten_width: int = 24  # channels of the whitened first layer (2 * 3 * 2 * 2 patch basis)
    block1: int = 64
    block2: int = 256
    block3: int = 256
    batchnorm_momentum: float = 0.6
    whiten_bias_epochs: int = 3  # the whitening layer's bias trains for this many epochs, then freezes


# ---------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    _partial_: bool = True  # built later with the model's parameters
    lr: float = 0.001
    weight_decay: float = 0.0


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.01


# ---------------------------------------------------------------- device, trainer, tracking
@dataclass
class DeviceConfig:
    name: str = "auto"  # auto | cpu | cuda
    data_parallel: bool = True  # wrap in torch.nn.DataParallel when more than one GPU is visible
    threads: int = 0  # CPU threads for torch; 0: 1 thread below batch 32, else torch's default


@dataclass
class TrainerConfig:
    epochs: int = 2
    batch_size: int = 4
    log_every_n_steps: int = 2000  # mean training loss printed and logged over this many steps
    test_batch_size: int = 1000  # evaluation only: no gradients, so larger batches are cheaper
    lr_schedule: str = "constant"  # constant | onecycle (linear warm-up then linear decay)
    warmup_fraction: float = 0.2  # onecycle only: share of all steps spent warming up
    label_smoothing: float = 0.0
    flip: bool = False  # random horizontal flips of training batches
    translate: int = 0  # random shifts of training batches by up to this many pixels
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (slower to start; pays off on long runs)
    autocast: bool = False  # mixed precision on CUDA
    autocast_dtype: str = "bfloat16"  # bfloat16 | float16 (float16 adds gradient scaling)
    drop_last: bool = False  # skip a last training batch smaller than batch_size
    tta: int = 0  # test-time augmentation: 0 none, 1 + mirror, 2 + mirror and 1-pixel shifts
    norm_bias_lr_scale: float = 1.0  # lr multiplier for BatchNorm shifts (airbench uses 64)
    lookahead: bool = False  # pull weights onto their moving average every 5 steps (airbench)
    checkpoint: bool = True  # write <hydra output dir>/checkpoint.pt after every epoch and on a signal


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
    seed: int = 0
    resume: str | None = None  # an MLflow run id or a checkpoint file: continue that run


LR_SCHEDULES = ("constant", "onecycle")


def check_trainer(cfg: TrainerConfig) -> None:
    """Range checks the schema's types cannot express."""
    for key in ("epochs", "batch_size", "log_every_n_steps", "test_batch_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"trainer.{key}={getattr(cfg, key)}: must be a positive integer")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"trainer.lr_schedule={cfg.lr_schedule!r}: allowed are {', '.join(LR_SCHEDULES)}")
    if cfg.autocast_dtype not in ("bfloat16", "float16"):
        raise UserError(f"trainer.autocast_dtype={cfg.autocast_dtype!r}: allowed are bfloat16, float16")
    if cfg.tta not in (0, 1, 2):
        raise UserError(f"trainer.tta={cfg.tta}: allowed are 0, 1, 2")
    if cfg.translate < 0:
        raise UserError(f"trainer.translate={cfg.translate}: must be 0 or more pixels")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"trainer.label_smoothing={cfg.label_smoothing}: must be in [0, 1)")
    if not 0 <= cfg.warmup_fraction <= 1:
        raise UserError(f"trainer.warmup_fraction={cfg.warmup_fraction}: must be in [0, 1]")


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, name, node in [
        ("dataset", "cifar10_schema", Cifar10Config),
        ("dataset", "cifar10_sample_schema", Cifar10SampleConfig),
        ("dataset", "imagefolder_schema", ImageFolderConfig),
        ("dataset", "synthetic_schema", SyntheticConfig),
        ("model", "cnn_schema", CNNConfig),
        ("model", "airbench_schema", AirbenchConfig),
        ("optimizer", "sgd_schema", SGDConfig),
        ("optimizer", "adam_schema", AdamConfig),
        ("optimizer", "adamw_schema", AdamWConfig),
        ("device", "device_schema", DeviceConfig),
    ]:
        cs.store(group=group, name=name, node=node)


# Targets may only come from these namespaces: a config is data, not a way to run any callable.
ALLOWED_TARGETS = ("cifar_exp.data.", "cifar_exp.models.", "torch.optim.")


def build(node: Any, **kwargs: Any) -> Any:
    """instantiate() behind an allow-list; every object built from config goes through here."""
    target = str(node.get("_target_", ""))
    if not target.startswith(ALLOWED_TARGETS):
        raise UserError(f"_target_ {target!r} is not allowed; allowed: {', '.join(ALLOWED_TARGETS)}*")
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):  # the target's own check: show just its message
            raise e.__cause__ from None
        raise
