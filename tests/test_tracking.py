"""What MLflow records, read back the way a user would: one run, a sweep, a sweep with a failing job,
`rerun`, `predict`, and runs stopped by SIGTERM or Ctrl-C.

Every command runs as a subprocess (`python -m cifar_exp ...`) from a temporary folder against its own
temporary SQLite store. The independent commands start together in the background on first use, so
their imports and training share the cores instead of queueing."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# 320 images in batches of 32: 10 steps per epoch, so the 5-step loss windows end at the global
# steps 5, 10, 15, 20 and the epochs at steps 10 and 20.
TRAIN_SIZE, TEST_SIZE, BATCH, LOG_EVERY, EPOCHS = 320, 100, 32, 5, 2
STEPS_PER_EPOCH = TRAIN_SIZE // BATCH
SMALL = [
    "dataset=synthetic",
    f"dataset.train_size={TRAIN_SIZE}",
    f"dataset.test_size={TEST_SIZE}",
    f"trainer.epochs={EPOCHS}",
    f"trainer.batch_size={BATCH}",
    f"trainer.log_every_n_steps={LOG_EVERY}",
    "device=cpu",  # the same metrics on every machine, so a rerun can be compared exactly
]
SINGLE = [*SMALL, "model.conv1_out=8", "optimizer.lr=0.01"]
SWEEP = [*SMALL, "model.conv1_out=4,8"]  # with mlflow.tracking_uri=<its store> -m
# lr 1e6 makes the training loss NaN by the first logging interval, after the job's run has opened.
FAILING_SWEEP = [*SMALL, "optimizer.lr=0.01,1e6", "-m"]
# Enough work to still be training when the signal comes: 50 epochs of 5000 steps.
LONG_RUN = [
    "dataset=synthetic",
    "dataset.train_size=20000",
    f"dataset.test_size={TEST_SIZE}",
    "trainer.epochs=50",
    "trainer.batch_size=4",
    "trainer.log_every_n_steps=10",
    "device=cpu",
]
TRAINING = re.compile(r"^\[1,\s+\d+\] loss", re.MULTILINE)  # the first epoch's loss lines

EPOCH_METRICS = ["train/loss_epoch", "test/loss", "test/acc", "time/epoch_s", "throughput/images_per_s"]
CLASSES = [f"class_{i}" for i in range(10)]  # the synthetic dataset's class names
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- running commands, reading the store
@dataclass
class Command:
    """A `python -m cifar_exp` started in the background; stdout and stderr go to files."""

    proc: subprocess.Popen
    output: Path  # <output>.out and <output>.err

    def stdout(self) -> str:
        return self.output.with_suffix(".out").read_text()

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        stderr = self.output.with_suffix(".err").read_text()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.stdout(), stderr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Store:
    """A temporary MLflow store (root/mlflow.db, artifacts in root/artifacts) and the folder that
    commands run from."""

    root: Path
    cwd: Path
    env_uri: str | None = None  # $MLFLOW_TRACKING_URI of its commands when not this store's

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CIFAR_EXP_", "MLFLOW_", "HYDRA_"))}
        env["MLFLOW_TRACKING_URI"] = self.env_uri or self.uri
        # One torch thread each: the commands share the cores without oversubscribing them.
        return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def start(self, *args: str) -> Command:
        output = self.root / f"command_{len(list(self.root.glob('command_*.out')))}"
        with open(output.with_suffix(".out"), "w") as out, open(output.with_suffix(".err"), "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cifar_exp", *args],
                cwd=self.cwd,
                env=self.env(),
                stdout=out,
                stderr=err,
            )
        return Command(proc, output)

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self) -> list[Any]:
        client = self.client()
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, max_results=1000, order_by=["attributes.start_time ASC"])

    def download(self, run_id: str, artifact: str, dest: Path) -> Path:
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=self.uri
            )
        )


def new_store(tmp_path_factory: pytest.TempPathFactory, name: str, env_uri: str | None = None) -> Store:
    root = tmp_path_factory.mktemp(name)
    (root / "cwd").mkdir()
    return Store(root, root / "cwd", env_uri)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: Any, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested dict as a dotted key (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resolved_config(overrides: list[str]) -> dict[str, Any]:
    """What these overrides compose to, resolved, by Hydra's compose API in this process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cifar_exp.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


