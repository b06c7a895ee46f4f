"""No lost work: checkpoints, exact resume, Ctrl-C and SIGTERM, resumable sweeps. (A sweep job
whose loss goes non-finite: test_tracking.py.)"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

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


# ---------------------------------------------------------------- the commands, started together
SWEEP = [*train(epochs=1), "model.conv1_out=4,8", "-m"]


@dataclass
class Scenario:
    """A store of its own, the command that starts the scenario and, once that has ended, the
    command that follows it (if any)."""

    store: Store
    first: Command
    result: CompletedProcess[str] | None = None  # of `first`, once it has ended
    runs: list[Any] = field(default_factory=list)  # the store's runs then, before `then` starts
    then: Command | None = None


@pytest.fixture(scope="module")
def started(new_store) -> Iterator[dict[str, Scenario]]:
    """The scenarios below, started together so that they share the cores. The two interrupted
    runs get their signal here, mid-training (statuses_at_ctrl_c: the runs just before it); what
    follows a command starts as soon as that has ended: the resumes and the sweep run again."""
    first = {
        "whole": [*train(), "hydra.run.dir=whole"],  # the run that "cut" is resumed to match
        "cut": [*train(), "hydra.run.dir=cut"],
        "ctrl_c": [*train(epochs=100), "hydra.run.dir=cut"],  # still training whenever it comes
        "longer": train(epochs=1),
        "sweep": SWEEP,
    }
    then = {
        "cut": lambda runs: ["resume", runs[-1].info.run_id],
        "longer": lambda runs: ["resume", runs[-1].info.run_id, "trainer.epochs=2"],
        "sweep": lambda runs: SWEEP,
    }
    scenarios = {}
    for name, args in first.items():
        store = new_store(name)
        scenarios[name] = Scenario(store, store.start_cli(*args))
    try:
        scenarios["cut"].first.wait_for(r"^\[2,\s+25\] loss")  # mid-epoch 2, 375 of 600 steps to go
        scenarios["cut"].first.proc.send_signal(signal.SIGTERM)
        scenarios["ctrl_c"].first.wait_for(r"^\[1,\s+50\] loss")
        scenarios["ctrl_c"].first.wait_for(r"^MLflow run [0-9a-f]{32} ")  # opened in the background
        scenarios["ctrl_c"].runs = scenarios["ctrl_c"].store.runs()
        scenarios["ctrl_c"].first.proc.send_signal(signal.SIGINT)
        for name, follow in then.items():
            scenario = scenarios[name]
            scenario.result = scenario.first.result()
            scenario.runs = scenario.store.runs()
            if scenario.runs:  # else its test fails on what `first` did
                scenario.then = scenario.store.start_cli(*follow(scenario.runs))
        yield scenarios
    finally:
        for scenario in scenarios.values():
            for command in (scenario.first, scenario.then):
                if command is not None:
                    command.stop()


# ---------------------------------------------------------------- signals and exact resume
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(started: dict[str, Scenario]) -> None:
    if signal_ignored(signal.SIGTERM):
        pytest.skip("SIGTERM is ignored here, so the command would ignore it too")
    cut, whole = started["cut"], started["whole"]
    assert cut.result.returncode == 143, cut.result.stdout + cut.result.stderr
    [interrupted] = cut.runs
    assert interrupted.info.status == "KILLED"
    assert (cut.store.cwd / "cut" / "checkpoint.pt").is_file()

    ok(cut.then.result())  # resume
    [final] = cut.store.runs()  # resume continues the same MLflow run
    assert final.info.run_id == interrupted.info.run_id
    assert final.info.status == "FINISHED"

    ok(whole.first.result())
    [uninterrupted] = whole.store.runs()
    for key in ("train/loss", "train/loss_epoch", "test/loss", "test/acc"):
        expected = whole.store.history(uninterrupted.info.run_id, key)
        assert cut.store.history(final.info.run_id, key) == expected, key
    a = torch.load(whole.store.cwd / "whole" / "checkpoint.pt", weights_only=True)["model"]
    new_dir = Path(final.data.tags["checkpoint"]).parent
    b = torch.load(new_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights must be bit-identical"


def test_ctrl_c_exits_130_and_the_run_ends_killed_with_what_it_logged(started: dict[str, Scenario]) -> None:
    if signal_ignored(signal.SIGINT):
        pytest.skip("SIGINT is ignored here, so the command would ignore it too")
    ctrl_c = started["ctrl_c"]
    result = ctrl_c.first.result()
    assert [r.info.status for r in ctrl_c.runs] == ["RUNNING"]  # one run, open while it trained
    assert result.returncode == 130, result.stdout + result.stderr
    [run] = ctrl_c.store.runs()
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    steps = [step for step, _ in ctrl_c.store.history(run.info.run_id, "train/loss")]
    assert steps[:2] == [25, 50]  # what it logged is kept
    assert checkpoints.load(ctrl_c.store.cwd / "cut" / "checkpoint.pt")["progress"]["step"] >= 50


def test_resume_can_train_longer(started: dict[str, Scenario]) -> None:
    longer = started["longer"]
    ok(longer.result)
    [run] = longer.runs
    ok(longer.then.result())  # resume with trainer.epochs=2
    steps = [step for step, _ in longer.store.history(run.info.run_id, "test/acc")]
    assert steps == [200, 400]  # epoch 2 continues the step count of epoch 1


# ---------------------------------------------------------------- sweeps
def test_rerunning_a_sweep_skips_finished_jobs(started: dict[str, Scenario]) -> None:
    sweep = started["sweep"]
    ok(sweep.result)
    second = ok(sweep.then.result())  # the same sweep again
    assert second.stdout.count("already finished") + second.stderr.count("already finished") == 2
    runs = sweep.store.runs()
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert len(children) == 2, "no job ran twice"
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 2
    linked = [k for k in parents[-1].data.tags if k.startswith("linked/")]
    assert sorted(k.removeprefix("linked/") for k in linked) == sorted(c.info.run_id for c in children)
