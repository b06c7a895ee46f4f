"""Bad input ends in a message that names what to fix and a non-zero exit, not a traceback
(HYDRA_FULL_ERROR=1 brings the traceback back). Mistakes in the config fail at compose time,
before torch is imported; the others fail before any training or MLflow run starts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

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
HYDRA_FRAME = ("Error executing job with overrides:", "Set the environment variable HYDRA_FULL_ERROR=1")


def assert_user_error(result, expected: list[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr}"
    assert "Accuracy of the network" not in result.stdout


@pytest.mark.parametrize(
    ("overrides", "expected"),
    COMPOSE_ERRORS + RUN_ERRORS,
    ids=[" ".join(o) for o, _ in COMPOSE_ERRORS + RUN_ERRORS],
)
def test_bad_value_is_one_message(run_cli, tmp_path: Path, overrides: list[str], expected: list[str]) -> None:
    result = run_cli(*TINY, *overrides, cwd=tmp_path, timeout=60)
    assert_user_error(result, expected)
    assert not (tmp_path / "mlflow.db").exists()  # failed before a run was opened
    if (overrides, expected) in RUN_ERRORS:  # ours, not Hydra's compose messages: exactly one line
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len([line for line in lines if not line.startswith(HYDRA_FRAME)]) == 1, result.stderr


def test_resume_of_nothing_is_one_line_and_records_nothing(run_cli, tmp_path: Path) -> None:
    result = run_cli(*TINY, "resume=abc", cwd=tmp_path, timeout=60)
    assert_user_error(result, ["resume=abc: neither a checkpoint file nor a run"])
    store = tmp_path / "mlflow.db"
    if store.exists():  # looking the run up may create the store; it holds no run
        with sqlite3.connect(store) as db:
            assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_a_batch_larger_than_the_data_is_the_whole_set(run_cli, tmp_path: Path) -> None:
    """A huge value that is not an error: the run trains and finishes, and says what it did."""
    result = run_cli(
        *TINY, "trainer.batch_size=1000000000", "mlflow.enabled=false", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "larger than the 20 training images: every epoch is one batch of 20" in result.stdout
    assert "Accuracy of the network on the 10 test images" in result.stdout


def test_missing_imagefolder_names_the_path(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    result = run_cli("dataset=imagefolder", f"dataset.root={root}", cwd=tmp_path, timeout=60)
    assert_user_error(result, [str(root / "train"), "train/<class>/", "test/<class>/"])


def test_missing_cifar10_names_the_path_and_remedies(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "empty"
    result = run_cli(
        "dataset=cifar10",
        f"dataset.root={root}",
        "dataset.download=false",
        "dataset.fallback=false",  # a script that must never train on the bundled sample
        cwd=tmp_path,
        timeout=60,
    )
    assert_user_error(result, [str(root), "dataset.download=true", "cifar-10-python.tar.gz"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so device=cuda is valid")
def test_cuda_without_a_gpu(run_cli, tmp_path: Path) -> None:
    result = run_cli(*TINY, "device=cuda", cwd=tmp_path, timeout=60)
    assert_user_error(result, ["device=cuda", "device=cpu"])


def test_full_error_shows_the_traceback(run_cli, tmp_path: Path) -> None:
    result = run_cli(*TINY, "trainer.epochs=two", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}, timeout=60)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "trainer.epochs" in result.stderr


def test_full_error_shows_the_traceback_of_a_run_error(run_cli, tmp_path: Path) -> None:
    result = run_cli(*TINY, "trainer.batch_size=-1", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}, timeout=60)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "UserError" in result.stderr and "trainer.batch_size=-1" in result.stderr
