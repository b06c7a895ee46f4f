"""The config section of `cifar-exp [overrides] --help`: the composed config as YAML a user can copy
into a config file, each key with its one-line meaning (cifar_exp/key_meanings.py) as a `# ...`
comment. conf/config.yaml's hydra.help.template calls config_help through an OmegaConf resolver, so
Hydra still composes the config (overrides, experiment, one-line errors) and fills in the header,
the groups and the footer as before.
"""

from __future__ import annotations

import yaml
from omegaconf import DictConfig, OmegaConf

from cifar_exp.key_meanings import KeyMeanings

WIDTH = 110  # longest line printed (a value longer than that still prints whole)
COLUMN = 32  # where the meanings start, for keys and values shorter than that


def _line(text: str, meaning: str, indent: str) -> list[str]:
    """`text  # meaning`, the meaning cut to fit WIDTH; above the key when the value leaves no room."""
    if not meaning:
        return [text]
    meaning = " ".join(meaning.split())
    above = len(text) + 2 > WIDTH - 26
    column = len(indent) if above else max(COLUMN, len(text) + 2)
    room = WIDTH - column - 2
    meaning = meaning if len(meaning) <= room else meaning[: room - 1].rstrip() + "…"
    return [f"{indent}# {meaning}", text] if above else [f"{text.ljust(column)}# {meaning}"]


def _lines(node: DictConfig, plain: dict, path: str, depth: int, meanings: KeyMeanings) -> list[str]:
    indent, out = "  " * depth, []
    target = plain.get("_target_") if isinstance(plain.get("_target_"), str) else None
    for key, value in plain.items():
        dotted = f"{path}{key}"
        if isinstance(value, dict) and value:
            out += _line(f"{indent}{key}:", meanings.groups.get(dotted, ""), indent)
            out += _lines(node[key], value, f"{dotted}.", depth + 1, meanings)
            continue
        shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()
        meaning = meanings.meaning(str(key), dotted, OmegaConf.get_type(node), target)
        out += _line(f"{indent}{key}: {shown}", meaning, indent)
    return out


def config_help(*, _root_: DictConfig) -> str:
    """The composed config (hydra's own node left out), each key with its meaning; `$` doubled, as
    Hydra fills the help template in with string.Template after this."""
    meanings = KeyMeanings.of(dict(_root_.hydra.runtime.choices))
    plain = OmegaConf.to_container(_root_, resolve=False, enum_to_str=True)
    plain.pop("hydra", None)
    return "\n".join(_lines(_root_, plain, "", 0, meanings)).replace("$", "$$")


def register() -> None:
    """Make `${cifar_exp.config_help:}` (conf/config.yaml's hydra.help.template) known to OmegaConf."""
    OmegaConf.register_new_resolver("cifar_exp.config_help", config_help, replace=True)
