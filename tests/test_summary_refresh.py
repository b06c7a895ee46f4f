"""A sweep's summary stays true after the sweep: a child resumed and trained further (or finished
after it was stopped) re-summarises the ended sweeps that hold it (cifar_exp/sweep_refresh.py),
and children that trained for different numbers of epochs are marked in the table. Built on fake
runs in a temporary MLflow store; one end-to-end resume at the end."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Store

from cifar_exp import sweep_refresh, sweep_summary
from cifar_exp.config import TrackingConfig


def squeezed(markdown: str) -> str:
    """A Markdown table with its cells' padding left out: '|  8 |' reads '| 8 |'."""
    return re.sub(r" {2,}", " ", markdown)


class FakeSweep:
    """A sweep over model.conv1_out in a real store: its parent run and children, recorded as
    training leaves them (val/acc and time/epoch_s each epoch, test/acc at the end)."""

    def __init__(self, store: Store) -> None:
        self.store, self.client = store, store.client()
        self.experiment = self.client.create_experiment("cifar_exp", str(store.root / "artifacts"))
        sweep = {"model.conv1_out": "4,8"}
        tags = {"sweep": "true", "sweep_params": json.dumps(sweep), "overrides": "[]"}
        self.parent = self.client.create_run(self.experiment, run_name="sweep", tags=tags).info.run_id

    def child(self, width: int, accs: list[float], status: str = "FINISHED", seed: int = 0) -> str:
        overrides = [f"model.conv1_out={width}", f"seed={seed}"]
        tags = {"mlflow.parentRunId": self.parent, "overrides": json.dumps(overrides)}
        run_id = self.client.create_run(self.experiment, run_name=f"w{width}s{seed}", tags=tags).info.run_id
        self.client.log_param(run_id, "model.conv1_out", str(width))
        self.client.log_param(run_id, "seed", str(seed))
        self.train(run_id, accs, status)
        return run_id

    def train(self, run_id: str, accs: list[float], status: str, first_epoch: int = 1) -> None:
        """Epochs `first_epoch`.. with these val/acc (a resume appends to the run's history)."""
        for epoch, acc in enumerate(accs, first_epoch):
            self.client.log_metric(run_id, "val/acc", acc, step=epoch)
            self.client.log_metric(run_id, "time/epoch_s", 1.5, step=epoch)
        if status == "FINISHED":
            self.client.log_metric(run_id, "test/acc", accs[-1] - 0.01, step=first_epoch + len(accs) - 1)
        self.client.set_terminated(run_id, status)

    def end(self) -> None:
        """The sweep ends as SweepCallback.close ends it."""
        status, _ = sweep_summary.summarise(self.client, self.parent)
        self.client.set_terminated(self.parent, status)

    def parent_run(self) -> Any:
        return self.client.get_run(self.parent)

    def artifact(self, path: str, dest: Path) -> str:
        return self.store.download(self.parent, path, dest).read_text()


@pytest.fixture
def sweep(new_store: Callable[..., Store]) -> FakeSweep:
    return FakeSweep(new_store("refresh"))


def test_a_child_resumed_further_after_its_sweep_refreshes_the_parents_best_and_table(
    sweep: FakeSweep, tmp_path: Path
) -> None:
    narrow = sweep.child(4, [0.30, 0.40])
    wide = sweep.child(8, [0.28, 0.35])
    sweep.end()
    assert sweep.parent_run().data.tags["best_run_id"] == narrow
    ended = sweep.parent_run().info.end_time

    sweep.train(wide, [0.45, 0.50], "FINISHED", first_epoch=3)  # resume wide trainer.epochs=4
    assert sweep_refresh.refresh(sweep.client, wide) == [sweep.parent]

    parent = sweep.parent_run()
    assert parent.data.tags["best_run_id"] == wide
    assert parent.data.metrics["best/val/acc"] == pytest.approx(0.50)
    assert parent.info.status == "FINISHED" and parent.info.end_time == ended
    assert f"runs/{wide}" in parent.data.tags[sweep_summary.NOTE_TAG]  # the description links it
    table = squeezed(sweep.artifact("sweep/summary.md", tmp_path))
    header, _, first, second = table.splitlines()[:4]
    assert "| epochs |" in header
    assert first.startswith("| ★ | 8 |") and "| 4 |" in first and "| 2 |" in second
    assert "the runs trained for different numbers of epochs (column epochs)" in table
    assert sweep_summary.PLOT_ARTIFACT in sweep.store.artifacts(sweep.parent, "sweep")


