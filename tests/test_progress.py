"""What a run shows while it trains: throughput that counts training steps only (not what the
loop does between them: the progress bar, logging, recording), log lines printed above the
progress bar instead of through it, and none of MLflow's own start-up chatter."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ok, run_cli, synthetic

from cifar_exp import train
from cifar_exp.config import TrainerConfig
from cifar_exp.data import BatchOrder
from cifar_exp.models import CNN
from cifar_exp.train import Loop, Tensors

PAUSE_S = 0.5  # what the tests inject outside the training steps
# What MLflow prints at INFO on a new store (alembic's lines too)
MLFLOW_CHATTER = (
    "Creating initial MLflow database tables",
    "Updating database tables",
    "INFO mlflow",
    "alembic",
)


def tiny_loop(on_metrics=lambda metrics, step: None, **changes) -> Loop:
    """A small CNN on 40 random images: 5 steps of 8 an epoch, a train/loss point every 2."""
    torch.manual_seed(0)
    images, labels = torch.randn(40, 3, 32, 32), torch.arange(40) % 10
    data = Tensors(images, labels, images[:16], labels[:16])
    net = CNN(conv1_out=2, conv2_out=2, fc1_out=8, fc2_out=8, kernel_size=5)
    cfg = TrainerConfig(batch_size=8, checkpoint=False, test_batch_size=100, log_every_n_steps=2, **changes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    return Loop(net, optimizer, data, [str(k) for k in range(10)], cfg, torch.Generator(), on_metrics)


def test_images_per_s_counts_the_training_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause before the first step (setup) and one in recording a train/loss point are not
    training time; the steps themselves are."""
    epochs: list[dict[str, float]] = []
    pauses = {"recording": True}

    def on_metrics(metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics and pauses.pop("recording", False):
            time.sleep(PAUSE_S)
        if "time/epoch_s" in metrics:
            epochs.append(metrics)

    loop = tiny_loop(on_metrics, epochs=2)
    batches = BatchOrder.epoch

    def late_first_batch(order: BatchOrder, *args, **kwargs) -> Iterator:
        first = loop.progress.epoch == 1
        for i, batch in enumerate(batches(order, *args, **kwargs)):
            if first and i == 0:
                time.sleep(PAUSE_S)
            yield batch

    monkeypatch.setattr(BatchOrder, "epoch", late_first_batch)
    step = loop.train_step

    def slow_step(*args) -> torch.Tensor:
        time.sleep(0.02)  # 5 steps an epoch: at least 0.1 s of training
        return step(*args)

    loop.train_step = slow_step
    started = time.perf_counter()
    loop.fit()
    assert time.perf_counter() - started > 2 * PAUSE_S
    first, second = epochs
    assert 0.1 <= first["time/epoch_s"] < PAUSE_S, "the pauses were counted as training"
    assert first["throughput/images_per_s"] == pytest.approx(40 / first["time/epoch_s"])
    assert second["time/epoch_s"] >= 0.1


def test_log_lines_print_above_the_progress_bar(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While training, each log line (the loop's own, or the record writer's from its thread) goes
    through tqdm.write, which clears the bar, prints the line and draws the bar again below it."""
    written: list[str] = []
    monkeypatch.setattr(train.tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stdout)  # Hydra's job logging: a console handler on root
    monkeypatch.setattr(root, "handlers", [console])
    caplog.set_level(logging.INFO)  # the loop's lines are INFO
    tiny_loop(epochs=1).fit()
    assert any("loss:" in line for line in written) and any("epoch 1/1" in line for line in written)
    assert root.handlers == [console], "the console handler is back after training"


def test_a_tracked_run_shows_none_of_mlflows_start_up_chatter(tmp_path: Path) -> None:
    """Into a new store (MLflow creates its tables): our lines, none of MLflow's INFO lines."""
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result = ok(
        run_cli(*synthetic(train=40, test=20, epochs=1), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": store})
    )
    shown = result.stdout + result.stderr
    assert "MLflow run " in result.stdout, shown  # ours: which run, in which store
    for chatter in MLFLOW_CHATTER:
        assert chatter not in shown, shown


@pytest.mark.slow
def test_a_run_into_a_tracking_server_prints_no_run_links(server, tmp_path: Path) -> None:
    """MLflow prints "🏃 View run ... at: URL" when a run on a server ends; ours says which run."""
    small = synthetic(train=40, test=20, epochs=1)
    result = ok(run_cli(*small, f"mlflow.tracking_uri={server.uri}", cwd=tmp_path))
    shown = result.stdout + result.stderr
    assert "MLflow run " in result.stdout, shown
    assert "View run" not in shown and "View experiment" not in shown, shown