# ---------------------------------------------------------------- the background commands
@dataclass
class Signalled:
    """A long run that a watcher thread interrupts with `signum` once it is training."""

    store: Store
    command: Command
    signum: int
    statuses_when_signalled: list[str] | None = None  # the store's runs, read just before the signal
    watcher: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while self.command.proc.poll() is None and time.monotonic() < deadline:
            output = self.command.stdout()
            if TRAINING.search(output) and "MLflow run " in output:  # training, and the run is open
                try:
                    self.statuses_when_signalled = [r.info.status for r in self.store.runs()]
                finally:
                    self.command.proc.send_signal(self.signum)
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Signalled]]:
    started = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        store = new_store(tmp_path_factory, f"signal_{signum}")
        started[signum] = Signalled(store, store.start(*LONG_RUN), signum)
    yield started
    for each in started.values():
        each.command.stop()


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory, signalled: dict[int, Signalled]
) -> Iterator[dict[str, tuple[Store, Command]]]:
    """The one run and both sweeps, started together with the signalled runs. The sweep names its
    store with mlflow.tracking_uri while $MLFLOW_TRACKING_URI names a decoy."""
    started = {}
    for name, args in [("single", SINGLE), ("failing_sweep", FAILING_SWEEP)]:
        store = new_store(tmp_path_factory, name)
        started[name] = (store, store.start(*args))
    decoy = tmp_path_factory.mktemp("decoy") / "mlflow.db"
    store = new_store(tmp_path_factory, "sweep", env_uri=f"sqlite:///{decoy}")
    started["sweep"] = (store, store.start(*SWEEP, f"mlflow.tracking_uri={store.uri}", "-m"))
    yield started
    for _, command in started.values():
        command.stop()


# ---------------------------------------------------------------- one run
@dataclass
class Recorded:
    store: Store
    result: subprocess.CompletedProcess
    run: Any


@pytest.fixture(scope="module")
def single(launched: dict[str, tuple[Store, Command]]) -> Recorded:
    store, command = launched["single"]
    result = ok(command.result())
    runs = store.runs()
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return Recorded(store, result, runs[0])


def test_run_finishes_named_after_its_overrides(single: Recorded) -> None:
    info = single.run.info
    assert info.status == "FINISHED"
    assert info.end_time is not None
    assert "conv1_out=8" in info.run_name
    assert "lr=0.01" in info.run_name
    assert info.run_id in single.result.stdout + single.result.stderr  # the log says where it went


def test_run_goes_to_the_store_the_env_names(single: Recorded) -> None:
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
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////from/env.db")
    assert tracking_uri(TrackingConfig()) == "sqlite:////from/env.db"
    assert tracking_uri(TrackingConfig(tracking_uri="sqlite:////from/cfg.db")) == "sqlite:////from/cfg.db"


def test_params_are_every_leaf_of_the_resolved_config(single: Recorded) -> None:
    expected = leaves(resolved_config(SINGLE))
    params = single.run.data.params
    assert set(params) == set(expected)
    for key, value in expected.items():
        if isinstance(value, list):
            assert json.loads(params[key]) == value, key
        else:
            assert params[key] == str(value), key
    assert params["model.conv1_out"] == "8"
    assert params["optimizer.lr"] == "0.01"
    assert params["trainer.batch_size"] == str(BATCH)
    assert params["dataset.train_size"] == str(TRAIN_SIZE)
    assert params["seed"] == "0"


def test_tags_record_overrides_git_and_device(single: Recorded) -> None:
    tags = single.run.data.tags
    assert json.loads(tags["overrides"]) == SINGLE
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["git_commit"] == head
    assert tags["git_dirty"] in ("True", "False")
    output_dir = single.store.cwd / tags["hydra_output_dir"]  # relative to where it ran, or absolute
    assert output_dir.resolve().is_relative_to(single.store.cwd.resolve())
    assert (output_dir / ".hydra" / "config.yaml").is_file()
    assert tags["device"] == "cpu"
    assert tags["gpus"] == "0"


def test_metrics_are_logged_at_global_steps(single: Recorded) -> None:
    client = single.store.client()
    run_id = single.run.info.run_id
    train_loss = history(client, run_id, "train/loss")
    assert [step for step, _ in train_loss] == list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))
    epoch_ends = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
    per_class = [f"test/acc/{name}" for name in CLASSES]
    for key in EPOCH_METRICS + per_class:
        values = history(client, run_id, key)
        assert [step for step, _ in values] == epoch_ends, key
        assert all(math.isfinite(value) for _, value in values), key
    for key in ["test/acc", *per_class]:
        assert all(0 <= value <= 1 for _, value in history(client, run_id, key)), key
    for key in ["test/loss", "time/epoch_s", "throughput/images_per_s"]:
        assert all(value > 0 for _, value in history(client, run_id, key)), key
    assert all(value > 0 for _, value in train_loss)
    # The synthetic test set holds as many images of each class: accuracy is the per-class mean.
    final = single.run.data.metrics
    assert final["test/acc"] == pytest.approx(sum(final[k] for k in per_class) / len(per_class), abs=1e-6)
    printed = f"Accuracy of the network on the {TEST_SIZE} test images: {int(100 * final['test/acc'])} %"
    assert printed in single.result.stdout


