"""How runs and the keys they vary are named for people: an override split into key and value,
dotted keys by their shortest unambiguous ending, values as short as a name shows them; and run
names built from them (a sweep's job by what the sweep varies, a single run by its experiment and
overrides, with a token of its own). The sweep tables' columns use the same short keys."""

from __future__ import annotations

import secrets
import string

NAME_CHARS = 60  # a single run's name, its distinguishing token included, is at most this long


def split_override(item: str) -> tuple[str, str]:
    """'+model.conv1_out=8' -> ('model.conv1_out', '8'); a deletion '~key' has the value ''."""
    key, _, value = item.lstrip("+~").partition("=")
    return key, value


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest unambiguous ending: model.conv1_out -> conv1_out, but
    optimizer.lr and scheduler.lr stay whole when both are there."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            ending = ".".join(parts[-n:])
            if not any(other != key and ".".join(other.split(".")[-n:]) == ending for other in keys):
                break
        out[key] = ending
    return out


def short_value(value: str) -> str:
    """A value as a name shows it: floats to 4 significant digits (a search's 0.012345678 ->
    0.01235), anything else as written, cut at 24 characters."""
    try:
        number = float(value)
    except ValueError:
        return value if len(value) <= 24 else value[:23] + "…"
    return f"{number:.4g}" if "." in value or "e" in value.lower() else value


TOKEN_CHARS = string.ascii_lowercase + string.digits  # a single run's distinguishing token


def run_name(overrides: list[str], swept: tuple[str, ...] | list[str] = ()) -> str:
    """Readable, and never shared by two runs. A sweep's job is named by what the sweep varies only
    ('conv1_out=16,lr=0.01'; `swept`: the keys it varies): its parent tells
    its jobs apart. A single run by its experiment and its overrides (single_run_name), with a
    token of its own: 'tutorial_fast,epochs=1,root=cifar10 #k3x9a2', 'default #p0q7zt'."""
    values = dict(split_override(item) for item in overrides)
    if swept and any(key in values for key in swept):
        short = short_keys(list(swept))
        return ",".join(f"{short[k]}={short_value(values[k])}" for k in swept if k in values)
    return single_run_name(overrides)


def single_run_name(overrides: list[str], prefix: str = "") -> str:
    """`prefix`, the experiment, the overrides without mlflow.* and hydra.* ones (short keys, a
    path as its last part), then ' #' and 6 random characters (MLflow's habit of a random
    suffix): two runs of the same overrides, `make run` twice, are told apart; two names are the
    same once in 2 billion. At most NAME_CHARS characters: past them the experiment and the last
    overrides typed (what is being tried, usually) stay, the count of those left out between them:
    'tutorial_fast,…+3…,conv1_out=8,lr=0.01 #k3x9a2'. 'default' without overrides."""
    token = " #" + "".join(secrets.choice(TOKEN_CHARS) for _ in range(6))
    parts, experiment = name_parts(overrides)
    return prefix + _capped(parts, NAME_CHARS - len(prefix) - len(token), experiment) + token


def rerun_name(recorded: list[str], overrides: list[str]) -> str:
    """A rerun's name: the recorded run's overrides with the rerun's own on top, a key given
    again taking its new value ('rerun:epochs=3,lr=0.01 #...' from epochs=1,lr=0.01 and
    trainer.epochs=3)."""
    merged = {split_override(item)[0]: item for item in recorded}
    merged.update({split_override(item)[0]: item for item in overrides})
    return single_run_name(list(merged.values()), prefix="rerun:")


def name_parts(overrides: list[str]) -> tuple[list[str], int]:
    """'experiment=tutorial_fast' -> 'tutorial_fast' (first); 'dataset.root=/data/cifar10' ->
    'root=cifar10': a name never holds a path (a path's last part says which folder; '/' or '.'
    says nothing and is left out). Also how many of the parts name the experiment (0 or 1)."""
    named = [
        (key, value)
        for key, value in map(split_override, overrides)
        if not key.startswith(("mlflow.", "hydra.", "hydra/"))
    ]
    short = short_keys([key for key, _ in named])
    experiment, parts = [], []
    for key, value in named:
        if "/" in value or "\\" in value:
            value = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].strip(".")
            if not value:
                continue
        if key == "experiment":
            experiment = [value]  # the last one given is the one composed
        else:
            parts.append(f"{short[key]}={short_value(value)}")
    return [*experiment, *parts], len(experiment)


def _capped(parts: list[str], chars: int, head: int) -> str:
    """`parts` joined, in at most `chars`: past them the first `head` parts (the experiment) and the
    last ones (what is being tried, usually) stay, the count of those left out between them."""
    if len(",".join(parts)) <= chars:
        return ",".join(parts) or "default"
    kept, tail = [part[: chars - 8] for part in parts[:head]], []
    for part in reversed(parts[head:]):
        if len(",".join([*kept, "…+999…", part, *tail])) > chars:
            break
        tail.insert(0, part)
    return ",".join([*kept, f"…+{len(parts) - head - len(tail)}…", *tail])
