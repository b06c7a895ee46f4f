"""Typed schemas for every config group, registered in Hydra's ConfigStore, and the one
place that instantiates `_target_`s (and decides whether a config may name code outside the package).

Each YAML option under `conf/<group>/` extends its schema (`defaults: [/<group>_<option>_schema@_here_]`)
so a wrong type (`trainer.epochs=two`), an unknown key (`model.conv1_ot=32`) or a value outside a
closed set of choices (`trainer.lr_schedule=linear`) fails at compose time with Hydra's own message,
before anything is built; ranges the types cannot say (lr > 0, widths up to 4096) are
cifar_exp/validation.py's and the type hints' (cifar_exp/ranges.py), checked before a run opens.
The schemas are stored at the top level, not in a group, so `--help` and Hydra's "Available
options" lists show only the real options.

A network's or dataset's schema is generated from its constructor's signature (generated_schemas:
types and defaults from there), so adding one is a module and a YAML. Loop settings, tracking,
devices and the shared keys of each group are written here, with the defaults they hold.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import hydra.utils
import hydra_zen
import torch
import yaml
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from cifar_exp.errors import UserError, first_line
from cifar_exp.hydra_private import full_key, strict_bools


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
    _target_: str = MISSING  # the loader: a function of the keys below, returning the images
    root: str = "data"  # folder holding the dataset files, relative to the working directory
    # Normalisation per channel, pixels in [0, 1]: (pixel - mean) / std; 0.5 and 0.5 map pixels to
    # [-1, 1] (the tutorial's normalisation).
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel: (pixel - mean) / std
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


# ---------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig:
    _target_: str = MISSING  # the optimizer class (torch.optim.*), given the model's parameters first
    _partial_: bool = True  # built later with the model's parameters
    lr: float = 0.001  # learning rate (the tutorial's 0.001); with onecycle, its peak
    weight_decay: float = 0.0  # L2 penalty on the weights, added to the gradient (AdamW: decoupled)
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
    name: DeviceName = MISSING  # auto (CUDA if a GPU is visible, else CPU), cpu, cuda or ddp
    data_parallel: bool = True  # several GPUs visible: wrap the model in torch.nn.DataParallel
    threads: int = 0  # CPU threads for torch; 0: 1 thread below batch 32 (faster there), else torch's default


@dataclass
class TrainerConfig:
    # passes over the training set; may be fractional (airbench: 9.9): training stops after
    # ceil(epochs * steps per epoch) steps, the last epoch cut short (and still evaluated); the lr
    # schedule spans those steps
    epochs: float = 2
    batch_size: int = 4  # images per optimizer step
    log_every_n_steps: int = 2000  # mean training loss printed and logged over this many steps
    test_batch_size: int = 1000  # evaluation only: no gradients, so larger batches are cheaper
    lr_schedule: LRSchedule = LRSchedule.constant  # constant, or onecycle: warm-up, then linear decay to 0
    warmup_fraction: float = 0.2  # onecycle only: share of all steps spent warming up
    label_smoothing: float = 0.0  # share of each target's probability spread over all classes (0: none)
    flip: bool = False  # random horizontal flips of training batches
    # with flip: mirror each image at random once, then the whole set on every second epoch, so each
    # is seen both ways round every two epochs (airbench's alternating flip, about +0.2 points)
    alternate_flip: bool = False
    translate: int = 0  # random shifts of training batches by up to this many pixels
    channels_last: bool = False  # model and batches in channels-last (NHWC) memory: often faster convolutions
    compile: bool = False  # torch.compile the model (slower to start; pays off on long runs)
    autocast: bool = False  # mixed precision on CUDA
    autocast_dtype: AutocastDtype = AutocastDtype.bfloat16  # bfloat16, or float16 (+ gradient scaling)
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
    enabled: bool = True  # false: train without recording anything in MLflow
    tracking_uri: str | None = None  # the store; null: $MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db
    experiment_name: str = "cifar_exp"  # the MLflow experiment the runs are recorded in
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
    # May `_target_`s name code outside this package (PACKAGE_CODE)? Yes for what you type and your
    # config files; `cifar-exp rerun|resume` set it from --trust, for a config read from a store.
    trust: bool = True


SCHEMAS = {  # name in the ConfigStore (top level, outside the option lists): schema
    "config_schema": Config,
    "optimizer_sgd_schema": SGDConfig,
    "optimizer_adam_schema": AdamConfig,
    "optimizer_adamw_schema": AdamWConfig,
    "device_schema": DeviceConfig,
}


# ---------------------------------------------------------------- schemas generated from signatures
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BUILT_GROUPS = ("dataset", "model", "optimizer")  # the groups whose `_target_` build() instantiates
FROM_THE_RUN = ("num_classes", "params")  # arguments the run passes (the data's classes, the model's weights)


@dataclass
class ModelConfig:
    _target_: str = MISSING  # the network's class; its signature gives the keys below


BASES = {"model": ModelConfig, "dataset": DatasetConfig, "optimizer": OptimizerConfig}


def register_schemas() -> None:
    strict_bools()  # a bool key takes true or false only
    for name, node in {**SCHEMAS, **generated_schemas(CONF_DIR)}.items():
        ConfigStore.instance().store(name=name, node=node)


def generated_schemas(conf_dir: Path) -> dict[str, type]:
    """`<group>_<option>_schema` for each option of conf/model/ and conf/dataset/: the schema of
    its `_target_`, so adding a network or a dataset is a module and a YAML."""
    found = {}
    for group in ("model", "dataset"):
        for path in sorted((conf_dir / group).glob("*.yaml")):
            name = f"{group}_{path.stem}_schema"
            target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
            if target:
                module, _, attribute = target.rpartition(".")
                found[name] = schema_of(getattr(importlib.import_module(module), attribute), group)
    return found


def schema_of(made: Any, group: str) -> type:
    """A structured config of `made`'s arguments, their types and defaults from its signature
    (hydra-zen's builds), on the group's base schema (a dataset's val_size, an optimizer's
    _partial_); an argument without a default is ??? (the YAML gives it)."""
    decoded = group == "dataset" and "cache" in (_parameters(made) or {})  # decoded from files, cached
    base = DecodedDatasetConfig if decoded else BASES[group]
    own = {f.name for f in dataclasses.fields(base)}
    built = hydra_zen.builds(made, populate_full_signature=True, zen_exclude=(*own, *FROM_THE_RUN))
    fields = [("_target_", str, field(default=f"{made.__module__}.{made.__qualname__}"))]
    for f in dataclasses.fields(built):
        if f.name not in own:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = MISSING if no_default else f.default
            # a list default keeps its factory: a new list per config
            fields.append((f.name, f.type, field(default=default, default_factory=f.default_factory)))
    schema = dataclasses.make_dataclass(f"{group}_{made.__name__}_schema", fields, bases=(base,))
    # A config holding it is pickled to other processes (submitit, joblib): the class must be
    # found by name in this module there (see __getattr__ below)
    schema.__module__ = __name__
    globals()[schema.__name__] = schema
    return schema


def __getattr__(name: str) -> Any:
    """A generated schema asked for by name, as unpickling a config in a fresh process does."""
    if name.endswith("_schema") and not name.startswith("_"):
        generated_schemas(CONF_DIR)
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parameters(made: Any) -> dict[str, inspect.Parameter] | None:
    """The arguments `made`'s signature names; None when it has none to read (or is not callable)."""
    try:
        return dict(inspect.signature(made).parameters)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- the one place that instantiates
PACKAGE_CODE = ("cifar_exp.", "torch.optim.")  # code a config read back from a store may name


def targets(node: Any, key: str) -> list[tuple[str, str]]:
    """(key, target) of every `_target_` in a node, nested ones too (instantiate builds them all)."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    found = []
    if isinstance(values, dict):
        if "_target_" in values:
            found.append((key, str(values["_target_"])))
        for k, v in values.items():
            found += targets(v, f"{key}.{k}")
    elif isinstance(values, list):
        for i, v in enumerate(values):
            found += targets(v, f"{key}[{i}]")
    return found


def locate(node: Any, trust: bool) -> Any:
    """The callable a node's `_target_` names, imported. Here, and only here, is it decided whether
    a config may run code: without `trust` (a config read back from a store: rerun, resume,
    predict) every `_target_` in it must be this package's (PACKAGE_CODE), checked before anything
    is imported. What the user's own command line and config files name is theirs to run."""
    key = group_of(node)
    for where, target in targets(node, key):
        if not trust and not target.startswith(PACKAGE_CODE):
            raise UserError(
                f"{where}._target_={target!r}: this config was read back from a store and names code "
                f"outside cifar_exp and torch.optim (module {target.rpartition('.')[0] or target}); "
                "--trust runs it, if you trust whoever recorded it"
            )
    target = str(node._target_)
    module, _, name = target.rpartition(".")
    try:  # importlib, not hydra.utils.get_object: that logs an ERROR before our one line
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - no such module or attribute, or the module's import fails
        raise UserError(
            f"{key}._target_={target!r}: cannot import it ({first_line(e)}); your own "
            "module must be in the folder you run from, or importable (PYTHONPATH)"
        ) from None


def check_arguments(node: Any, made: Any, key: str) -> None:
    """The node's keys against `made`'s signature, as its schema would check them at compose time
    (a config of your own, or one read back, has none): an unknown key or a wrong type is one line."""
    parameters = _parameters(made)
    if key not in BASES or parameters is None or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # no signature to check against, or one that takes any keyword
    try:
        schema = OmegaConf.structured(schema_of(made, key))
        OmegaConf.merge(schema, OmegaConf.to_container(node, resolve=True))
    except ConfigKeyError as e:
        raise UserError(
            f"{key}.{e.key}: not an argument of {node._target_} (it takes "
            f"{', '.join(k for k in schema if k not in ('_target_', '_partial_'))})"
        ) from None
    except ValidationError as e:
        value = OmegaConf.select(node, str(e.full_key))
        raise UserError(f"{key}.{e.full_key}={value!r}: {first_line(e)} ({node._target_})") from None


def group_of(node: Any) -> str:
    """Where a node sits in the composed config ("model"); run.load_data builds the dataset from
    its YAML alone, known by the keys only a dataset has; "config" for any other free node."""
    return full_key(node) or ("dataset" if "val_size" in node else "config")


# Keys this project reads itself, never arguments of the `_target_`: build() leaves them out.
# optimizer: run.param_groups uses norm_bias_lr_scale; dataset: holdout.hold_out the split's keys
OWN_KEYS = ("norm_bias_lr_scale", "val_size", "split_seed")


def build(node: Any, trust: bool, **kwargs: Any) -> Any:
    """instantiate() behind locate()'s trust decision (`trust`: may it name code outside this
    package); every object built from config goes through here. A constructor's own complaint
    (torch.optim's ValueError, a wrong keyword) becomes one line (_complaint), also when a
    `_partial_` node is called later. A model is a torch.nn.Module; one of your own gets the
    training loop's hooks (models.Network) if it lacks them."""
    made = locate(node, trust)
    key, target = group_of(node), str(node._target_)
    check_arguments(node, made, key)
    if isinstance(node, DictConfig) and any(k in node for k in OWN_KEYS):
        arguments = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in arguments.items() if k not in OWN_KEYS})
    try:
        built = hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):  # the target's own check: show just its message
            raise e.__cause__ from None
        raise UserError(_complaint(key, target, node, e.__cause__ or e)) from e
    if isinstance(built, functools.partial):
        return functools.partial(_reporting, key, target, node, built)
    if key == "model":
        from cifar_exp.models import as_network

        if not isinstance(built, torch.nn.Module):
            raise UserError(
                f"model._target_={target!r} built a {type(built).__name__}, not a torch.nn.Module"
            )
        return as_network(built)
    return built


def _reporting(key: str, target: str, node: Any, make: functools.partial, *args: Any, **kwargs: Any) -> Any:
    try:
        built = make(*args, **kwargs)
    except (ValueError, TypeError) as e:  # e.g. torch.optim.SGD: "Invalid learning rate: -1.0"
        raise UserError(_complaint(key, target, node, e)) from e
    if key == "optimizer" and not isinstance(built, torch.optim.Optimizer):
        raise UserError(
            f"optimizer._target_={target!r} built a {type(built).__name__}, not a torch.optim.Optimizer"
        )
    return built


def _complaint(key: str, target: str, node: Any, error: BaseException) -> str:
    """One line: "model.width=0: must be positive" where the message starts with an argument of
    the node, else "model (mynets.Tiny): <message>"."""
    message = first_line(error)
    argument = re.match(r"(\w+)\s*[=:]", message)
    if argument and argument[1] in node and argument[1] != "_target_":
        return f"{key}.{message}"
    return f"{key} ({target}): {message}"
