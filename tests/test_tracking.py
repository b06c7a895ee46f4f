"""What a tracked run prints and what MLflow records, read back the way a user would: one run (and
that tracking leaves its numbers alone), `rerun`, `predict`, and a sweep with a failing job.
(A sweep's parent run, children and summary: test_scale_out.py, through a tracking server. Runs
stopped by SIGTERM or Ctrl-C: test_reliability.py.)

Every command runs in this process through the front door's own code (conftest's main_in_process
and run_in_process) from a temporary folder against its own temporary SQLite store."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import (
    EPOCH,
    FIGURES,
    LOSS,
    PER_CLASS,
    PNG,
    REPO,
    RUN_ARTIFACTS,
    SYNTHETIC_CLASSES,
    TOTAL,
    Ended,
    Store,
    Sweep,
    accuracy_report,
    run_in_process,
    synthetic,
)
from omegaconf import OmegaConf

# 320 training images (and 40 held out for validation) in batches of 32: 10 steps per epoch, so
# the 5-step loss windows end at the global steps 5, 10, 15, 20 and the epochs at steps 10 and 20.
TRAIN_SIZE, VAL_SIZE, TEST_SIZE, BATCH, LOG_EVERY, EPOCHS = 320, 40, 100, 32, 5, 2
STEPS_PER_EPOCH = TRAIN_SIZE // BATCH
SMALL = synthetic(
    train=TRAIN_SIZE, val=VAL_SIZE, test=TEST_SIZE, epochs=EPOCHS, batch=BATCH, log_every=LOG_EVERY
)
SINGLE = [*SMALL, "model.conv1_out=8", "optimizer=adam", "optimizer.lr=0.01"]  # learns in an epoch
# lr 1e6 makes the training loss non-finite within a few steps, after the job's run has opened.
# The loss is logged every step, so the finite ones before it are recorded.
FAILING_SWEEP = [
    *synthetic(train=TRAIN_SIZE, test=TEST_SIZE, epochs=EPOCHS, batch=BATCH, log_every=1),
    "optimizer.lr=0.01,1e6",
    "-m",
]

UNTRACKED = "mlflow.enabled=false"

EPOCH_METRICS = ["train/loss_epoch", "val/loss", "val/acc", "time/epoch_s", "throughput/images_per_s"]
CLASSES = SYNTHETIC_CLASSES


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested dict as a dotted key (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resolved(compose_config, overrides: list[str]) -> dict[str, Any]:
    """What these overrides compose to, resolved, by Hydra's compose API in this process."""
    return OmegaConf.to_container(compose_config(*overrides), resolve=True)


# ---------------------------------------------------------------- one run
@dataclass
class Recorded:
    store: Store
    result: Ended
    run: Any


@pytest.fixture(scope="module")
def single(new_store) -> Recorded:
    """The one run, into a folder with no store yet, in this process (conftest's run_in_process:
    a tracked run as a real process is test_progress.py's and test_reliability.py's)."""
    store = new_store("single", created=False)
    result = run_in_process(*SINGLE, cwd=store.cwd, env={"MLFLOW_TRACKING_URI": store.uri})
    assert result.returncode == 0, result.stdout + result.stderr
    runs = store.runs()
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return Recorded(store, result, runs[0])


def test_run_finishes_named_after_its_overrides(single: Recorded) -> None:
    info = single.run.info
    assert info.status == "FINISHED"
    assert info.end_time is not None
    assert "conv1_out=8" in info.run_name
    assert "lr=0.01" in info.run_name


def test_run_prints_the_tutorials_report(single: Recorded) -> None:
    stdout = single.result.stdout
    n_test, overall, per_class = accuracy_report(stdout)
    assert n_test == TEST_SIZE
    assert list(per_class) == CLASSES  # one line per class, in class order
    assert all(0 <= acc <= 100 for acc in per_class.values())
    assert overall > 50  # chance is 10 %; this data is learnt within an epoch
    assert len(LOSS.findall(stdout)) == EPOCHS * STEPS_PER_EPOCH // LOG_EVERY
    assert len(EPOCH.findall(stdout)) == EPOCHS
    assert "Traceback" not in single.result.stderr