def test_artifacts_hold_config_figures_tables_and_model(single: Recorded, tmp_path: Path) -> None:
    store, run_id = single.store, single.run.info.run_id
    found = artifact_paths(store.client(), run_id)
    figures = {"figures/train_samples.png", "figures/test_predictions.png", "figures/confusion_matrix.png"}
    expected = figures | {
        "config/config.yaml",
        "config/hydra/config.yaml",
        "config/hydra/overrides.yaml",
        "config/hydra/hydra.yaml",
        "tables/per_class_accuracy.md",
        "tables/per_class_accuracy.csv",
        "model/state_dict.pt",
        "model/classes.json",
    }
    assert expected <= found, expected - found

    config = yaml.safe_load(store.download(run_id, "config/config.yaml", tmp_path).read_text())
    assert config == resolved_config(SINGLE)
    overrides = yaml.safe_load(store.download(run_id, "config/hydra/overrides.yaml", tmp_path).read_text())
    assert overrides == SINGLE
    for figure in figures:
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
    model = build(cfg.model, num_classes=10)
    model.load_state_dict(state)  # strict: every key and shape matches
    classes = json.loads(store.download(run_id, "model/classes.json", tmp_path).read_text())
    assert (classes["classes"] if isinstance(classes, dict) else classes) == CLASSES

    data = build(cfg.dataset, _convert_="all")
    model.eval()
    with torch.no_grad():
        logits = model(normalise(data.test_images, data.mean, data.std, torch.float32))
    accuracy = (logits.argmax(1) == data.test_labels).float().mean().item()
    assert accuracy == pytest.approx(single.run.data.metrics["test/acc"], abs=1e-6)


# ---------------------------------------------------------------- rerun and predict
@dataclass
class Uses:
    rerun: Command
    predict: Command
    images: list[str]


