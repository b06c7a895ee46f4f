"""No lost work: checkpoints, exact resume, Ctrl-C and SIGTERM, resumable sweeps. (A sweep job
whose loss goes non-finite: test_tracking.py.)"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Command, Store, ok, signal_ignored, synthetic

from cifar_exp import checkpoints
from cifar_exp.errors import UserError


def train(epochs: int = 3) -> list[str]:
    """1600 images in batches of 8: 200 steps an epoch, the loss logged every 25."""
    return [*synthetic(train=1600, test=200, epochs=epochs, batch=8, log_every=25), "optimizer.lr=0.01"]


# ---------------------------------------------------------------- the checkpoint file itself
def test_checkpoint_round_trip_and_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    state = {"format": "cifar_exp/1", "model": {"w": torch.arange(4.0)}, "rng": checkpoints.rng_states()}
    checkpoints.save(state, path)
    checkpoints.save({**state, "model": {"w": torch.ones(4)}}, path)  # replaces, leaves no temp file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    loaded = checkpoints.load(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(4))
    checkpoints.restore_rng_states(loaded["rng"])  # what was loaded replays the saved states
    first = (torch.rand(3), random.random(), np.random.rand())
    checkpoints.restore_rng_states(loaded["rng"])
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


# ---------------------------------------------------------------- the commands, started together
SWEEP = [*train(epochs=1), "model.conv1_out=4,8", "-m"]


@dataclass
class Started:
    stores: dict[str, Store]
    commands: dict[str, Command]
    statuses_at_ctrl_c: list[str]  # the statuses of the Ctrl-C store's runs, just before the signal


@pytest.fixture(scope="module")
def started(new_store) -> Iterator[Started]:
    """The first command of each test below, each with a store of its own, started together so
    that they share the cores. The two that are interrupted get their signal here, mid-training."""
    first = {
        "whole": [*train(), "hydra.run.dir=whole"],  # the run that "cut" is resumed to match
        "cut": [*train(), "hydra.run.dir=cut"],
        "ctrl_c": [*train(epochs=100), "hydra.run.dir=cut"],  # still training whenever it comes
        "longer": train(epochs=1),
        "sweep": SWEEP,
    }
    stores = {name: new_store(name) for name in first}
    commands = {name: stores[name].start_cli(*args) for name, args in first.items()}
    try:
        commands["cut"].wait_for(r"^\[2,\s+25\] loss")  # mid-epoch 2, with 375 of its 600 steps to go
        commands["cut"].proc.send_signal(signal.SIGTERM)
        commands["ctrl_c"].wait_for(r"^\[1,\s+50\] loss")
        statuses = [r.info.status for r in stores["ctrl_c"].runs()]
        commands["ctrl_c"].proc.send_signal(signal.SIGINT)
        yield Started(stores, commands, statuses)
    finally:
        for command in commands.values():
            command.stop()


# ---------------------------------------------------------------- signals and exact resume
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(started: Started) -> None:
    if signal_ignored(signal.SIGTERM):
        pytest.skip("SIGTERM is ignored here, so the command would ignore it too")
    store, reference = started.stores["cut"], started.stores["whole"]
    result = started.commands["cut"].result()
    assert result.returncode == 143, result.stdout + result.stderr
    [interrupted] = store.runs()
    assert interrupted.info.status == "KILLED"
    assert (store.cwd / "cut" / "checkpoint.pt").is_file()

    ok(store.run_cli("resume", interrupted.info.run_id))
    [final] = store.runs()  # resume continues the same MLflow run
    assert final.info.run_id == interrupted.info.run_id
    assert final.info.status == "FINISHED"

    ok(started.commands["whole"].result())
    [uninterrupted] = reference.runs()
    for key in ("train/loss", "train/loss_epoch", "test/loss", "test/acc"):
        expected = reference.history(uninterrupted.info.run_id, key)
        assert store.history(final.info.run_id, key) == expected, key
    a = torch.load(reference.cwd / "whole" / "checkpoint.pt", weights_only=True)["model"]
    new_dir = Path(final.data.tags["checkpoint"]).parent
    b = torch.load(new_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights must be bit-identical"


def test_ctrl_c_exits_130_and_the_run_ends_killed_with_what_it_logged(started: Started) -> None:
    if signal_ignored(signal.SIGINT):
        pytest.skip("SIGINT is ignored here, so the command would ignore it too")
    store, result = started.stores["ctrl_c"], started.commands["ctrl_c"].result()
    assert started.statuses_at_ctrl_c == ["RUNNING"]  # one run, open while it trains
    assert result.returncode == 130, result.stdout + result.stderr
    [run] = store.runs()
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    steps = [step for step, _ in store.history(run.info.run_id, "train/loss")]
    assert steps[:2] == [25, 50]  # what it logged is kept
    assert checkpoints.load(store.cwd / "cut" / "checkpoint.pt")["progress"]["step"] >= 50


def test_resume_can_train_longer(started: Started) -> None:
    store = started.stores["longer"]
    ok(started.commands["longer"].result())
    [run] = store.runs()
    ok(store.run_cli("resume", run.info.run_id, "trainer.epochs=2"))
    steps = [step for step, _ in store.history(run.info.run_id, "test/acc")]
    assert steps == [200, 400]  # epoch 2 continues the step count of epoch 1


# ---------------------------------------------------------------- sweeps
def test_rerunning_a_sweep_skips_finished_jobs(started: Started) -> None:
    store = started.stores["sweep"]
    ok(started.commands["sweep"].result())
    second = ok(store.run_cli(*SWEEP))
    assert second.stdout.count("already finished") + second.stderr.count("already finished") == 2
    runs = store.runs()
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert len(children) == 2, "no job ran twice"
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 2
    linked = [k for k in parents[-1].data.tags if k.startswith("linked/")]
    assert sorted(k.removeprefix("linked/") for k in linked) == sorted(c.info.run_id for c in children)
