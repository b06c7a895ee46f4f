"""Run names: a single run is named after its experiment and the keys it changes, short, never
a path, and never shared with another run; a sweep's job by its swept values; a rerun by its
own values."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from cifar_exp import commands, run_names

TOKEN = r" #[a-z0-9]{6}"


def body(name: str) -> str:
    """The name without its distinguishing token."""
    assert re.fullmatch(rf".+{TOKEN}", name), name
    return name[:-8]


def test_a_single_run_is_named_by_its_experiment_and_changed_keys() -> None:
    assert body(run_names.run_name([], [])) == "default"
    assert body(
        run_names.run_name(["model.conv1_out=8", "mlflow.tracking_uri=x", "optimizer.lr=0.01"], [])
    ) == ("conv1_out=8,lr=0.01")
    typed = ["trainer.epochs=1", "experiment=tutorial_fast", "hydra.run.dir=/tmp/x", "hydra/launcher=joblib"]
    assert body(run_names.run_name(typed, [])) == "tutorial_fast,epochs=1"


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("dataset.root=/path/to/cifar10", "root=cifar10"),
        ("dataset.root=/path/to/cifar10/", "root=cifar10"),
        ("dataset.root=../data/my images", "root=my images"),
        ("dataset.root=C:\\data\\cifar", "root=cifar"),
        ("resume=outputs/2026-12-03/22-58-19/checkpoint.pt", "resume=checkpoint.pt"),
        ("dataset.root=/", None),  # a path that names nothing: left out
        ("dataset.root=./", None),
    ],
)
def test_a_name_never_holds_a_path(override: str, shown: str | None) -> None:
    name = body(run_names.run_name(["experiment=tutorial_fast", override, "trainer.epochs=1"], []))
    assert name == ",".join(filter(None, ["tutorial_fast", shown, "epochs=1"]))
    assert "/" not in name and "\\" not in name


def test_the_issues_long_name_is_short_and_ends_with_what_is_tried() -> None:
    """The name #22 saw: 100 characters, an absolute path in it."""
    typed = [
        "experiment=tutorial_fast", "dataset=imagefolder", "dataset.root=/path/to/cifar10",
        "trainer.batch_size=512", "model.conv1_out=8", "optimizer.lr=0.0123456", "trainer.epochs=1",
    ]  # fmt: skip
    name = run_names.run_name(typed, [])
    assert len(name) <= run_names.NAME_CHARS == 60
    assert body(name).startswith("tutorial_fast,…+") and body(name).endswith(",lr=0.01235,epochs=1"), name


def test_names_stay_within_60_characters_whatever_is_typed() -> None:
    rng = random.Random(0)
    for _ in range(500):
        typed = [
            f"{'g' * rng.randint(1, 30)}.{'k' * rng.randint(1, 40)}{j}={'v' * rng.randint(0, 60)}"
            for j in range(rng.randint(0, 10))
        ]
        assert len(run_names.run_name(typed, [])) <= run_names.NAME_CHARS, typed
        assert len(run_names.rerun_name(typed, typed[:1])) <= run_names.NAME_CHARS, typed


def test_two_runs_of_the_same_config_never_share_a_name() -> None:
    """`make run` twice: both 'default' before; now each has its own token."""
    names = [run_names.run_name([], []) for _ in range(1000)]
    assert len(set(names)) == len(names)
    assert {body(name) for name in names} == {"default"}


def test_a_sweeps_job_keeps_its_swept_values_as_its_name() -> None:
    assert run_names.run_name(["seed=3", "model.conv1_out=16"], ["model.conv1_out"]) == "conv1_out=16"


def test_a_rerun_is_named_by_its_own_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`rerun RUN_ID trainer.epochs=3` of a run trained with trainer.epochs=1: epochs=3 in its name."""
    assert body(run_names.rerun_name(["trainer.epochs=1", "optimizer.lr=0.01"], ["trainer.epochs=3"])) == (
        "rerun:epochs=3,lr=0.01"
    )
    snapshot = tmp_path / "config.yaml"
    snapshot.write_text("mlflow: {tracking_uri: null}\ntrainer: {epochs: 1}\noptimizer: {lr: 0.01}\n")
    original = SimpleNamespace(
        info=SimpleNamespace(run_name="epochs=1,lr=0.01 #abcdef"),
        data=SimpleNamespace(tags={"overrides": json.dumps(["trainer.epochs=1", "optimizer.lr=0.01"])}),
    )
    monkeypatch.setattr(commands, "_download", lambda *args: snapshot)
    monkeypatch.setattr(commands, "check_code", lambda *args: True)
    monkeypatch.setattr(
        "mlflow.tracking.MlflowClient", lambda uri: SimpleNamespace(get_run=lambda _: original)
    )
    started = []
    uri = "sqlite:///unused.db"
    commands.rerun(uri, "0" * 32, ["trainer.epochs=3"], lambda argv, tags: started.append(tags), False, False)
    (tags,) = started
    assert body(tags["mlflow.runName"]) == "rerun:epochs=3,lr=0.01" and tags["rerun_of"] == "0" * 32


def test_without_an_experiment_the_last_overrides_typed_stay() -> None:
    """What test_tracking's run types: eight settings of a small run, then what it tries."""
    typed = [f"dataset.size{i}=100" for i in range(8)] + [
        "model.conv1_out=8",
        "optimizer=adam",
        "optimizer.lr=0.01",
    ]
    name = body(run_names.run_name(typed, []))
    assert name.startswith("…+") and name.endswith(",conv1_out=8,optimizer=adam,lr=0.01"), name
