"""Every option of every config group and every experiment composes in-process, and what the
configs name can be built through the one allow-listed instantiate. Only real options are offered,
a bad choice fails at compose time, and experiments set only what differs from the defaults."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import hydra.utils
import pytest
import torch
import yaml
from conftest import CONF_DIR, REPO
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from cifar_exp.config import build
from cifar_exp.devices import select_device
from cifar_exp.errors import UserError
from cifar_exp.models import CNN
from cifar_exp.validation import validate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("dataset", {"cifar10", "cifar10_sample", "imagefolder", "synthetic"}),
        ("model", {"cnn"}),
        ("optimizer", {"sgd", "adam", "adamw"}),
        ("device", {"auto", "cpu", "cuda"}),
        ("experiment", {"tutorial", "width_sweep"}),
    ],
)
def test_documented_options_exist(group: str, expected: set[str]) -> None:
    assert expected <= set(options(group))


def test_experiment_group_is_the_experiments_folder() -> None:
    assert options("experiment") == EXPERIMENTS


GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def test_help_lists_only_real_options(main_in_process) -> None:
    """The schemas are registered outside the groups, so --help offers only the YAML options."""
    result = main_in_process("--help")
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(line.split(": ", 1) for line in section.splitlines() if ": " in line)
    assert {group: listed[group].split(", ") for group in listed} == {g: options(g) for g in GROUPS}


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_option_lists_only_real_options(compose_config, group: str) -> None:
    with pytest.raises(MissingConfigException) as excinfo:
        compose_config(f"{group}=no_such_option")
    message = str(excinfo.value)
    listed = message.split(f"Available options in '{group}':")[1].split("Config search path:")[0].split()
    assert listed == options(group)


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("trainer.lr_schedule=linear", "[constant, onecycle]"),
        ("trainer.autocast_dtype=float32", "[bfloat16, float16]"),
        ("device.name=tpu", "[auto, cpu, cuda, ddp]"),
    ],
)
def test_a_bad_choice_fails_at_compose_time(compose_config, override: str, allowed: str) -> None:
    with pytest.raises(ConfigCompositionException) as excinfo:
        compose_config(override)
    message = f"{excinfo.value}\n{excinfo.value.__cause__}"
    key, value = override.split("=")
    assert f"full_key: {key}" in message and repr(value) in message and allowed in message


def test_default_config_is_the_tutorial_on_cifar10(compose_config) -> None:
    cfg = compose_config()
    assert cfg.dataset._target_ == "cifar_exp.data.load_cifar10"
    assert cfg.model._target_ == "cifar_exp.models.CNN"
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.device.name == "auto"
    assert cfg.trainer.epochs == 2 and cfg.trainer.batch_size == 4
    assert cfg.trainer.lr_schedule == "constant" and str(cfg.trainer.lr_schedule) == "constant"
    assert cfg.mlflow.enabled is True and cfg.seed == 0


# ---------------------------------------------------------------- dataset
@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_option_composes_and_fits_its_loader(compose_config, name: str) -> None:
    cfg = compose_config(f"dataset={name}")
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    target = node.pop("_target_")
    assert 0 < node.pop("val_size") < 1 and node.pop("split_seed") == 0  # hold_out's, not the loader's
    assert target.startswith("cifar_exp.")  # cifar_exp.data, or a module of its own (cifar_exp.cifar100)
    loader = hydra.utils.get_method(target)
    inspect.signature(loader).bind(**node)  # every key is a parameter of the loader
    assert len(node["mean"]) == len(node["std"]) == 3


def test_synthetic_dataset_builds(compose_config) -> None:
    cfg = compose_config("dataset=synthetic", "dataset.train_size=20", "dataset.test_size=10")
    data = build(cfg.dataset, True, _convert_="all")
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    assert data.mean == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- device
@pytest.mark.parametrize("name", options("device"))
def test_device_option_composes(compose_config, name: str) -> None:
    cfg = compose_config(f"device={name}")
    assert cfg.device.name == name
    if name in ("auto", "cpu") and not torch.cuda.is_available():
        assert select_device(cfg.device, cfg.trainer.batch_size) == torch.device("cpu")


# ---------------------------------------------------------------- model
@pytest.mark.parametrize("name", options("model"))
def test_model_option_builds_and_classifies(compose_config, name: str) -> None:
    cfg = compose_config(f"model={name}")
    model = build(cfg.model, True, num_classes=10)
    assert isinstance(model, torch.nn.Module)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["model.conv1_out=32"], lambda m: m.conv1.out_channels == 32 and m.conv2.in_channels == 32),
        (["model.conv2_out=20"], lambda m: m.conv2.out_channels == 20 and m.fc1.in_features == 20 * 5 * 5),
        (["model.fc1_out=64"], lambda m: m.fc1.out_features == 64 and m.fc2.in_features == 64),
        (["model.fc2_out=50"], lambda m: m.fc2.out_features == 50 and m.fc3.in_features == 50),
        (
            ["model.kernel_size=3", "model.conv2_out=8"],
            # 32 -conv3-> 30 -pool-> 15 -conv3-> 13 -pool-> 6
            lambda m: m.conv1.kernel_size == (3, 3) and m.fc1.in_features == 8 * 6 * 6,
        ),
    ],
    ids=["conv1_out", "conv2_out", "fc1_out", "fc2_out", "kernel_size"],
)
def test_cnn_widths_propagate(compose_config, overrides: list[str], check) -> None:
    model = build(compose_config("model=cnn", *overrides).model, True, num_classes=10)
    assert isinstance(model, CNN)
    assert check(model)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_num_classes_sets_the_head(compose_config) -> None:
    model = build(compose_config("model=cnn").model, True, num_classes=3)
    assert model.fc3.out_features == 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


# ---------------------------------------------------------------- optimizer
OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_option_builds_with_model_parameters(compose_config, name: str) -> None:
    cfg = compose_config(f"optimizer={name}", "optimizer.lr=0.05")
    model = torch.nn.Linear(4, 2)
    make = build(cfg.optimizer, True)  # _partial_: the parameters come later
    optimizer = make(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    if name in OPTIMIZER_CLASSES:
        assert type(optimizer) is OPTIMIZER_CLASSES[name]
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.05
    assert group["weight_decay"] == cfg.optimizer.weight_decay
    assert len(group["params"]) == 2


def test_norm_bias_lr_scale_is_an_optimizer_key_torch_never_sees(compose_config) -> None:
    cfg = compose_config("experiment=airbench94")
    assert cfg.optimizer.norm_bias_lr_scale == 64 and "norm_bias_lr_scale" not in cfg.trainer
    optimizer = build(cfg.optimizer, True)(torch.nn.Linear(2, 2).parameters())
    assert "norm_bias_lr_scale" not in optimizer.defaults


def test_optimizer_specific_keys_reach_torch(compose_config) -> None:
    params = list(torch.nn.Linear(4, 2).parameters())
    sgd = build(compose_config("optimizer=sgd", "optimizer.momentum=0.5").optimizer, True)(params)
    assert sgd.param_groups[0]["momentum"] == 0.5 and sgd.param_groups[0]["nesterov"] is False
    adam = build(compose_config("optimizer=adam", "optimizer.betas=[0.8,0.99]").optimizer, True)(params)
    assert tuple(adam.param_groups[0]["betas"]) == (0.8, 0.99)
    adamw = build(compose_config("optimizer=adamw").optimizer, True)(params)
    assert adamw.param_groups[0]["weight_decay"] == 0.01


# ---------------------------------------------------------------- experiments
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(compose_config, name: str) -> None:
    job = compose_config(f"experiment={name}", hydra_config=True).hydra.job
    # Hydra's own part composes too, and no experiment renames the job (the compose API's "app":
    # the SLURM job name, the log file's) or turns on chdir (dataset.root stays where you ran).
    assert (job.name, job.chdir) == ("app", False)
    cfg = compose_config(f"experiment={name}")
    assert OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # nothing left unset
    build(cfg.model, True, num_classes=10)
    build(cfg.optimizer, True)(torch.nn.Linear(2, 2).parameters())


def leaves(node: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf of a nested dict, keyed by its path (keys may hold dots: sweeper params)."""
    if not isinstance(node, dict):
        return {path: node}
    return {p: v for key, value in node.items() for p, v in leaves(value, (*path, key)).items()}