def test_tracking_leaves_the_numbers_alone(single: Recorded, main_in_process) -> None:
    """The same run untracked prints the same numbers; another seed, others. (Both in this
    process: the numbers do not depend on which process computes them.)"""

    def numbers(stdout: str) -> list[str]:
        """Loss lines, epoch summaries without their throughput, the report."""
        lines = LOSS.findall(stdout) + EPOCH.findall(stdout)
        return lines + TOTAL.findall(stdout) + PER_CLASS.findall(stdout)

    untracked = main_in_process(*SINGLE, UNTRACKED)
    assert untracked.returncode == 0, untracked.stderr
    assert LOSS.findall(single.result.stdout)
    assert numbers(untracked.stdout) == numbers(single.result.stdout)
    other_seed = main_in_process(*SINGLE, "seed=1", UNTRACKED)
    assert other_seed.returncode == 0, other_seed.stderr
    assert LOSS.findall(other_seed.stdout) != LOSS.findall(single.result.stdout)


def test_run_goes_to_the_store_the_env_names(single: Recorded) -> None:
    """It created the store (the folder had none) and keeps its artifacts beside it."""
    store_line = rf"^MLflow run {single.run.info.run_id} .* in {re.escape(single.store.uri)}$"
    assert re.search(store_line, single.result.stdout, re.M), single.result.stdout
    assert (single.store.root / "mlflow.db").is_file()
    artifacts = single.store.root / "artifacts"
    assert single.run.info.artifact_uri.startswith(artifacts.as_uri())
    assert (artifacts / single.run.info.run_id).is_dir()
    assert not (single.store.cwd / "mlruns").exists()


def test_store_is_the_override_else_the_env_else_the_project_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cifar_exp.config import TrackingConfig
    from cifar_exp.tracking.store import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////from/env.db")
    assert tracking_uri(TrackingConfig()) == "sqlite:////from/env.db"
    assert tracking_uri(TrackingConfig(tracking_uri="sqlite:////from/cfg.db")) == "sqlite:////from/cfg.db"


def test_params_are_every_leaf_of_the_resolved_config(single: Recorded, compose_config) -> None:
    expected = leaves(resolved(compose_config, SINGLE))
    params = single.run.data.params
    split = {"split/val_images", "split/split_seed", "split/val_index_sha256"}  # which images it held out
    assert set(params) == set(expected) | {"data"} | split  # and which data really trained it
    assert params["data"] == "synthetic" and single.run.data.tags["data"] == "synthetic"
    assert params["split/val_images"] == str(VAL_SIZE) and params["split/split_seed"] == "0"
    for key, value in expected.items():
        if isinstance(value, list):
            assert json.loads(params[key]) == value, key
        else:
            assert params[key] == str(value), key
    assert params["model.conv1_out"] == "8"
    assert params["optimizer.lr"] == "0.01"
    assert params["trainer.batch_size"] == str(BATCH)
    assert params["dataset.train_size"] == str(TRAIN_SIZE + VAL_SIZE)
    assert params["seed"] == "0"


def test_tags_record_overrides_git_and_device(single: Recorded) -> None:
    tags = single.run.data.tags
    assert json.loads(tags["overrides"]) == SINGLE
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["git_commit"] == head
    assert tags["git_dirty"] in ("True", "False")
    output_dir = single.store.cwd / tags["hydra_output_dir"]  # relative to where it ran, or absolute
    assert output_dir.resolve().is_relative_to(single.store.cwd.resolve())
    assert (output_dir / ".hydra" / "config.yaml").is_file()
    assert tags["device"] == "cpu"
    assert tags["gpus"] == "0"