def test_a_stopped_child_finished_later_sets_its_sweeps_status(sweep: FakeSweep) -> None:
    sweep.child(4, [0.30, 0.40])
    stopped = sweep.child(8, [0.28], status="KILLED")
    sweep.end()
    assert sweep.parent_run().info.status == "KILLED"
    sweep.train(stopped, [0.33], "FINISHED", first_epoch=2)
    sweep_refresh.refresh(sweep.client, stopped)
    assert sweep.parent_run().info.status == "FINISHED"


def test_a_running_sweep_is_left_to_summarise_itself(sweep: FakeSweep) -> None:
    child = sweep.child(4, [0.30])
    assert sweep_refresh.refresh(sweep.client, child) == []
    assert "best_run_id" not in sweep.parent_run().data.tags


def test_a_later_sweep_that_linked_the_child_is_refreshed_too(sweep: FakeSweep) -> None:
    child = sweep.child(4, [0.30])
    sweep.end()
    tags = {"sweep": "true", "sweep_params": sweep.parent_run().data.tags["sweep_params"]}
    later = sweep.client.create_run(sweep.experiment, run_name="later", tags=tags)
    later_id = later.info.run_id
    sweep.client.set_tag(later_id, f"linked/{child}", "finished in an earlier sweep")
    sweep.client.set_terminated(later_id, "FINISHED")
    sweep.train(child, [0.5], "FINISHED", first_epoch=2)
    assert set(sweep_refresh.refresh(sweep.client, child)) == {sweep.parent, later_id}
    assert sweep.client.get_run(later_id).data.metrics["best/val/acc"] == pytest.approx(0.5)


def test_seed_groups_show_their_epochs_when_runs_differ(sweep: FakeSweep, tmp_path: Path) -> None:
    sweep.client.set_tag(sweep.parent, "sweep_params", json.dumps({"model.conv1_out": "4,8", "seed": "0,1"}))
    for width in (4, 8):
        for seed in (0, 1):
            sweep.child(width, [0.3 + width / 100, 0.4 + width / 100 + seed / 100], seed=seed)
    sweep.end()
    assert "epochs" not in sweep.artifact("sweep/summary.md", tmp_path)
    longer = sweep.client.search_runs([sweep.experiment], "attributes.run_name = 'w4s1'")[0].info.run_id
    sweep.train(longer, [0.6], "FINISHED", first_epoch=3)
    sweep_refresh.refresh(sweep.client, longer)
    header, _, *rows = squeezed(sweep.artifact("sweep/summary.md", tmp_path)).splitlines()
    assert "| n | epochs |" in header
    assert "| 2 | 2-3 |" in rows[0] and "| 2 | 2 |" in rows[1]  # conv1_out=4 (best now), then 8


def test_refresh_after_a_resume_however_it_ends_and_a_failing_store_costs_one_warning(
    sweep: FakeSweep, caplog: pytest.LogCaptureFixture
) -> None:
    child = sweep.child(4, [0.30])
    sweep.end()
    sweep.client.log_metric(child, "val/acc", 0.9, step=2)  # trained on, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        with sweep_refresh.refreshed_after(TrackingConfig(tracking_uri=sweep.store.uri), child):
            raise KeyboardInterrupt
    assert sweep.parent_run().data.metrics["best/val/acc"] == pytest.approx(0.9)

    with caplog.at_level(logging.WARNING):
        assert sweep_refresh.refresh(sweep.client, "0" * 32) == []
    (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said.startswith(f"MLflow: could not refresh the summary of run {'0' * 32}'s sweep")


@pytest.mark.slow
def test_resume_of_a_sweeps_child_refreshes_the_ended_sweep_end_to_end(
    new_store: Callable[..., Store], tmp_path: Path
) -> None:
    store = new_store("refresh_e2e")
    common = ["dataset=synthetic", "dataset.train_size=200", "dataset.test_size=50", "trainer.epochs=1"]
    store.run_cli(*common, "trainer.batch_size=50", "model.conv1_out=4,6", "-m").check_returncode()
    runs = store.runs()
    parent = next(r for r in runs if r.data.tags.get("sweep") == "true")
    best = parent.data.tags["best_run_id"]
    other = next(r for r in runs if r.info.run_id not in (parent.info.run_id, best))
    resumed = store.run_cli("resume", other.info.run_id, "trainer.epochs=2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"({parent.info.run_id}) summarised again" in resumed.stdout
    table = squeezed(store.download(parent.info.run_id, "sweep/summary.md", tmp_path).read_text())
    assert "| epochs |" in table and "different numbers of epochs" in table
    assert store.run(parent.info.run_id).info.end_time == parent.info.end_time