def lookup(cfg: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if cfg is None or key not in cfg:
            return None
        cfg = cfg[key]
    return OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sets_only_what_differs_from_the_defaults(compose_config, name: str) -> None:
    """Each group an experiment overrides and each key it sets changes the composed config."""
    body = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text()) or {}
    groups, included = {}, []
    for entry in body.pop("defaults", []):
        if isinstance(entry, str):  # another experiment it builds on (or _self_)
            included += [] if entry == "_self_" else [entry]
            continue
        for key, option in entry.items():
            groups[key.removeprefix("override ").strip("/")] = option
    choices = compose_config(hydra_config=True).hydra.runtime.choices
    for group, option in groups.items():
        assert choices[group] != option, f"{name}: {group}={option} is already the default"
    # The defaults with the experiment's groups and the experiments it builds on, but none of its keys.
    built_on = [f"experiment=[{','.join(included)}]"] if included else []
    base = compose_config(*(f"{g}={o}" for g, o in groups.items()), *built_on, hydra_config=True)
    for path, value in leaves(body).items():
        assert lookup(base, path) != value, f"{name}: {'.'.join(path)}={value} is already the default"


def recipe(name: str) -> tuple[dict[str, str], dict[tuple[str, ...], Any]]:
    """What experiments/NAME.yaml asks for, read from the YAMLs: the group options it chooses and
    every key it sets, after the experiments it builds on (in its defaults order, `_self_` last
    unless placed) and the keys of each config group option it chooses (conf/GROUP/OPTION.yaml)."""
    body = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text()) or {}
    defaults = body.pop("defaults", [])
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    groups: dict[str, str] = {}
    keys: dict[tuple[str, ...], Any] = {}
    for entry in defaults:
        if entry == "_self_":
            keys.update(leaves(body))
        elif isinstance(entry, str):  # another experiment it builds on
            built_groups, built_keys = recipe(entry)
            groups.update(built_groups)
            keys.update(built_keys)
        else:
            for key, option in entry.items():
                group = key.removeprefix("override ").strip("/")
                groups[group] = option
                option_file = CONF_DIR / group / f"{option}.yaml"
                if option_file.exists():  # a group of ours (hydra/sweeper's options are Hydra plugins')
                    option_body = yaml.safe_load(option_file.read_text())
                    option_body.pop("defaults", None)
                    keys.update({(*group.split("/"), *path): v for path, v in leaves(option_body).items()})
    return groups, keys


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_to_its_recipe(compose_config, name: str) -> None:
    """The composed config holds every group option and key the experiment's YAMLs set: none lost
    to the defaults order, an experiment it builds on or a group option it chooses."""
    cfg = compose_config(f"experiment={name}", hydra_config=True)
    groups, keys = recipe(name)
    assert {group: cfg.hydra.runtime.choices[group] for group in groups} == groups
    assert {".".join(path): lookup(cfg, path) for path in keys} == {
        ".".join(path): value for path, value in keys.items()
    }


