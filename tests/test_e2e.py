"""The whole program, end to end, on generated data: what a user sees after `python -m cifar_exp`.
Subprocesses run in tmp_path (Hydra writes outputs/ and multirun/ there) and track into a
temporary MLflow store. Hydra's job logging (loss lines, epoch summaries) goes to stdout, as do
the report's prints; MLflow's own notices go to stderr."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch
import yaml
from conftest import CIFAR_PER_BATCH, SYNTHETIC_CLASSES, Command, Store, ok, start_cli, synthetic

from cifar_exp.run import report, run

SMALL = [
    *synthetic(train=500, test=200, epochs=1, batch=32, log_every=4),  # on CPU: bitwise repeatable
    "optimizer=adam",
    "optimizer.lr=0.01",
]
UNTRACKED = "mlflow.enabled=false"

TOTAL = re.compile(r"^Accuracy of the network on the (\d+) test images: (\d+) %$", re.M)
PER_CLASS = re.compile(r"^Accuracy of\s+(\S+) :\s+(\d+) %$", re.M)
LOSS = re.compile(r"^\[\d+,\s+\d+\] loss: \d+\.\d+$", re.M)
EPOCH = re.compile(r"^epoch \d+/\d+: train loss [\d.]+, test loss [\d.]+, test acc [\d.]+%", re.M)


def accuracy_report(stdout: str) -> tuple[int, int, dict[str, int]]:
    """(test images, overall %, {class: %}) from the closing report; exactly one report."""
    totals = TOTAL.findall(stdout)
    assert len(totals) == 1, stdout
    per_class = {name: int(acc) for name, acc in PER_CLASS.findall(stdout)}
    return int(totals[0][0]), int(totals[0][1]), per_class


def clean_exit(command: Command) -> CompletedProcess[str]:
    result = ok(command.result())
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def launched(new_store, png_folder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Command]]:
    """Every command of this file, each in a folder of its own, started together so that they share
    the cores. Only the first tracks (into a store it creates): the MLflow side is test_tracking.py's."""

    def folder(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    sweep_sizes = [o for o in SMALL if not o.startswith("dataset.t")] + [
        "dataset.train_size=100",
        "dataset.test_size=50",
    ]
    # The tutorial's own batch size, learning rate and logging interval; tiny data, one epoch.
    tutorial = ["experiment=tutorial", "dataset=synthetic", "dataset.train_size=200", "dataset.test_size=50"]
    started = {
        "synthetic": new_store("synthetic_run", created=False).start_cli(*SMALL),
        "same_seed": start_cli(*SMALL, UNTRACKED, cwd=folder("same_seed")),
        "other_seed": start_cli(*SMALL, "seed=1", UNTRACKED, cwd=folder("other_seed")),
        "sweep": start_cli(*sweep_sizes, UNTRACKED, "model.conv1_out=4,8", "-m", cwd=folder("sweep")),
        "tutorial": start_cli(*tutorial, "trainer.epochs=1", UNTRACKED, cwd=folder("tutorial")),
        "imagefolder": start_cli(
            "dataset=imagefolder",
            f"dataset.root={png_folder.root}",
            "trainer.epochs=5",
            "trainer.batch_size=8",
            "optimizer=adam",
            "optimizer.lr=0.01",
            UNTRACKED,
            cwd=folder("imagefolder"),
        ),
    }
    yield started
    for command in started.values():
        command.stop()


def test_synthetic_run_reports_accuracy_above_chance(launched) -> None:
    result = clean_exit(launched["synthetic"])
    assert "Accuracy of the network on the 200 test images:" in result.stdout
    n_test, overall, per_class = accuracy_report(result.stdout)
    assert n_test == 200
    assert list(per_class) == SYNTHETIC_CLASSES  # one line per class, in class order
    assert all(0 <= acc <= 100 for acc in per_class.values())
    assert overall > 50  # chance is 10 %; this data is learnt within one epoch
    assert len(LOSS.findall(result.stdout)) == 4  # 16 steps, a line every 4
    assert len(EPOCH.findall(result.stdout)) == 1


def test_synthetic_run_tracks_into_the_temporary_store(launched) -> None:
    """The MLflow side (params, metrics, artifacts) is tests/test_tracking.py's."""
    command = launched["synthetic"]
    result = clean_exit(command)
    root = command.cwd.parent  # the store's folder, which had no store
    store = Store(f"sqlite:///{root / 'mlflow.db'}")
    assert re.search(rf"^MLflow run [0-9a-f]{{32}} .* in {re.escape(store.uri)}$", result.stdout, re.M)
    assert (root / "mlflow.db").is_file()
    assert (root / "artifacts").is_dir()  # artifacts beside the SQLite store
    (snapshot,) = command.cwd.glob("outputs/*/*/.hydra/config.yaml")  # Hydra's snapshot, in the cwd
    assert yaml.safe_load(snapshot.read_text())["dataset"]["train_size"] == 500


def test_same_seed_same_numbers(launched) -> None:
    """Run again (without tracking, which must not touch the random streams either)."""
    first, second = clean_exit(launched["synthetic"]), clean_exit(launched["same_seed"])

    def numbers(stdout: str) -> list[str]:
        """Loss lines, epoch summaries without their throughput, the report."""
        lines = LOSS.findall(stdout) + EPOCH.findall(stdout)
        return lines + TOTAL.findall(stdout) + PER_CLASS.findall(stdout)

    assert len(LOSS.findall(first.stdout)) == 4
    assert numbers(first.stdout) == numbers(second.stdout)

    other_seed = clean_exit(launched["other_seed"])
    assert LOSS.findall(other_seed.stdout) != LOSS.findall(first.stdout)


def test_sweep_runs_every_job(launched) -> None:
    # Tracking off: the sweep's MLflow parent run and summary are tests/test_scale_out.py's.
    command = launched["sweep"]
    result = clean_exit(command)
    assert len(TOTAL.findall(result.stdout)) == 2
    assert all(n == "50" for n, _ in TOTAL.findall(result.stdout))
    assert len(PER_CLASS.findall(result.stdout)) == 2 * 10
    jobs = sorted(command.cwd.glob("multirun/*/*/[0-9]*/.hydra/config.yaml"))
    assert [yaml.safe_load(p.read_text())["model"]["conv1_out"] for p in jobs] == [4, 8]


def test_tutorial_experiment_runs(launched) -> None:
    command = launched["tutorial"]
    result = clean_exit(command)
    n_test, _, per_class = accuracy_report(result.stdout)
    assert n_test == 50 and list(per_class) == SYNTHETIC_CLASSES
    assert not LOSS.findall(result.stdout)  # 50 steps of 4 images: no 2000-step window completes
    (snapshot,) = command.cwd.glob("outputs/*/*/.hydra/config.yaml")
    cfg = yaml.safe_load(snapshot.read_text())
    assert cfg["trainer"]["batch_size"] == 4 and cfg["trainer"]["epochs"] == 1
    assert cfg["optimizer"]["lr"] == 0.001 and cfg["optimizer"]["momentum"] == 0.9


def test_imagefolder_run(launched, png_folder) -> None:
    result = clean_exit(launched["imagefolder"])
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
