"""DistributedDataParallel across 2 CPU processes (gloo) against 1 process with the same global
batch: the same metrics to within float tolerance, one MLflow run, weights that load into the
plain model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config, ok, start, synthetic

from cifar_exp.config import build

# 320 images in global batches of 16 (20 steps an epoch, the loss logged every 10); each command
# names its device.
ARGS = [*synthetic(train=320, test=100, epochs=2, batch=16, log_every=10, device=None), "optimizer.lr=0.01"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_two_gloo_processes_match_one_process(
    new_store, main_in_process, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The one process is this one (main_in_process), training while torchrun's two start."""
    single, ddp = new_store("single"), new_store("ddp")
    env = {"MLFLOW_TRACKING_URI": ddp.uri}
    started = start([*TORCHRUN, "-m", "cifar_exp", "device=ddp", *ARGS], ddp.cwd, env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", single.uri)
    one = main_in_process("device=cpu", *ARGS)
    two = ok(started.result())
    assert one.returncode == 0, one.stderr
    assert two.stdout.count("Accuracy of the network") == 1, "only rank 0 reports"

    [a] = single.runs()  # exactly one run each: only rank 0 talks to MLflow
    [b] = ddp.runs()
    assert b.data.params["trainer.batch_size"] == "16"  # the global batch
    assert b.data.params["device.name"] == "ddp"
    for key in ("train/loss", "train/loss_epoch", "test/loss", "test/acc"):
        ha, hb = single.history(a.info.run_id, key), ddp.history(b.info.run_id, key)
        assert [s for s, _ in ha] == [s for s, _ in hb], key
        assert [v for _, v in hb] == pytest.approx([v for _, v in ha], rel=1e-4, abs=1e-5), key
    state = torch.load(ddp.download(b.info.run_id, "model/state_dict.pt", tmp_path), weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    build(compose_config().model, True, num_classes=10).load_state_dict(state)  # the default CNN


def test_ddp_without_torchrun_says_how_to_start_it(main_in_process) -> None:
    result = main_in_process("device=ddp", *ARGS)
    assert result.returncode != 0
    assert "torchrun --nproc_per_node=N" in result.stderr
    assert "Traceback" not in result.stderr