def test_tutorial_fast_is_the_tutorial_s_network_and_optimizer(compose_config) -> None:
    """tutorial_fast changes the tutorial's schedule and batches, never its layers or momentum
    (its header's promise: same layers, same widths)."""
    fast, tutorial = compose_config("experiment=tutorial_fast"), compose_config("experiment=tutorial")
    assert fast.model == tutorial.model and fast.trainer.epochs == tutorial.trainer.epochs
    unchanged = ("_target_", "momentum", "weight_decay")
    assert {k: fast.optimizer[k] for k in unchanged} == {k: tutorial.optimizer[k] for k in unchanged}


def test_tutorial_is_the_pytorch_tutorial(compose_config) -> None:
    cfg = compose_config("experiment=tutorial")
    assert cfg.trainer.batch_size == 4
    assert cfg.trainer.epochs == 2
    assert cfg.trainer.log_every_n_steps == 2000
    assert cfg.trainer.lr_schedule == "constant"
    assert cfg.trainer.label_smoothing == 0
    assert cfg.trainer.flip is False and cfg.trainer.translate == 0 and cfg.trainer.tta == 0
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == 0 and cfg.optimizer.nesterov is False
    assert list(cfg.dataset.mean) == [0.5] * 3 and list(cfg.dataset.std) == [0.5] * 3
    assert cfg.dataset.val_size == 0  # the tutorial trains on every training image
    model = build(cfg.model, True, num_classes=10)
    assert isinstance(model, CNN)
    layers = (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3)
    assert [layer.weight.shape[0] for layer in layers] == [6, 16, 120, 84, 10]
    assert model.conv1.kernel_size == model.conv2.kernel_size == (5, 5)
    assert model.fc1.in_features == 16 * 5 * 5


def test_command_line_beats_the_experiment(compose_config) -> None:
    cfg = compose_config("experiment=tutorial", "trainer.epochs=1", "optimizer.lr=0.01")
    assert cfg.trainer.epochs == 1 and cfg.optimizer.lr == 0.01
    assert cfg.trainer.batch_size == 4


def test_width_sweep_sweeps_both_conv_widths(compose_config) -> None:
    cfg = compose_config("experiment=width_sweep", hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"model.conv1_out", "model.conv2_out"}
    for key, values in params.items():
        widths = [int(v) for v in str(values).split(",")]
        assert len(widths) > 1, key
        for width in widths:  # every point of the sweep builds
            model = build(compose_config(f"{key}={width}").model, True, num_classes=10)
            assert getattr(model, "conv1" if key.endswith("conv1_out") else "conv2").out_channels == width


