"""The whole program, end to end, on generated data: what a user sees after `python -m cifar_exp`.
Subprocesses run in tmp_path (Hydra writes outputs/ and multirun/ there) and track into a
temporary MLflow store. Hydra's job logging (loss lines, epoch summaries) goes to stdout, as do
the report's prints; MLflow's own notices go to stderr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CIFAR10_CLASSES, CIFAR_PER_BATCH, run_cli

from cifar_exp.run import report, run

SMALL = (
    "dataset=synthetic",
    "dataset.train_size=500",
    "dataset.test_size=200",
    "trainer.epochs=1",
    "trainer.batch_size=32",
    "trainer.log_every_n_steps=4",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "device=cpu",  # bitwise-repeatable runs: no GPU kernels that pick algorithms at run time
)
SYNTHETIC_CLASSES = [f"class_{i}" for i in range(10)]

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


def assert_clean_exit(result) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory):
    """One small synthetic run, shared by the tests that read its output."""
    cwd = tmp_path_factory.mktemp("synthetic_run")
    store = f"sqlite:///{cwd}/mlflow.db"
    result = run_cli(*SMALL, cwd=cwd, env={"MLFLOW_TRACKING_URI": store})
    return result, cwd, store


def test_synthetic_run_reports_accuracy_above_chance(synthetic_run) -> None:
    result, _, _ = synthetic_run
    assert_clean_exit(result)
    assert "Accuracy of the network on the 200 test images:" in result.stdout
    n_test, overall, per_class = accuracy_report(result.stdout)
    assert n_test == 200
    assert list(per_class) == SYNTHETIC_CLASSES  # one line per class, in class order
    assert all(0 <= acc <= 100 for acc in per_class.values())
    assert overall > 50  # chance is 10 %; this data is learnt within one epoch
    assert len(LOSS.findall(result.stdout)) == 4  # 16 steps, a line every 4
    assert len(EPOCH.findall(result.stdout)) == 1


def test_synthetic_run_tracks_into_the_temporary_store(synthetic_run) -> None:
    """The MLflow side (params, metrics, artifacts) is tests/test_tracking.py's."""
    result, cwd, store = synthetic_run
    assert_clean_exit(result)
    assert re.search(rf"^MLflow run [0-9a-f]{{32}} .* in {re.escape(store)}$", result.stdout, re.M)
    assert (cwd / "mlflow.db").is_file()
    assert (cwd / "artifacts").is_dir()  # artifacts beside the SQLite store
    (snapshot,) = cwd.glob("outputs/*/*/.hydra/config.yaml")  # Hydra's snapshot, in the cwd
    assert yaml.safe_load(snapshot.read_text())["dataset"]["train_size"] == 500


def test_same_seed_same_numbers(synthetic_run, tmp_path: Path) -> None:
    """Run again (without tracking, which must not touch the random streams either)."""
    first, _, _ = synthetic_run
    second = run_cli(*SMALL, "mlflow.enabled=false", cwd=tmp_path)
    assert_clean_exit(first)
    assert_clean_exit(second)

    def numbers(stdout: str) -> list[str]:
        """Loss lines, epoch summaries without their throughput, the report."""
        lines = LOSS.findall(stdout) + EPOCH.findall(stdout)
        return lines + TOTAL.findall(stdout) + PER_CLASS.findall(stdout)

    assert len(LOSS.findall(first.stdout)) == 4
    assert numbers(first.stdout) == numbers(second.stdout)

    other_seed = run_cli(*SMALL, "seed=1", "mlflow.enabled=false", cwd=tmp_path)
    assert_clean_exit(other_seed)
    assert LOSS.findall(other_seed.stdout) != LOSS.findall(first.stdout)


def test_sweep_runs_every_job(tmp_path: Path) -> None:
    small = [o for o in SMALL if not o.startswith("dataset.t")]
    sizes = ("dataset.train_size=100", "dataset.test_size=50")
    # Tracking off: the sweep's MLflow parent run and summary are tests/test_tracking.py's.
    result = run_cli(*small, *sizes, "mlflow.enabled=false", "model.conv1_out=4,8", "-m", cwd=tmp_path)
    assert_clean_exit(result)
    assert len(TOTAL.findall(result.stdout)) == 2
    assert all(n == "50" for n, _ in TOTAL.findall(result.stdout))
    assert len(PER_CLASS.findall(result.stdout)) == 2 * 10
    jobs = sorted(tmp_path.glob("multirun/*/*/[0-9]*/.hydra/config.yaml"))
    assert [yaml.safe_load(p.read_text())["model"]["conv1_out"] for p in jobs] == [4, 8]


def test_tutorial_experiment_runs(tmp_path: Path) -> None:
    result = run_cli(
        "experiment=tutorial",
        "dataset=synthetic",
        "dataset.train_size=200",
        "dataset.test_size=50",
        "trainer.epochs=1",
        "mlflow.enabled=false",
        cwd=tmp_path,
    )
    assert_clean_exit(result)
    n_test, _, per_class = accuracy_report(result.stdout)
    assert n_test == 50 and list(per_class) == SYNTHETIC_CLASSES
    assert not LOSS.findall(result.stdout)  # 50 steps of 4 images: no 2000-step window completes
    (snapshot,) = tmp_path.glob("outputs/*/*/.hydra/config.yaml")
    cfg = yaml.safe_load(snapshot.read_text())
    assert cfg["trainer"]["batch_size"] == 4 and cfg["trainer"]["epochs"] == 1
    assert cfg["optimizer"]["lr"] == 0.001 and cfg["optimizer"]["momentum"] == 0.9


def test_imagefolder_run(png_folder, tmp_path: Path) -> None:
    result = run_cli(
        "dataset=imagefolder",
        f"dataset.root={png_folder.root}",
        "trainer.epochs=5",
        "trainer.batch_size=8",
        "optimizer=adam",
        "optimizer.lr=0.01",
        "mlflow.enabled=false",
        cwd=tmp_path,
    )
    assert_clean_exit(result)
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


def test_offline_clone_trains_on_the_bundled_sample(tmp_path: Path, mlflow_store: str) -> None:
    """A fresh clone offline: no data/, so the default dataset falls back to the CIFAR-10 sample
    with one warning line, the report and the MLflow run say so, and a short recipe still clearly
    beats chance (10 %)."""
    result = run_cli(
        "experiment=tutorial_fast",
        "trainer.batch_size=32",  # 2 epochs of 157 steps on the 5,000 images: about 39 %
        "dataset.download=false",  # offline even where there is a network
        "device=cpu",
        cwd=tmp_path,
    )
    assert_clean_exit(result)
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