def test_metrics_are_logged_at_global_steps(single: Recorded) -> None:
    store, run_id = single.store, single.run.info.run_id
    train_loss = store.history(run_id, "train/loss")
    assert [step for step, _ in train_loss] == list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))
    epoch_ends = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
    per_class = [f"test/acc/{name}" for name in CLASSES]
    for key in EPOCH_METRICS:  # every epoch: the validation split
        values = store.history(run_id, key)
        assert [step for step, _ in values] == epoch_ends, key
        assert all(math.isfinite(value) for _, value in values), key
    for key in ["test/acc", "test/loss", *per_class]:  # the test split once, at the end
        assert [step for step, _ in store.history(run_id, key)] == epoch_ends[-1:], key
    for key in ["val/acc", "test/acc", *per_class]:
        assert all(0 <= value <= 1 for _, value in store.history(run_id, key)), key
    for key in ["val/loss", "test/loss", "time/epoch_s", "throughput/images_per_s"]:
        assert all(value > 0 for _, value in store.history(run_id, key)), key
    assert all(value > 0 for _, value in train_loss)
    # The synthetic test set holds as many images of each class: accuracy is the per-class mean.
    final = single.run.data.metrics
    assert final["test/acc"] == pytest.approx(sum(final[k] for k in per_class) / len(per_class), abs=1e-6)
    correct = round(final["test/acc"] * TEST_SIZE)  # recorded as computed from the counts: k/100 exactly
    assert final["test/acc"] == correct / TEST_SIZE
    percent = round(100 * final["test/acc"])  # k right of 100 (int() would floor 0.96 to 95)
    printed = f"Accuracy of the network on the {TEST_SIZE} test images: {percent} %"
    assert printed in single.result.stdout


def test_artifacts_hold_config_figures_tables_and_model(
    single: Recorded, tmp_path: Path, compose_config
) -> None:
    store, run_id = single.store, single.run.info.run_id
    found = store.artifacts(run_id)
    assert RUN_ARTIFACTS <= found, RUN_ARTIFACTS - found

    config = yaml.safe_load(store.download(run_id, "config/config.yaml", tmp_path).read_text())
    assert config == resolved(compose_config, SINGLE)
    overrides = yaml.safe_load(store.download(run_id, "config/hydra/overrides.yaml", tmp_path).read_text())
    assert overrides == SINGLE
    for figure in FIGURES:
        assert store.download(run_id, figure, tmp_path).read_bytes()[:8] == PNG, figure
    table = store.download(run_id, "tables/per_class_accuracy.csv", tmp_path).read_text()
    assert [row[0] for row in list(csv.reader(io.StringIO(table)))[1:]] == CLASSES
    markdown = store.download(run_id, "tables/per_class_accuracy.md", tmp_path).read_text()
    assert all(name in markdown for name in CLASSES)


def test_weights_load_into_a_plain_cnn_and_give_the_logged_accuracy(
    compose_config, single: Recorded, tmp_path: Path
) -> None:
    from cifar_exp.config import build
    from cifar_exp.data import normalise

    store, run_id = single.store, single.run.info.run_id
    state = torch.load(store.download(run_id, "model/state_dict.pt", tmp_path), weights_only=True)
    assert not any(key.startswith("module.") for key in state)
    cfg = compose_config(*SINGLE)  # what the run trained
    model = build(cfg.model, True, num_classes=10)
    model.load_state_dict(state)  # strict: every key and shape matches
    classes = json.loads(store.download(run_id, "model/classes.json", tmp_path).read_text())
    assert (classes["classes"] if isinstance(classes, dict) else classes) == CLASSES

    data = build(cfg.dataset, True, _convert_="all")
    model.eval()
    with torch.no_grad():
        logits = model(normalise(data.test_images, data.mean, data.std, torch.float32))
    accuracy = (logits.argmax(1) == data.test_labels).float().mean().item()
    assert accuracy == pytest.approx(single.run.data.metrics["test/acc"], abs=1e-6)


