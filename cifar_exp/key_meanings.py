"""Each config key's one-line meaning, read where it is already written, so there is one source and no
table of meanings: the comment beside (or right above) the key. In order: its line in the chosen
option's YAML (conf/<group>/<option>.yaml), unless the experiment sets the key (the option's comment
spoke of the value replaced); the schema field's in cifar_exp/config.py (the node's schema, then
those it extends); the argument's in its `_target_`'s signature, or its docstring's `name: ...`
line (the schemas generated from signatures); the experiment's line. `cifar-exp --help` shows them
(cifar_exp/help_text.py); tests/test_help.py fails for a key without one.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_exp import config

YAML_KEY = re.compile(r"^(?P<indent> *)(?P<key>[\w.]+):(?P<rest>.*)$")
DOC_PARAM = re.compile(r"^\s*(?::param\s+)?`?(?P<name>\w+)`?(?:\s*\([^)]*\))?:\s+(?P<text>\S.*)$")


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Python source's comments by line number, and which lines hold nothing but a comment."""
    text, alone = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = token.start[0]
            text[line] = token.string.lstrip("#").strip()
            if token.line.strip().startswith("#"):
                alone.add(line)
    return text, alone


def _beside_or_above(first: int, last: int, text: dict[int, str], alone: set[int]) -> str:
    """The comment beside lines first..last, else the block of comment lines right above first."""
    for line in range(first, last + 1):
        if line in text and line not in alone:
            return text[line]
    block, line = [], first - 1
    while line in alone:
        block.insert(0, text[line])
        line -= 1
    return " ".join(block)


@functools.cache
def schema_meanings() -> dict[str, dict[str, str]]:
    """class name -> field -> its comment, for the schemas written in cifar_exp/config.py."""
    source = Path(config.__file__).read_text()
    text, alone = _comments(source)
    found: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            found[node.name] = {
                f.target.id: _beside_or_above(f.lineno, f.end_lineno, text, alone) for f in fields
            }
    return found


@functools.cache
def argument_meanings(target: str) -> dict[str, str]:
    """argument -> meaning for the callable `target` names: the comment beside the argument in its
    signature, else its docstring's `name: ...` (or `:param name:`) line. {} if it cannot be read."""
    module, _, name = target.rpartition(".")
    try:
        made = getattr(importlib.import_module(module), name)
        source = textwrap.dedent(inspect.getsource(made))  # a method's source parses alone
        tree = ast.parse(source)
    except Exception:  # noqa: BLE001 - not importable, or no source: help still prints, without these
        return {}
    found = {}
    docs = [inspect.getdoc(made), inspect.getdoc(made.__init__) if inspect.isclass(made) else None]
    param, indent = "", 0
    for line in "\n".join(doc or "" for doc in docs).splitlines():
        depth = len(line) - len(line.lstrip())
        if param and line.strip() and depth > indent:  # the description goes on, indented further
            found[param] += " " + line.strip()
        elif match := DOC_PARAM.match(line):
            param, indent = ("", 0) if match["name"] in found else (match["name"], depth)
            found.setdefault(match["name"], match["text"])
        else:
            param = ""
    wanted = "__init__" if inspect.isclass(made) else made.__name__
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == wanted]
    arguments = (functions[0].args.args + functions[0].args.kwonlyargs) if functions else []
    text, alone = _comments(source)
    lines = [a.lineno for a in arguments]
    for arg in arguments:  # a comment is an argument's own only on a line it does not share
        own = lines.count(arg.lineno) == 1
        beside = _beside_or_above(arg.lineno, arg.end_lineno, text, alone) if own else ""
        found[arg.arg] = beside or found.get(arg.arg, "")
    return found


def yaml_meanings(path: Path, package: str) -> dict[str, str]:
    """dotted key -> the comment on its line (else the comment lines right above it) in a YAML file
    whose keys sit under `package` ("" for `# @package _global_`)."""
    found: dict[str, str] = {}
    if not path.is_file():
        return found
    text = path.read_text()
    prefix = "" if "# @package _global_" in text else f"{package}."
    parents: list[tuple[int, str]] = []
    above: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        if match := YAML_KEY.match(line):
            indent = len(match["indent"])
            parents = [(i, k) for i, k in parents if i < indent] + [(indent, match["key"])]
            beside = re.search(r"\s#\s*(.*)$", match["rest"])
            key = prefix + ".".join(k for _, k in parents)
            found[key] = beside[1].strip() if beside else " ".join(above)
        above = []
    return found


def _experiment_files(option: str) -> list[Path]:
    """The experiment's file and the experiments it starts from (its `defaults`), its own first."""
    path = config.CONF_DIR / "experiment" / f"{option}.yaml"
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []
    starts = [d for d in defaults if isinstance(d, str) and d != "_self_"]
    return [path] + [p for start in reversed(starts) for p in _experiment_files(start)]


@dataclass
class KeyMeanings:
    """The YAML comments in play for one composition (its group choices): dotted key -> comment."""

    options: dict[str, str] = field(default_factory=dict)  # the chosen options' conf/<group>/<option>.yaml
    # every key the experiment (and those it starts from) sets, "" where it has no comment
    experiments: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # group -> which option, from which file

    @classmethod
    def of(cls, choices: dict[str, Any]) -> KeyMeanings:
        """`choices`: group -> option, as Hydra records them in hydra.runtime.choices."""
        found = cls()
        for group, option in choices.items():
            if option and group != "experiment" and not group.startswith("hydra"):
                found.options.update(yaml_meanings(config.CONF_DIR / group / f"{option}.yaml", group))
                found.groups[group] = f"{group}={option}: conf/{group}/{option}.yaml"
        for path in _experiment_files(choices.get("experiment") or "")[::-1]:  # its own last: they win
            for key, comment in yaml_meanings(path, "").items():
                found.experiments[key] = comment or found.experiments.get(key, "")
        return found

    def meaning(self, key: str, dotted: str, schema: type | None, target: str | None) -> str:
        """An option's comment speaks of its value: not when the experiment replaced that value."""
        option = self.options.get(dotted, "")
        schemas = schema_meanings()
        written_here = [c for c in getattr(schema, "__mro__", ()) if c.__module__ == config.__name__]
        fields = [schemas.get(c.__name__, {}).get(key, "") for c in written_here]
        argument = argument_meanings(target).get(key, "") if target else ""
        experiment = self.experiments.get(dotted, "")
        order = (
            [*fields, argument, experiment, option]
            if dotted in self.experiments
            else [option, *fields, argument]
        )
        return next((meaning for meaning in order if meaning), "")
