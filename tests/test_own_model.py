"""Your own model (README "Your own model", issue 20): the README's example run as written, in a
folder outside the package; an optimizer of your own choosing; dataset=cifar100 on generated
pickles in torchvision's format."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, Store, cli_env, compose_config
from omegaconf import OmegaConf

from cifar_exp.config import build
from cifar_exp.errors import UserError
from cifar_exp.run import load_data


def readme_example() -> str:
    """The first indented block of the README's "Your own model" section, as a shell script."""
    section = (REPO / "README.md").read_text().split("## Your own model", 1)[1]
    block = re.search(r"\n\n((?:    .*\n|\n)+)", section)[1]
    return "".join(line[4:] + "\n" for line in block.rstrip().splitlines())


@pytest.mark.slow  # 3 short runs, a rerun and a refusal: ~60 s on 2 cores
def test_the_readme_example_runs_as_written(tmp_path: Path, mlflow_store: str) -> None:
    env = cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert (tmp_path / "myproject" / "mynets.py").is_file(), output
    runs = Store(mlflow_store).runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 3, output
    assert sorted(int(r.data.params["model.width"]) for r in children) == [8, 16, 32]
    assert {r.data.params["model._target_"] for r in children} == {"mynets.Tiny"}
    assert all(r.info.status == "FINISHED" and "val/acc" in r.data.metrics for r in children)
    newest = max(children, key=lambda r: r.info.start_time)
    assert "model/state_dict.pt" in Store(mlflow_store).artifacts(newest.info.run_id, "model")
    assert re.search(r"^red\.png: \w+ [\d.]+%, \w+ [\d.]+%, \w+ [\d.]+%$", result.stdout, re.M), output
    refusals = [line for line in result.stderr.splitlines() if "--trust" in line]
    assert len(refusals) == 1 and "module mynets" in refusals[0], output
    reruns = [r for r in Store(mlflow_store).runs() if r.data.tags.get("rerun_of") == newest.info.run_id]
    assert len(reruns) == 1 and reruns[0].info.status == "FINISHED", output
    assert reruns[0].data.params["trust"] == "True" and newest.data.params["model.width"] == "32"


def test_any_torch_optim_optimizer_builds_with_its_own_arguments() -> None:
    """An optimizer YAML of your own (conf/optimizer/rmsprop.yaml), as composed: a plain node."""
    node = {"_target_": "torch.optim.RMSprop", "_partial_": True, "lr": 0.01, "alpha": 0.9}
    cfg = OmegaConf.create({"optimizer": {**node, "norm_bias_lr_scale": 1.0}})
    optimizer = build(cfg.optimizer, True)(torch.nn.Linear(2, 2).parameters())
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.defaults["alpha"] == 0.9
    cfg.optimizer.alpah = 0.9
    with pytest.raises(UserError, match=r"^optimizer\.alpah: not an argument of torch.optim.RMSprop"):
        build(cfg.optimizer, True)


def test_cifar100_loads_torchvision_pickles_with_a_validation_split(
    cifar100_folder, skip_cifar_md5, fresh_data_cache
) -> None:
    cfg = compose_config("dataset=cifar100", f"dataset.root={cifar100_folder.root}", "dataset.download=false")
    data = load_data(OmegaConf.to_yaml(cfg.dataset), cfg.trust)
    assert data.name == "cifar100" and data.classes == cifar100_folder.classes and len(data.classes) == 100
    assert len(data.train_labels) + len(data.val_labels) == 400 and len(data.val_labels) == 40
    assert int(torch.bincount(data.val_labels).max()) == 1  # stratified: 40 of 100 classes give one each
    expected = torch.from_numpy(cifar100_folder.test_data).view(-1, 3, 32, 32)
    assert torch.equal(data.test_images, expected)
    assert data.test_labels.tolist() == cifar100_folder.test_labels
    net = build(compose_config("model=cnn").model, True, num_classes=len(data.classes))
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
