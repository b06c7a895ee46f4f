"""Property: for every leaf of every option of every group and every experiment, each of a handful
of bad values (negative, zero, huge, infinite, not a number, wrong type, empty, null, missing) is either
refused with a message naming the key (at compose time by the schema, or by validation.validate
before anything is built) or is a value the run can use: the model, optimizer, device and data
build from it. Never another exception, which would print a traceback.

In-process and fast: each composition is composed once with Hydra's compose API and each value is
applied as Hydra applies a command-line override after composing (the same parser and the same
OmegaConf update); a sample goes through the full compose to show both agree. Runs are not
opened here; tests/test_errors.py runs the program end to end and checks that nothing reaches
MLflow."""

from __future__ import annotations

import copy
import itertools
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONF_DIR, REPO, compose_config
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode

from cifar_exp.config import build
from cifar_exp.devices import select_device
from cifar_exp.errors import UserError, compact_message
from cifar_exp.run import param_groups
from cifar_exp.validation import RANGES, hinted_ranges, validate

# Negative, zero, huge (an int, a float), infinite, not a number, wrong types, empty, null, Hydra's
# "no value" and an interpolation that leads nowhere.
BAD_VALUES = ["-1", "0", "1000000000", "1e300", "inf", "nan", "abc", "[1,2]", "''", "null", "???", "${oops}"]
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "experiment")
COMPOSITIONS = [
    "",  # the defaults
    *(f"{group}={p.stem}" for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))),
    *(f"experiment={p.stem}" for p in sorted((REPO / "experiments").glob("*.yaml"))),
]
PARSER = OverridesParser.create()


