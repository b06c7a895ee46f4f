"""DistributedDataParallel across 2 CPU processes (gloo) against 1 process with the same global
batch: the same metrics to within float tolerance, one MLflow run, weights that load into the
plain model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.config import build

ARGS = [
    "dataset=synthetic",
    "dataset.train_size=640",
    "dataset.test_size=200",
    "trainer.epochs=2",
    "trainer.batch_size=16",
    "trainer.log_every_n_steps=10",
    "optimizer.lr=0.01",
]


def _run(command: list[str], tmp: Path, store: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CIFAR_EXP_", "HYDRA_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def _metrics(store: Path) -> tuple[MlflowClient, object]:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar_exp")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_two_gloo_processes_match_one_process(compose_config, tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = _run([sys.executable, "-m", "cifar_exp", "device=cpu", *ARGS], tmp_path, single)
    assert one.returncode == 0, one.stderr
    two = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "cifar_exp",
            "device=ddp",
            *ARGS,
        ],
        tmp_path,
        ddp,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Accuracy of the network") == 1, "only rank 0 reports"

    client_a, a = _metrics(single)  # exactly one run each: only rank 0 talks to MLflow
    client_b, b = _metrics(ddp)
    assert b.data.params["trainer.batch_size"] == "16"  # the global batch
    assert b.data.params["device.name"] == "ddp"
    for key in ("train/loss", "train/loss_epoch", "test/loss", "test/acc"):
        ha = [(m.step, m.value) for m in client_a.get_metric_history(a.info.run_id, key)]
        hb = [(m.step, m.value) for m in client_b.get_metric_history(b.info.run_id, key)]
        assert [s for s, _ in ha] == [s for s, _ in hb], key
        assert [v for _, v in hb] == pytest.approx([v for _, v in ha], rel=1e-4, abs=1e-5), key
    path = client_b.download_artifacts(b.info.run_id, "model/state_dict.pt", str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    build(compose_config().model, num_classes=10).load_state_dict(state)  # the default CNN


def test_ddp_without_torchrun_says_how_to_start_it(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "cifar_exp", "device=ddp", *ARGS], tmp_path, tmp_path)
    assert result.returncode != 0
    assert "torchrun --nproc_per_node=N" in result.stderr
    assert "Traceback" not in result.stderr
