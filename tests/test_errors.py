"""Bad input ends in a message that names what to fix and a non-zero exit, not a traceback
(HYDRA_FULL_ERROR=1 brings the traceback back). Mistakes in the config fail at compose time,
before torch is imported; the others fail before any training or MLflow run starts."""

from __future__ import annotations

from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch
from conftest import start_cli

# Valid everywhere, so each case below has exactly one mistake; tiny, should one run by accident.
TINY = ("dataset=synthetic", "dataset.train_size=20", "dataset.test_size=10", "trainer.epochs=1")

COMPOSE_ERRORS = [
    (["model.conv1_ot=32"], ["conv1_ot"]),
    (["optimizer.lr=abc"], ["optimizer.lr", "abc"]),
    (["trainer.epochs=two"], ["trainer.epochs", "two"]),
    (["experiment=no_such_experiment"], ["experiment/no_such_experiment", "tutorial"]),
]
RUN_ERRORS = [
    (["model.conv1_out=0"], ["model.conv1_out=0", "positive"]),
    (["trainer.batch_size=-1"], ["trainer.batch_size=-1", "positive"]),
    (["model.kernel_size=20"], ["model.kernel_size=20"]),
]


def assert_user_error(result, expected: list[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr}"
    assert "Accuracy of the network" not in result.stdout


BAD_VALUES = COMPOSE_ERRORS + RUN_ERRORS


@pytest.fixture(scope="module")
def bad_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, CompletedProcess[str]]]:
    """Every bad value's command, each in a folder (and store) of its own, started together."""
    started = {}
    for overrides, _ in BAD_VALUES:
        cwd = tmp_path_factory.mktemp("bad_value")
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
        started[" ".join(overrides)] = (cwd, start_cli(*TINY, *overrides, cwd=cwd, env=env))
    return {name: (cwd, command.result(120)) for name, (cwd, command) in started.items()}


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_message(bad_values, overrides: list[str], expected: list[str]) -> None:
    cwd, result = bad_values[" ".join(overrides)]
    assert_user_error(result, expected)
    assert not (cwd / "mlflow.db").exists()  # failed before a run was opened


def test_missing_imagefolder_names_the_path(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    result = run_cli("dataset=imagefolder", f"dataset.root={root}", cwd=tmp_path, timeout=60)
    assert_user_error(result, [str(root / "train"), "train/<class>/", "test/<class>/"])


def test_missing_cifar10_names_the_path_and_remedies(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "empty"
    result = run_cli(
        "dataset=cifar10", f"dataset.root={root}", "dataset.download=false", cwd=tmp_path, timeout=60
    )
    assert_user_error(result, [str(root), "dataset.download=true", "cifar-10-python.tar.gz"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so device=cuda is valid")
def test_cuda_without_a_gpu(run_cli, tmp_path: Path) -> None:
    result = run_cli(*TINY, "device=cuda", cwd=tmp_path, timeout=60)
    assert_user_error(result, ["device=cuda", "device=cpu"])


@pytest.mark.parametrize(
    ("mistake", "said"),
    [
        ("trainer.epochs=two", ["trainer.epochs"]),
        ("trainer.batch_size=-1", ["UserError", "trainer.batch_size=-1"]),
    ],
    ids=["at compose time", "in the run"],
)
def test_full_error_shows_the_traceback(run_cli, tmp_path: Path, mistake: str, said: list[str]) -> None:
    result = run_cli(*TINY, mistake, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}, timeout=60)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    for text in said:
        assert text in result.stderr, result.stderr
