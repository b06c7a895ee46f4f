"""`cifar-exp [overrides] --help` prints the composed config as YAML a user can copy, every key with
its one-line meaning, read from the comments beside the keys in the schemas and YAML files."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, REPO
from omegaconf import OmegaConf

from cifar_exp import help_text, key_meanings

EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
OPTIONS = sorted(f"{d.name}={p.stem}" for d in CONF_DIR.iterdir() if d.is_dir() for p in d.glob("*.yaml"))
LEAF = re.compile(r"^(?P<key>\s*[\w.]+): (?P<value>.+?)(?:\s+# (?P<meaning>.*))?$")


def config_section(compose_config, *overrides: str) -> str:
    """The `== Config ==` section, as conf/config.yaml's help template renders it for Hydra."""
    help_text.register()
    template = compose_config(*overrides, hydra_config=True).hydra.help.template
    text = string.Template(template).safe_substitute()  # as Hydra fills it in: `$$` becomes `$`
    return text.split("== Config ==\n")[1].split("\n\n", 1)[1].rsplit("\n\n", 1)[0]


def leaves(section: str) -> dict[str, str]:
    """key (dotted) -> the meaning printed beside it or on the comment line right above it."""
    found, parents, above = {}, [], ""
    for line in section.splitlines():
        if line.strip().startswith("#"):
            above = line.strip()[2:]
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        key = line.strip().split(":")[0]
        parents = parents[:indent] + [key]
        if match := LEAF.match(line):
            found[".".join(parents)] = match["meaning"] or above
        above = ""
    return found


@pytest.mark.parametrize(
    "overrides", [[], *([f"experiment={e}"] for e in EXPERIMENTS), *([o] for o in OPTIONS)]
)
def test_every_key_has_a_one_line_meaning(compose_config, overrides: list[str]) -> None:
    section = config_section(compose_config, *overrides)
    missing = [key for key, meaning in leaves(section).items() if not meaning.strip()]
    assert missing == [], f"add a comment beside these keys where they are written: {missing}"
    assert max(len(line) for line in section.splitlines()) <= help_text.WIDTH


@pytest.mark.parametrize("overrides", [[], ["experiment=airbench94", "dataset=cifar100"]])
def test_the_config_section_is_the_composed_config_as_yaml(compose_config, overrides: list[str]) -> None:
    """Copied into a file, it composes to the same values (the meanings are YAML comments)."""
    cfg = compose_config(*overrides)
    section = config_section(compose_config, *overrides)
    assert yaml.safe_load(section) == OmegaConf.to_container(cfg, enum_to_str=True)


def test_meanings_are_the_comments_where_each_key_is_written(compose_config) -> None:
    meanings = leaves(config_section(compose_config, "experiment=airbench94", "dataset=cifar100"))
    assert meanings["trainer.tta"].startswith("test-time augmentation")  # config.py, beside the field
    assert meanings["trainer.epochs"].startswith(
        "passes over the training set"
    )  # config.py, the lines above it
    assert meanings["model.block1"].startswith(
        "channels of the first conv group"
    )  # conf/model/airbench94.yaml
    assert meanings["dataset.download"].startswith(
        "fetch cifar-100-python.tar.gz"
    )  # load_cifar100's signature
    assert meanings["dataset.val_size"].endswith("…")  # a long comment, cut to one line
    # cifar100.yaml's comment on `mean` speaks of its own statistics, which the experiment replaced
    assert meanings["dataset.mean"].startswith("Normalisation per channel")
    assert leaves(config_section(compose_config, "dataset=cifar100"))["dataset.mean"].startswith(
        "CIFAR-100's"
    )


def make(*, width: int = 3, depth: int = 2, bias: bool = True) -> None:  # its meanings are read, not run
    """A constructor of one's own.

    Args:
        width: channels of each layer
        depth (int): layers, each
            `width` wide
    """


def test_own_constructor_meanings_come_from_its_docstring() -> None:
    meanings = key_meanings.argument_meanings(f"{__name__}.make")
    assert meanings == {"width": "channels of each layer", "depth": "layers, each `width` wide", "bias": ""}


def test_yaml_meanings_are_read_beside_or_above_each_key(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("# header\nlayers:\n  # channels\n  width: 8\n  depth: 2  # layers: how many\nplain: 1\n")
    assert key_meanings.yaml_meanings(path, "model") == {
        "model.layers": "header",
        "model.layers.width": "channels",
        "model.layers.depth": "layers: how many",
        "model.plain": "",
    }


def test_help_prints_the_meanings_and_refuses_a_bad_override_in_one_line(main_in_process) -> None:
    result = main_in_process("experiment=airbench94", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cifar-exp: train CIFAR-10 classifiers")
    assert "== Configuration groups ==" in result.stdout and "HYDRA_FULL_ERROR=1" in result.stdout
    assert re.search(r"\n  tta: 2 +# test-time augmentation: 0 none", result.stdout)
    assert re.search(r"\n  cache_dir: null +# null: \$CIFAR_EXP_CACHE_DIR", result.stdout)
    refused = main_in_process("trainer.tta=x", "--help")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "trainer.tta=x" in refused.stderr and not refused.stdout