@pytest.fixture(scope="module")
def uses(single: Recorded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uses]:
    """`rerun` and `predict` of the one run, started together; the rerun from another folder,
    so it needs nothing but the store."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    images = []
    for i, size in enumerate([(32, 32), (50, 40)]):  # any size: resized to 32x32
        path = folder / f"image_{i}.png"
        Image.new("RGB", size, (40 * i, 200, 255 - 60 * i)).save(path)
        images.append(str(path))
    run_id = single.run.info.run_id
    elsewhere = Store(single.store.root, tmp_path_factory.mktemp("rerun_cwd"))
    started = Uses(elsewhere.start("rerun", run_id), single.store.start("predict", run_id, *images), images)
    yield started
    started.rerun.stop()
    started.predict.stop()


def test_rerun_reproduces_the_metrics_into_a_new_run(single: Recorded, uses: Uses) -> None:
    ok(uses.rerun.result())
    original = single.run.info.run_id
    reruns = [r for r in single.store.runs() if r.data.tags.get("rerun_of") == original]
    assert len(reruns) == 1
    rerun = reruns[0]
    assert rerun.info.run_id != original
    assert rerun.info.status == "FINISHED"
    client = single.store.client()
    assert rerun.data.params == client.get_run(original).data.params
    for key in ["test/acc", "test/loss", "train/loss", "train/loss_epoch"]:
        assert history(client, original, key), key
        assert history(client, rerun.info.run_id, key) == history(client, original, key), key


def test_predict_prints_top_classes_per_image(uses: Uses) -> None:
    result = ok(uses.predict.result())
    lines = result.stdout.splitlines()
    for path in uses.images:
        line = next((line for line in lines if line.startswith(path)), None)
        assert line is not None, f"{path} not in\n{result.stdout}"
        ranked = re.findall(r"(class_\d) (\d+(?:\.\d+)?)%", line[len(path) :])
        assert len(ranked) == 3, line  # the default top 3
        assert len({name for name, _ in ranked}) == 3, line
        probabilities = [float(p) for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True), line
        assert all(0 <= p <= 100 for p in probabilities) and sum(probabilities) <= 100.5, line


# ---------------------------------------------------------------- sweeps
@dataclass
class Sweep:
    store: Store
    result: subprocess.CompletedProcess
    parent: Any
    children: list[Any]  # in start order

    def summary(self, dest: Path) -> list[dict[str, str]]:
        text = self.store.download(self.parent.info.run_id, "sweep/summary.csv", dest).read_text()
        return list(csv.DictReader(io.StringIO(text)))


def finished_sweep(store: Store, command: Command) -> Sweep:
    result = command.result()
    runs = store.runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1, f"{[r.info.run_name for r in runs]}\n{result.stdout}\n{result.stderr}"
    children = [r for r in runs if r.info.run_id != parents[0].info.run_id]
    return Sweep(store, result, parents[0], children)


@pytest.fixture(scope="module")
def sweep(launched: dict[str, tuple[Store, Command]]) -> Sweep:
    return finished_sweep(*launched["sweep"])


@pytest.fixture(scope="module")
def failing_sweep(launched: dict[str, tuple[Store, Command]]) -> Sweep:
    return finished_sweep(*launched["failing_sweep"])


def test_sweep_has_one_parent_and_a_child_per_job(sweep: Sweep) -> None:
    ok(sweep.result)
    parent = sweep.parent
    assert len(sweep.children) == 2
    for child, width in zip(sweep.children, ["4", "8"], strict=True):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert f"conv1_out={width}" in child.info.run_name
        assert child.data.params["model.conv1_out"] == width
    job_dirs = {Path(child.data.tags["hydra_output_dir"]) for child in sweep.children}
    assert len(job_dirs) == 2 and all((sweep.store.cwd / d / ".hydra").is_dir() for d in job_dirs)
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time is not None


def test_tracking_uri_override_beats_the_env(sweep: Sweep) -> None:
    ok(sweep.result)
    decoy = Path(sweep.store.env_uri.removeprefix("sqlite:///"))
    assert not decoy.exists() and not any(decoy.parent.iterdir())
    assert len(sweep.store.runs()) == 3  # the parent and both jobs


def test_sweep_parent_holds_the_summary(sweep: Sweep, tmp_path: Path) -> None:
    store, parent_id = sweep.store, sweep.parent.info.run_id
    found = artifact_paths(store.client(), parent_id)
    assert {"sweep/summary.csv", "sweep/summary.md", "sweep/test_acc.png"} <= found, found
    rows = sweep.summary(tmp_path)
    width = next((c for c in rows[0] if c.endswith("conv1_out")), None)
    assert width is not None, f"no column for the swept model.conv1_out in {list(rows[0])}"
    by_width = {float(row[width]): row for row in rows}
    assert set(by_width) == {4.0, 8.0}
    for child in sweep.children:
        row = by_width[float(child.data.params["model.conv1_out"])]
        assert float(row["test/acc"]) == pytest.approx(child.data.metrics["test/acc"])
        assert float(row["test/loss"]) == pytest.approx(child.data.metrics["test/loss"])
    markdown = store.download(parent_id, "sweep/summary.md", tmp_path).read_text()
    assert "test/acc" in markdown and len(markdown.strip().splitlines()) >= 4  # header, rule, 2 rows
    assert store.download(parent_id, "sweep/test_acc.png", tmp_path).read_bytes()[:8] == PNG
    best = max(child.data.metrics["test/acc"] for child in sweep.children)
    assert sweep.parent.data.metrics["best/test/acc"] == pytest.approx(best)


def test_sweep_with_a_failing_job_closes_the_parent_failed(failing_sweep: Sweep, tmp_path: Path) -> None:
    result = failing_sweep.result
    assert result.returncode != 0, result.stdout + result.stderr
    parent = failing_sweep.parent
    by_lr = {float(child.data.params["optimizer.lr"]): child for child in failing_sweep.children}
    assert set(by_lr) == {0.01, 1e6}
    finished, failed = by_lr[0.01], by_lr[1e6]
    assert finished.info.status == "FINISHED"
    assert "error" not in finished.data.tags
    assert failed.info.status == "FAILED"
    assert failed.info.end_time is not None
    error = failed.data.tags["error"]
    assert error and "\n" not in error and "loss" in error
    assert error in result.stdout + result.stderr  # the user sees the same line
    for child in failing_sweep.children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FAILED"
    assert parent.info.end_time is not None
    assert len(failing_sweep.summary(tmp_path)) == 2
    assert parent.data.metrics["best/test/acc"] == pytest.approx(finished.data.metrics["test/acc"])


# ---------------------------------------------------------------- SIGTERM and Ctrl-C
@pytest.mark.parametrize(
    ("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_mid_training_ends_the_run_killed(
    signum: int, exit_code: int, signalled: dict[int, Signalled]
) -> None:
    if signal.getsignal(signum) is signal.SIG_IGN:  # inherited, e.g. pytest started with `&`
        pytest.skip(f"{signal.Signals(signum).name} is ignored here, so the command would ignore it too")
    run = signalled[signum]
    run.watcher.join(300)
    result = run.command.result(60)
    output = result.stdout + result.stderr
    assert run.statuses_when_signalled == ["RUNNING"], output  # one run, open and training
    assert result.returncode == exit_code, output
    [killed] = run.store.runs()
    assert killed.info.status == "KILLED"
    assert killed.info.end_time is not None
    assert history(run.store.client(), killed.info.run_id, "train/loss")  # what it logged is kept