def leaves(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        path = f"{prefix}{key}"
        child = node._get_node(key)
        keys += leaves(child, f"{path}.") if isinstance(child, DictConfig) else [path]
    return keys


def override(cfg: DictConfig, key: str, value: str) -> None:
    """`key=value` on the command line, as Hydra applies it once the config is composed."""
    ConfigLoaderImpl._apply_overrides_to_config(PARSER.parse_overrides([f"{key}={value}"]), cfg)


class Builder:
    """Builds what a run builds before it opens its MLflow run. A case changes one key, so a node
    the key is not in is the composition's own: built once, not once per case."""

    def __init__(self) -> None:
        self.built: dict[tuple[str, ...], Any] = {}

    def once(self, what: tuple[str, ...], make: Callable[[], Any]) -> Any:
        if what not in self.built:
            self.built[what] = make()
        return self.built[what]

    def everything(self, cfg: DictConfig, key: str, value: str) -> None:
        def changed(*groups: str) -> tuple[str, ...]:  # which case built it
            return (key, value) if key.split(".")[0] in groups else ()

        net = self.once(("model", *changed("model")), lambda: build(cfg.model, True, num_classes=10))
        make = self.once(("optimizer", *changed("model", "optimizer")), lambda: build(cfg.optimizer, True))
        self.once(("params", *changed("model", "optimizer")), lambda: make(param_groups(net, cfg.optimizer)))
        if key.startswith("dataset."):
            build(cfg.dataset, True, _convert_="all")
        if key.startswith("device.") and cfg.device.name in ("auto", "cpu"):  # cuda, ddp: the machine decides
            threads = torch.get_num_threads()
            try:
                select_device(cfg.device, cfg.trainer.batch_size)
            finally:
                torch.set_num_threads(threads)


def outcome(cfg: DictConfig, key: str, value: str, builder: Builder) -> tuple[str, str]:
    """(how `key=value` ended, the message): compose, validate or build refused it, or it was
    accepted. `cfg` keeps the value: the caller restores it."""
    try:
        override(cfg, key, value)
    except (HydraException, OmegaConfBaseException) as e:
        return "compose", f"{e}\n{e.__cause__ or ''}"
    return checked(cfg, key, value, builder)


def checked(cfg: DictConfig, key: str, value: str, builder: Builder) -> tuple[str, str]:
    """What a run does before it opens its MLflow run: validate, then build."""
    try:
        validate(cfg)
    except UserError as e:
        return "validate", str(e)
    try:
        builder.everything(cfg, key, value)
    except UserError as e:
        return "build", str(e)
    return "accepted", ""


def problem(key: str, value: str, ended: str, message: str) -> str | None:
    """What is wrong with how `key=value` ended, or None."""
    if ended == "accepted":
        return None
    if ended == "compose":  # Hydra's own message: "Error merging override KEY=VALUE" and the reason
        return None if f"override {key}=" in message else f"compose message lacks the key: {message!r}"
    if "\n" in message:
        return f"{ended} message is not one line: {message!r}"
    return None if key in message else f"{ended} message does not name {key}: {message!r}"


@pytest.fixture
def offline_data(
    png_folder, cifar_folder, cifar100_folder, skip_cifar_md5, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[str]]:
    """Data a run could load here, small: cifar10 from the tiny generated pickles, imagefolder
    from the generated PNGs, the bundled sample (also the fallback) replaced by 20 images, no
    download; relative folders (dataset.cache_dir=abc) land in tmp_path. Returns the overrides
    that point a dataset option at its files."""
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    from cifar_exp import data

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    def tiny_sample() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        images = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
        labels = torch.arange(20) % 10
        tensors = {
            "train_images": images,
            "train_labels": labels,
            "test_images": images,
            "test_labels": labels,
        }
        return tensors, {"classes": data.CIFAR10_CLASSES}

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    monkeypatch.setattr(data, "_read_sample", tiny_sample)
    monkeypatch.chdir(tmp_path)
    return {
        "": [f"dataset.root={cifar_folder.root}"],  # the default dataset is cifar10
        "dataset=cifar10": [f"dataset.root={cifar_folder.root}"],
        "dataset=cifar100": [f"dataset.root={cifar100_folder.root}"],
        "dataset=imagefolder": [f"dataset.root={png_folder.root}"],
        "dataset=synthetic": ["dataset.train_size=20", "dataset.test_size=10"],
    }


def composed(composition: str, files: dict[str, list[str]], *extra: str) -> DictConfig:
    """The composition, its dataset pointed at generated files (unless it chooses its own)."""
    overrides = [composition] if composition else []
    dataset = composition if composition.startswith("dataset=") else ""
    return compose_config(*overrides, *files.get(dataset, []), *extra)


def is_number(value: Any) -> bool:
    """An int or float (not a bool), or a list of them."""
    if isinstance(value, list):
        return bool(value) and all(map(is_number, value))
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def node_at(cfg: DictConfig, key: str) -> Any:
    parent, _, name = key.rpartition(".")
    return (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(name)


def value_at(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def distinct(files: dict[str, list[str]]) -> dict[str, DictConfig]:
    """Each composition whose config differs from every one before it: experiment=tutorial,
    device=auto, model=cnn, ... compose to the defaults, and their cases would repeat its cases."""
    seen, configs = set(), {}
    for composition in COMPOSITIONS:
        cfg = composed(composition, files)
        if (text := OmegaConf.to_yaml(cfg)) not in seen:
            seen.add(text)
            configs[composition] = cfg
    return configs


def a_sixth(values: list[str], i: int) -> list[str]:
    """2 of the bad values for the i-th key tried, the next 2 for the next: each value is tried on
    a sixth of the keys, a key on 2 values in each composition it is in (all ~10,000 cases cost
    ~100 s on 2 cores: the slow run tries them all)."""
    return values[i % 6 :: 6]


@pytest.mark.parametrize(
    "pick",
    [pytest.param(a_sixth, id="a sixth"), pytest.param(lambda v, i: v, id="all", marks=pytest.mark.slow)],
)
def test_every_bad_value_is_refused_by_name_or_usable(
    offline_data: dict[str, list[str]], pick: Callable[[list[str], int], list[str]]
) -> None:
    """Also: every number in every composition has its range, in validation.RANGES or in its
    constructor's type hints (a new key too)."""
    configs = distinct(offline_data)
    ended, problems, unranged, rng = Counter(), [], set(), random.Random(0)
    keys_tried = itertools.count()
    for composition, cfg in configs.items():
        pristine, builder = OmegaConf.to_yaml(cfg), Builder()
        for key in leaves(cfg):
            original = value_at(cfg, key)
            if is_number(original) and key not in RANGES and key not in hinted_ranges(cfg):
                unranged.add(key)
            for value in pick(BAD_VALUES, next(keys_tried)):
                how, message = outcome(cfg, key, value, builder)
                ended[how] += 1
                if trouble := problem(key, value, how, message):
                    problems.append(f"{composition or 'defaults'}: {key}={value}: {trouble}")
                OmegaConf.update(cfg, key, original, merge=False)  # undo it for the next value
        assert OmegaConf.to_yaml(cfg) == pristine, composition
        agree_with_compose(
            composition, cfg, [(rng.choice(leaves(cfg)), rng.choice(BAD_VALUES))], offline_data
        )
    print(f"{sum(ended.values())} (key, value) cases in {len(configs)} distinct compositions: {dict(ended)}")
    assert not unranged, f"numbers without a range (validation.RANGES or a type hint): {sorted(unranged)}"
    assert not problems, "\n".join(problems[:20])
    assert ended["compose"] and ended["validate"] and ended["build"] and ended["accepted"]


def agree_with_compose(
    composition: str, base: DictConfig, cases: list[tuple[str, str]], files: dict[str, list[str]]
) -> None:
    """The shortcut (compose once, then apply each value as Hydra applies an override) and Hydra's
    full compose with the value on its command line end the same way. One case per composition in
    the test above; every key in the slow test below."""
    for key, value in cases:
        fast = outcome(copy.deepcopy(base), key, value, Builder())[0]
        try:
            cfg = composed(composition, files, f"{key}={value}")
        except HydraException:
            full = "compose"
        else:
            full = checked(cfg, key, value, Builder())[0]
        assert fast == full, f"{composition} {key}={value}: {fast} here, {full} with compose"


@pytest.mark.slow
def test_the_shortcut_agrees_with_compose_for_every_key(offline_data: dict[str, list[str]]) -> None:
    """Every leaf of each distinct composition, with the bad values in turn (~500 composes)."""
    for composition, cfg in distinct(offline_data).items():
        cases = [(key, BAD_VALUES[i % len(BAD_VALUES)]) for i, key in enumerate(leaves(cfg))]
        agree_with_compose(composition, cfg, cases, offline_data)


@pytest.mark.parametrize("composition", ["", "model=airbench94", "experiment=tutorial_fast"])
def test_a_bool_key_takes_true_or_false_only(composition: str) -> None:
    """OmegaConf alone would read -1 and 2 as true and yes/on as words for it: a bool key given
    anything but true or false is refused at compose time, naming the key."""
    cfg = compose_config(*([composition] if composition else []))
    bools = [key for key in leaves(cfg) if isinstance(node_at(cfg, key), BooleanNode)]
    assert "trainer.flip" in bools, bools
    for key in bools:
        original = value_at(cfg, key)
        for value in ("-1", "2", "1", "0", "maybe", "yes", "off", "0.5"):
            with pytest.raises(HydraException) as refused:
                override(cfg, key, value)
            message = compact_message(refused.value)  # what the user reads
            assert f"override {key}={value}: " in message and "use true or false" in message
        for value in ("true", "false", "True"):
            override(cfg, key, value)
            assert value_at(cfg, key) is (value.lower() == "true")
        OmegaConf.update(cfg, key, original, merge=False)
