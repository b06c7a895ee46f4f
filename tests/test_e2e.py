"""The whole program, end to end, on generated data: what a user sees after `python -m cifar_exp`.
Commands run in temporary folders (Hydra writes outputs/ and multirun/ there) in this process
through the front door's own code (conftest's main_in_process), with tracking off but for a fresh
clone offline on the bundled sample, whose run records the data it fell back to. (One tracked
run's output, and that tracking leaves its numbers alone, are tests/test_tracking.py's.)
Hydra's job logging (loss lines, epoch summaries) goes to stdout, as do the report's prints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CIFAR10_CLASSES,
    CIFAR_PER_BATCH,
    LOSS,
    PER_CLASS,
    SYNTHETIC_CLASSES,
    TOTAL,
    Ended,
    accuracy_report,
    synthetic,
)

from cifar_exp.run import report, run

UNTRACKED = "mlflow.enabled=false"
# Small enough that the three runs below take a second or two each in this process.
SMALL = [
    *synthetic(train=100, test=50, epochs=1, batch=32, log_every=4),
    "optimizer=adam",
    "optimizer.lr=0.01",
]


def clean_exit(result: Ended) -> Ended:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_sweep_runs_every_job(main_in_process, tmp_path: Path) -> None:
    # Tracking off: the sweep's MLflow parent run and summary are tests/test_scale_out.py's.
    result = clean_exit(main_in_process(*SMALL, UNTRACKED, "model.conv1_out=4,8", "-m"))
    assert len(TOTAL.findall(result.stdout)) == 2
    assert all(n == "50" for n, _ in TOTAL.findall(result.stdout))
    assert len(PER_CLASS.findall(result.stdout)) == 2 * 10
    jobs = sorted(tmp_path.glob("multirun/*/*/[0-9]*/.hydra/config.yaml"))
    assert [yaml.safe_load(p.read_text())["model"]["conv1_out"] for p in jobs] == [4, 8]


def test_tutorial_experiment_runs(main_in_process, tmp_path: Path) -> None:
    # The tutorial's own batch size, learning rate and logging interval; tiny data, one epoch.
    tutorial = ["experiment=tutorial", "dataset=synthetic", "dataset.train_size=200", "dataset.test_size=50"]
    result = clean_exit(main_in_process(*tutorial, "trainer.epochs=1", UNTRACKED))
    n_test, _, per_class = accuracy_report(result.stdout)
    assert n_test == 50 and list(per_class) == SYNTHETIC_CLASSES
    assert not LOSS.findall(result.stdout)  # 50 steps of 4 images: no 2000-step window completes
    (snapshot,) = tmp_path.glob("outputs/*/*/.hydra/config.yaml")
    cfg = yaml.safe_load(snapshot.read_text())
    assert cfg["trainer"]["batch_size"] == 4 and cfg["trainer"]["epochs"] == 1
    assert cfg["optimizer"]["lr"] == 0.001 and cfg["optimizer"]["momentum"] == 0.9


def test_imagefolder_run(main_in_process, png_folder) -> None:
    result = clean_exit(
        main_in_process(
            "dataset=imagefolder",
            f"dataset.root={png_folder.root}",
            "trainer.epochs=5",
            "trainer.batch_size=8",
            "optimizer=adam",
            "optimizer.lr=0.01",
            UNTRACKED,
        )
    )
    n_test, overall, per_class = accuracy_report(result.stdout)
    assert n_test == 3 * 4
    assert list(per_class) == png_folder.classes
    assert overall > 34  # chance is 33 %: three clearly coloured classes


def test_cifar10_run_in_process(
    compose_config, cifar_folder, skip_cifar_md5, fresh_data_cache, capsys
) -> None:
    """dataset=cifar10 on the real pickle format (in-process: the md5 patch lives here)."""
    cfg = compose_config(
        "dataset=cifar10",
        f"dataset.root={cifar_folder.root}",
        "dataset.download=false",
        "trainer.epochs=1",
        "trainer.batch_size=10",
        "mlflow.enabled=false",
    )
    metrics = run(cfg)

    n_test, overall, per_class = accuracy_report(capsys.readouterr().out)
    assert n_test == CIFAR_PER_BATCH
    assert list(per_class) == cifar_folder.classes
    assert 0 <= metrics["test/acc"] <= 1
    assert overall == pytest.approx(100 * metrics["test/acc"], abs=1)  # exact: see the report test
    assert set(metrics) >= {"train/loss_epoch", "test/loss", "test/acc"}
    assert {f"test/acc/{c}" for c in cifar_folder.classes} <= set(metrics)


def test_offline_clone_trains_on_the_bundled_sample(
    main_in_process, fresh_data_cache, tmp_path: Path, mlflow_store: str
) -> None:
    """A fresh clone offline: no data/, so the default dataset falls back to the CIFAR-10 sample
    with one warning line, the report and the MLflow run say so, and a short recipe still clearly
    beats chance (10 %). (In this process, data cache emptied: what a fresh process would load.)"""
    result = clean_exit(
        main_in_process(
            "experiment=tutorial_fast",
            "trainer.batch_size=32",  # 2 epochs of 157 steps on the 5,000 images: about 39 %
            "dataset.download=false",  # offline even where there is a network
            "device=cpu",
        )
    )
    (warning,) = [
        line for line in result.stdout.splitlines() if "not found" in line and "Trained" not in line
    ]
    assert f"CIFAR-10 not found under {tmp_path / 'data'}" in warning and "sample" in warning
    n_test, overall, per_class = accuracy_report(result.stdout)
    assert n_test == 1000 and list(per_class) == CIFAR10_CLASSES
    assert overall > 30
    last = result.stdout.split("Accuracy of truck")[1]
    assert "Trained on the bundled CIFAR-10 sample" in last and str(tmp_path / "data") in last
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    assert run.data.params["data"] == "cifar10_sample"
    assert run.data.tags["data"] == f"cifar10_sample (fallback: CIFAR-10 not found under {tmp_path / 'data'})"


# The report is computed from counts like the tutorial (100 * correct // total): a float32
# fraction such as 0.8999999762 must not print as 89 %.
def test_report_prints_exact_percentages(capsys) -> None:
    from cifar_exp.train import evaluate

    classes = ["a", "b"]
    labels = torch.tensor([0] * 10 + [1] * 90)
    predictions = labels.clone()
    predictions[0] = 1  # a: 9 of 10 right
    predictions[10:20] = 0  # b: 80 of 90 right; overall 89 of 100
    model = torch.nn.Identity()
    logits = torch.nn.functional.one_hot(predictions, 2).float()
    _, confusion = evaluate(model, logits, labels, classes, batch_size=64)

    report(confusion, classes)

    out = capsys.readouterr().out
    assert "Accuracy of the network on the 100 test images: 89 %" in out
    assert "Accuracy of     a : 90 %" in out
    assert "Accuracy of     b : 88 %" in out  # 80/90 = 88.9 %, floored like the tutorial
