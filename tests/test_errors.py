"""Bad input ends in a message that names what to fix and a non-zero exit, not a traceback
(HYDRA_FULL_ERROR=1 brings the traceback back). Mistakes in the config fail at compose time,
before torch is imported; the others fail before any training or MLflow run starts."""

from __future__ import annotations

import sqlite3
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
    (["trainer.lr_schedule=linear"], ["trainer.lr_schedule", "linear", "constant, onecycle"]),
    (["experiment=no_such_experiment"], ["experiment/no_such_experiment", "tutorial"]),
]
RUN_ERRORS = [
    (["model.conv1_out=0"], ["model.conv1_out=0", "[1, 4096]"]),
    (["trainer.batch_size=-1"], ["trainer.batch_size=-1", ">= 1"]),
    (["trainer.tta=3"], ["trainer.tta=3", "[0, 2]"]),
    (["model.kernel_size=20"], ["model.kernel_size=20"]),
    # Checked by validation.validate before anything is built (tests/test_bad_values.py tries every
    # key): torch.optim's error was a traceback, the std of 0 opened a run that failed on NaN, the
    # URI trained a whole run before failing.
    (["optimizer.lr=-1"], ["optimizer.lr=-1.0: must be > 0"]),
    (["dataset.std=[0,0.5,0.5]"], ["dataset.std=[0.0, 0.5, 0.5]", "(0, 1]"]),
    (["mlflow.tracking_uri=abc"], ["mlflow.tracking_uri=abc: not a URI"]),  # trained, then failed
]


def assert_user_error(result, expected: list[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr}"
    assert "Accuracy of the network" not in result.stdout


def said(result: CompletedProcess[str]) -> list[str]:
    """What the command said on stderr, without MLflow's own start-up lines as it creates a store."""
    return [line for line in result.stderr.splitlines() if line.strip() and " INFO mlflow." not in line]


BAD_VALUES = COMPOSE_ERRORS + RUN_ERRORS
FULL_ERROR = {"HYDRA_FULL_ERROR": "1"}
NO_GPU = not torch.cuda.is_available()
# Every command of this file: name -> (arguments, environment). Data roots are relative to the
# command's folder, where nothing is.
COMMANDS = {
    **{" ".join(overrides): ([*TINY, *overrides], {}) for overrides, _ in BAD_VALUES},
    "missing imagefolder": (["dataset=imagefolder", "dataset.root=nothing"], {}),
    "missing cifar10": (
        ["dataset=cifar10", "dataset.root=empty", "dataset.download=false", "dataset.fallback=false"],
        {},
    ),
    **({"cuda without a gpu": ([*TINY, "device=cuda"], {})} if NO_GPU else {}),
    "full error at compose time": ([*TINY, "trainer.epochs=two"], FULL_ERROR),
    "full error in the run": ([*TINY, "trainer.batch_size=-1"], FULL_ERROR),
    "resume of nothing": ([*TINY, "resume=abc"], {}),
    "in a sweep's job": ([*TINY, "model.conv1_out=0", "mlflow.enabled=false", "-m"], {}),
    "batch larger than the data": ([*TINY, "trainer.batch_size=1000000000", "mlflow.enabled=false"], {}),
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, CompletedProcess[str]]]:
    """Every command, each in a folder (and store) of its own, started together: (folder, result)."""
    started = {}
    for name, (args, env) in COMMANDS.items():
        cwd = tmp_path_factory.mktemp("mistake")
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **env}
        started[name] = (cwd, start_cli(*args, cwd=cwd, env=env))
    return {name: (cwd, command.result(120)) for name, (cwd, command) in started.items()}


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_message(ran, overrides: list[str], expected: list[str]) -> None:
    cwd, result = ran[" ".join(overrides)]
    assert_user_error(result, expected)
    assert not (cwd / "mlflow.db").exists()  # failed before a run was opened
    if (overrides, expected) in RUN_ERRORS:  # raised inside the job: exactly one line, no Hydra frame
        assert len(said(result)) == 1, result.stderr


def test_a_user_error_in_a_sweeps_job_is_one_line(ran) -> None:
    _, result = ran["in a sweep's job"]
    assert_user_error(result, ["model.conv1_out=0"])
    assert len(said(result)) == 1, result.stderr


def test_resume_of_nothing_is_one_line_and_records_nothing(ran) -> None:
    cwd, result = ran["resume of nothing"]
    assert_user_error(result, ["resume=abc: neither a checkpoint file nor a run"])
    assert len(said(result)) == 1, result.stderr
    store = cwd / "mlflow.db"
    if store.exists():  # looking the run up may create the store; it holds no run
        with sqlite3.connect(store) as db:
            assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_a_batch_larger_than_the_data_is_the_whole_set(ran) -> None:
    """A huge value that is not an error: the run trains and finishes, and says what it did."""
    _, result = ran["batch larger than the data"]
    assert result.returncode == 0, result.stderr
    # 20 generated, 2 of them held out for validation (dataset.val_size's default tenth)
    assert "larger than the 18 training images: every epoch is one batch of 18" in result.stdout
    assert "Accuracy of the network on the 10 test images" in result.stdout


def test_missing_imagefolder_names_the_path(ran) -> None:
    cwd, result = ran["missing imagefolder"]
    assert_user_error(result, [str(cwd / "nothing" / "train"), "train/<class>/", "test/<class>/"])


def test_missing_cifar10_names_the_path_and_remedies(ran) -> None:
    cwd, result = ran["missing cifar10"]
    assert_user_error(result, [str(cwd / "empty"), "dataset.download=true", "cifar-10-python.tar.gz"])


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present, so device=cuda is valid")
def test_cuda_without_a_gpu(ran) -> None:
    _, result = ran["cuda without a gpu"]
    assert_user_error(result, ["device=cuda", "device=cpu"])


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("full error at compose time", ["trainer.epochs"]),
        ("full error in the run", ["UserError", "trainer.batch_size=-1"]),
    ],
    ids=["at compose time", "in the run"],
)
def test_full_error_shows_the_traceback(ran, name: str, said: list[str]) -> None:
    _, result = ran[name]
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    for text in said:
        assert text in result.stderr, result.stderr
