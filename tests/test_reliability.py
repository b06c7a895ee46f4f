"""No lost work: checkpoints, exact resume, signals, non-finite losses, resumable sweeps."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp import checkpoints
from cifar_exp.errors import UserError

TRAIN = [
    "dataset=synthetic",
    "dataset.train_size=1600",
    "dataset.test_size=200",
    "trainer.batch_size=8",
    "trainer.epochs=3",
    "trainer.log_every_n_steps=25",
    "optimizer.lr=0.01",
    "device=cpu",
]


def _env(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CIFAR_EXP_", "HYDRA_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _cli(args: list[str], cwd: Path, store: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifar_exp", *args],
        cwd=cwd,
        env=_env(store),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _runs(store: Path) -> list:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar_exp")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _history(store: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# ---------------------------------------------------------------- the checkpoint file itself
def test_checkpoint_round_trip_and_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    write = checkpoints.writer(path, run_id=lambda: "abc123")
    loop_state = {**dict.fromkeys(checkpoints.LOOP_KEYS), "model": {"w": torch.arange(4.0)}}
    write(loop_state)
    write({**loop_state, "model": {"w": torch.ones(4)}})  # replaces, leaves no temp file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    loaded = checkpoints.load(path)
    assert checkpoints.run_id(loaded) == "abc123"

    class Loop:
        def load_state_dict(self, state: dict) -> None:
            self.state = state

    loop = Loop()
    checkpoints.resume(loop, loaded)  # the loop gets its state back; the RNGs their saved states
    assert torch.equal(loop.state["model"]["w"], torch.ones(4))
    first = (torch.rand(3), random.random(), np.random.rand())
    checkpoints.resume(loop, loaded)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a checkpoint", "not a readable cifar_exp checkpoint"),
        (None, "not a cifar_exp checkpoint"),  # a valid torch file, but not ours
    ],
)
def test_corrupt_or_foreign_checkpoint_is_one_line(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        checkpoints.load(path)
    assert "\n" not in str(error.value)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoints.save({"format": "cifar_exp/1", "epoch": 1}, path)

    def broken_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(UserError, match="No space left"):
        checkpoints.save({"format": "cifar_exp/1", "epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoints.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ---------------------------------------------------------------- signals and exact resume
def _start_and_signal(args: list[str], cwd: Path, store: Path, sig: int, after: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_exp", *args],
        cwd=cwd,
        env=_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(after):
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(lines)
    out, _ = proc.communicate(timeout=120)
    proc.output = "".join(lines) + out
    return proc


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    store = tmp_path / "store"
    whole = _cli(TRAIN + ["hydra.run.dir=whole"], tmp_path, store)
    assert whole.returncode == 0, whole.stderr

    proc = _start_and_signal(TRAIN + ["hydra.run.dir=cut"], tmp_path, store, signal.SIGTERM, "[2,   100]")
    assert proc.returncode == 143, proc.output
    reference, interrupted = _runs(store)
    assert interrupted.info.status == "KILLED"
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()

    resumed = _cli(["resume", interrupted.info.run_id], tmp_path, store)
    assert resumed.returncode == 0, resumed.stderr
    runs = _runs(store)
    assert len(runs) == 2, "resume continues the same MLflow run"
    final = MlflowClient(f"sqlite:///{store}/mlflow.db").get_run(interrupted.info.run_id)
    assert final.info.status == "FINISHED"

    for key in ("train/loss", "train/loss_epoch", "test/loss", "test/acc"):
        assert _history(store, final.info.run_id, key) == _history(store, reference.info.run_id, key), key
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    new_dir = Path(final.data.tags["checkpoint"]).parent
    b = torch.load(new_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights must be bit-identical"


def test_ctrl_c_exits_130_and_the_run_is_killed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = _start_and_signal(TRAIN + ["hydra.run.dir=cut"], tmp_path, store, signal.SIGINT, "[1,    50]")
    assert proc.returncode == 130, proc.output
    (run,) = _runs(store)
    assert run.info.status == "KILLED"
    assert checkpoints.load(tmp_path / "cut" / "checkpoint.pt")["progress"]["step"] >= 50


def test_resume_can_train_longer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    short = _cli(TRAIN + ["trainer.epochs=1"], tmp_path, store)
    assert short.returncode == 0, short.stderr
    (run,) = _runs(store)
    longer = _cli(["resume", run.info.run_id, "trainer.epochs=2"], tmp_path, store)
    assert longer.returncode == 0, longer.stderr
    steps = [s for s, _ in _history(store, run.info.run_id, "test/acc")]
    assert steps == [200, 400]  # epoch 2 continues the step count of epoch 1


# ---------------------------------------------------------------- bad numbers, sweeps
def test_nan_loss_fails_that_job_and_the_sweep_goes_on(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = _cli(TRAIN + ["trainer.epochs=1", "optimizer.lr=1e6,0.01", "-m"], tmp_path, store)
    assert result.returncode != 0
    assert "lower optimizer.lr" in result.stderr
    statuses = {r.data.params["optimizer.lr"]: r for r in _runs(store) if "optimizer.lr" in r.data.params}
    assert statuses["1000000.0"].info.status == "FAILED"
    assert "step" in statuses["1000000.0"].data.tags["error"]
    assert statuses["0.01"].info.status == "FINISHED"
    for value in [v for _, v in _history(store, statuses["1000000.0"].info.run_id, "train/loss")]:
        assert value == value and abs(value) != float("inf")  # nothing non-finite recorded


def test_rerunning_a_sweep_skips_finished_jobs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    sweep = TRAIN + ["trainer.epochs=1", "model.conv1_out=4,8", "-m"]
    first = _cli(sweep, tmp_path, store)
    assert first.returncode == 0, first.stderr
    second = _cli(sweep, tmp_path, store)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already finished") + second.stderr.count("already finished") == 2
    runs = _runs(store)
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert len(children) == 2, "no job ran twice"
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 2
    linked = [k for k in parents[-1].data.tags if k.startswith("linked/")]
    assert sorted(k.removeprefix("linked/") for k in linked) == sorted(c.info.run_id for c in children)