def test_width_seeds_runs_each_width_config_with_three_seeds(compose_config) -> None:
    """The headline preset: tutorial_fast's recipe, 2 x 2 widths, each with seeds 0, 1 and 2 (the
    summary groups them into one row per config), holding out the default validation split."""
    cfg = compose_config("experiment=width_seeds", hydra_config=True)
    params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert params == {
        "model.conv1_out": ["6", "12"],
        "model.conv2_out": ["16", "32"],
        "seed": ["0", "1", "2"],
    }
    fast = compose_config("experiment=tutorial_fast")
    assert cfg.trainer == fast.trainer and cfg.optimizer == fast.optimizer
    assert cfg.dataset.val_size == 0.1


# ---------------------------------------------------------------- trust: code a record names
def test_build_without_trust_refuses_code_outside_the_package_before_importing_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    node = OmegaConf.create({"_target_": "os.system", "command": f"touch {marker}"})
    with pytest.raises(UserError, match=r"module os\b.*--trust"):
        build(node, False)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.eval", "torch.optimizer_lookalike", "mynets.Tiny"])
def test_untrusted_targets_are_refused_by_namespace(target: str) -> None:
    with pytest.raises(UserError, match="read back from a store"):
        build(OmegaConf.create({"_target_": target}), False)


def test_a_nested_target_is_checked_too() -> None:
    """instantiate builds nested `_target_`s: an argument may not smuggle one in."""
    node = OmegaConf.create({"model": {"_target_": "cifar_exp.models.CNN", "x": {"_target_": "os.getcwd"}}})
    with pytest.raises(UserError, match=r"model\.x\._target_='os.getcwd'"):
        build(node.model, False)


def test_the_package_s_own_code_needs_no_trust(compose_config) -> None:
    cfg = compose_config(
        "model=resnet18", "model.width1=8", "model.width2=8", "model.width3=8", "model.width4=8"
    )
    net = build(cfg.model, False, num_classes=10)
    build(cfg.optimizer, False)(net.parameters())


# ---------------------------------------------------------------- ranges (test_bad_values.py: every key)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=0"], "optimizer.lr=0.0: must be > 0"),
        (["optimizer.lr=inf"], "optimizer.lr=inf: must be finite and > 0"),
        (["optimizer.momentum=1"], "optimizer.momentum=1.0: must be in [0, 1)"),
        (
            ["optimizer.nesterov=true", "optimizer.momentum=0"],
            "optimizer.nesterov=true needs optimizer.momentum > 0",
        ),
        (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas=[0.9]: must be a list of 2 numbers"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be >= 0"),
        (["dataset.mean=[125.3,123,114]"], "0-255 values? divide them by 255"),
        (["model=airbench94", "model.whiten_width=13"], "model.whiten_width=13: must be even"),
        (["model.fc1_out=5000"], "model.fc1_out=5000: must be in [1, 4096]"),
        (["device.threads=-1"], "device.threads=-1: must be in [0, 1024]"),
        (["mlflow.experiment_name=' '"], "mlflow.experiment_name=' ': empty"),
        (["resume=''"], "resume='': empty; must be a run id or a checkpoint file, or null"),
        (["model.width1=0", "model=resnet18"], "model.width1=0: must be in [1, 4096]"),
        (["model._target_=nowhere.Net"], "model._target_='nowhere.Net': cannot import it"),
        (["trust=false", "model._target_=mynets.Tiny"], "module mynets"),
    ],
)
def test_validate_names_the_key_and_what_is_allowed(
    compose_config, overrides: list[str], message: str
) -> None:
    with pytest.raises(UserError) as excinfo:
        validate(compose_config(*overrides))
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize("name", [*options("optimizer"), "experiment=airbench94"])
def test_validate_accepts_every_option(compose_config, name: str) -> None:
    validate(compose_config(name if "=" in name else f"optimizer={name}"))


def test_a_constructor_error_is_one_line_naming_the_node(compose_config) -> None:
    """What validate misses still ends in one line: torch.optim's own check, called later."""
    make = build(compose_config().optimizer, True)
    with pytest.raises(UserError, match=r"^optimizer \(torch.optim.SGD\): Invalid learning rate: -1$"):
        make(torch.nn.Linear(2, 2).parameters(), lr=-1)
    with pytest.raises(UserError, match=r"^model \(cifar_exp.models.CNN\): .*unexpected keyword"):
        build(compose_config().model, True, num_classes=10, colour=True)
