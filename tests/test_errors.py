"""Bad input ends in a message that names what to fix and a non-zero exit, not a traceback
(HYDRA_FULL_ERROR=1 brings the traceback back). Mistakes in the config fail at compose time,
before torch is imported; the others fail before any training or MLflow run starts.

Each mistake goes through the front door's own code in this process (cifar_exp.__main__.hydra_main:
Hydra's command line, compose, the task, the one-line report); one runs as a real command, to show
the exit status and the single line a user sees. Every key's bad values, in-process:
tests/test_bad_values.py; the messages of validation.validate: tests/test_config.py."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch
from conftest import Ended, run_cli
from hydra.errors import ConfigCompositionException

from cifar_exp.errors import UserError

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
BAD_VALUES = COMPOSE_ERRORS + RUN_ERRORS
NO_GPU = not torch.cuda.is_available()


def assert_user_error(result: Ended | CompletedProcess[str], expected: list[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr}"
    assert "Accuracy of the network" not in result.stdout


def said(stderr: str) -> list[str]:
    """What the command said on stderr, without MLflow's own start-up lines as it creates a store."""
    return [line for line in stderr.splitlines() if line.strip() and " INFO mlflow." not in line]


def test_a_bad_value_is_one_line_and_exit_1_and_records_nothing(tmp_path: Path) -> None:
    """The one mistake run as a real command: what the user's terminal and shell see."""
    result = run_cli(*TINY, "optimizer.lr=-1", cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout
    assert said(result.stderr) == ["optimizer.lr=-1.0: must be > 0"], result.stderr
    assert "Accuracy of the network" not in result.stdout
    assert not (tmp_path / "mlflow.db").exists()  # the store is the test's: tmp_path/mlflow.db


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_message(
    main_in_process, tmp_path: Path, overrides: list[str], expected: list[str]
) -> None:
    result = main_in_process(*TINY, *overrides)
    assert_user_error(result, expected)
    assert result.returncode == 1
    assert not (tmp_path / "mlflow.db").exists()  # failed before a run was opened
    if (overrides, expected) in RUN_ERRORS:  # raised inside the job: exactly one line, no Hydra frame
        assert len(said(result.stderr)) == 1, result.stderr


def test_a_user_error_in_a_sweeps_job_is_one_line(main_in_process) -> None:
    result = main_in_process(*TINY, "model.conv1_out=0", "mlflow.enabled=false", "-m")
    assert_user_error(result, ["model.conv1_out=0"])
    assert len(said(result.stderr)) == 1, result.stderr


def test_resume_of_nothing_is_one_line_and_records_nothing(
    main_in_process, empty_store_file: Path, tmp_path: Path
) -> None:
    store = tmp_path / "mlflow.db"  # the test's store, where the run is looked up: made, with no run
    shutil.copy(empty_store_file, store)
    result = main_in_process(*TINY, "resume=abc")
    assert_user_error(result, ["resume=abc: neither a checkpoint file nor a run"])
    assert len(said(result.stderr)) == 1, result.stderr
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_a_batch_larger_than_the_data_is_the_whole_set(main_in_process) -> None:
    """A huge value that is not an error: the run trains and finishes, and says what it did."""
    result = main_in_process(*TINY, "trainer.batch_size=1000000000", "mlflow.enabled=false")
    assert result.returncode == 0, result.stderr
    # 20 generated, 2 of them held out for validation (dataset.val_size's default tenth)
    assert "larger than the 18 training images: every epoch is one batch of 18" in result.stdout
    assert "Accuracy of the network on the 10 test images" in result.stdout


def test_missing_imagefolder_names_the_path(main_in_process, tmp_path: Path) -> None:
    result = main_in_process("dataset=imagefolder", "dataset.root=nothing")
    assert_user_error(result, [str(tmp_path / "nothing" / "train"), "train/<class>/", "test/<class>/"])


def test_missing_cifar10_names_the_path_and_remedies(main_in_process, tmp_path: Path) -> None:
    result = main_in_process(
        "dataset=cifar10", "dataset.root=empty", "dataset.download=false", "dataset.fallback=false"
    )
    assert_user_error(result, [str(tmp_path / "empty"), "dataset.download=true", "cifar-10-python.tar.gz"])


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present, so device=cuda is valid")
def test_cuda_without_a_gpu(main_in_process) -> None:
    assert_user_error(main_in_process(*TINY, "device=cuda"), ["device=cuda", "device=cpu"])


@pytest.mark.parametrize(
    ("overrides", "raised", "said"),
    [
        (["trainer.epochs=two"], ConfigCompositionException, "trainer.epochs"),
        (["trainer.batch_size=-1"], UserError, "trainer.batch_size=-1"),
    ],
    ids=["at compose time", "in the run"],
)
def test_full_error_shows_the_traceback(
    main_in_process, monkeypatch: pytest.MonkeyPatch, overrides: list[str], raised: type, said: str
) -> None:
    """HYDRA_FULL_ERROR=1: the error is raised, not reported, so Python prints its traceback."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(raised) as excinfo:
        main_in_process(*TINY, *overrides)
    assert said in f"{excinfo.value} {excinfo.value.__cause__}"