# ---------------------------------------------------------------- rerun and predict
@pytest.fixture
def use(single: Recorded, main_in_process, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Ended]:
    """`cifar-exp COMMAND ARGS` against the one run's store, in this process, from a folder of its
    own (the test's tmp_path), so it needs nothing but the store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", single.store.uri)
    return main_in_process


def test_rerun_reproduces_the_metrics_into_a_new_run(single: Recorded, use) -> None:
    result = use("rerun", single.run.info.run_id)
    assert result.returncode == 0, result.stderr
    store, original = single.store, single.run.info.run_id
    reruns = [r for r in store.runs() if r.data.tags.get("rerun_of") == original]
    assert len(reruns) == 1
    rerun = reruns[0]
    assert rerun.info.run_id != original
    assert rerun.info.status == "FINISHED"
    # trust: what the rerun was allowed to run (false without --trust), not what it computes
    params = {k: v for k, v in rerun.data.params.items() if k != "trust"}
    assert params == {k: v for k, v in store.run(original).data.params.items() if k != "trust"}
    assert rerun.data.params["trust"] == "False"
    for key in ["test/acc", "test/loss", "train/loss", "train/loss_epoch"]:
        assert store.history(original, key), key
        assert store.history(rerun.info.run_id, key) == store.history(original, key), key


def test_predict_prints_top_classes_per_image(single: Recorded, use, tmp_path: Path) -> None:
    from PIL import Image

    images = []
    for i, size in enumerate([(32, 32), (50, 40)]):  # any size: resized to 32x32
        path = tmp_path / f"image_{i}.png"
        Image.new("RGB", size, (40 * i, 200, 255 - 60 * i)).save(path)
        images.append(str(path))
    result = use("predict", single.run.info.run_id, *images)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for path in images:
        line = next((line for line in lines if line.startswith(path)), None)
        assert line is not None, f"{path} not in\n{result.stdout}"
        ranked = re.findall(r"(class_\d) (\d+(?:\.\d+)?)%", line[len(path) :])
        assert len(ranked) == 3, line  # the default top 3
        assert len({name for name, _ in ranked}) == 3, line
        probabilities = [float(p) for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True), line
        assert all(0 <= p <= 100 for p in probabilities) and sum(probabilities) <= 100.5, line


# ---------------------------------------------------------------- a sweep with a failing job
@pytest.fixture
def failing_sweep(main_in_process, empty_store_file: Path, tmp_path: Path, mlflow_store: str) -> Sweep:
    """The sweep, in this process (conftest's main_in_process), into a copy of the empty store."""
    shutil.copy(empty_store_file, tmp_path / "mlflow.db")  # the test's store (MLFLOW_TRACKING_URI)
    result = main_in_process(*FAILING_SWEEP)
    store = Store(mlflow_store)
    [parent] = [r for r in store.runs() if r.data.tags.get("sweep") == "true"]
    children = [r for r in store.runs() if r.info.run_id != parent.info.run_id]
    return Sweep(store, tmp_path, result, parent, children)


def test_a_job_whose_loss_is_not_finite_fails_and_the_sweep_goes_on(
    failing_sweep: Sweep, tmp_path: Path
) -> None:
    result, store = failing_sweep.result, failing_sweep.store
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    parent = failing_sweep.parent
    by_lr = {float(child.data.params["optimizer.lr"]): child for child in failing_sweep.children}
    assert set(by_lr) == {0.01, 1e6}
    finished, failed = by_lr[0.01], by_lr[1e6]
    assert finished.info.status == "FINISHED"
    assert "error" not in finished.data.tags
    assert failed.info.status == "FAILED"
    assert failed.info.end_time is not None
    # One line naming the step and the remedy, in the run and in front of the user alike.
    error = failed.data.tags["error"]
    assert "\n" not in error and "lower optimizer.lr" in error, error
    assert error in output
    named = re.search(r"loss became \S+ by step (\d+)", error)
    assert named, error
    # What the failed run recorded is the finite losses before that step, every one, and no more.
    step = int(named[1])
    losses = store.history(failed.info.run_id, "train/loss")
    assert step > 1 and [s for s, _ in losses] == list(range(1, step)), (step, losses)
    assert all(math.isfinite(value) for _, value in losses), losses
    assert all(math.isfinite(value) for value in failed.data.metrics.values()), failed.data.metrics
    for child in failing_sweep.children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FAILED"
    assert parent.info.end_time is not None
    assert len(failing_sweep.summary(tmp_path)) == 2
    assert parent.data.metrics["best/test/acc"] == pytest.approx(finished.data.metrics["test/acc"])
