"""No lost work: checkpoints, exact resume, Ctrl-C and SIGTERM, resumable sweeps; resume never harms
the run it resumes (refusals change nothing in the store); preemption under submitit; random kills.
(A sweep job whose loss goes non-finite: test_tracking.py.)"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Command, Ended, Store, cli_env, ok, run_in_process, signal_ignored, synthetic
from mlflow.tracking import MlflowClient

from cifar_exp import checkpoints, commands, signals
from cifar_exp.errors import UserError
from cifar_exp.tracking import identity, leases, resumption, runs
from cifar_exp.tracking.records import RecordWriter


def train(epochs: int = 3) -> list[str]:
    """1600 images (and 160 held out for validation) in batches of 8: 200 steps an epoch, the loss
    logged every 25."""
    overrides = synthetic(train=1600, val=160, test=200, epochs=epochs, batch=8, log_every=25)
    return [*overrides, "optimizer.lr=0.01"]


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
# Two jobs of 10 steps: what is tested is that the second sweep skips them, not their training.
SWEEP = [*synthetic(train=320, test=100, epochs=1, batch=32, log_every=None), "model.conv1_out=4,8", "-m"]


@dataclass
class Scenario:
    """A store of its own, the command that starts the scenario and, once that has ended, the
    command that follows it (if any)."""

    store: Store
    first: Command
    result: CompletedProcess[str] | None = None  # of `first`, once it has ended
    runs: list[Any] = field(default_factory=list)  # the store's runs then, before `then` starts
    then: Command | None = None


@dataclass
class Started:
    scenarios: dict[str, Scenario]  # only those whose signal reaches a command started here
    whole: Store  # the uninterrupted run that "cut" is resumed to match, run in this process
    whole_run: Ended


@pytest.fixture(scope="module")
def started(new_store) -> Iterator[Started]:
    """The interrupted runs, started together so that they share the cores, get their signal
    here, mid-training (statuses_at_ctrl_c: the runs just before it); a scenario whose signal is
    ignored here is not started (its test skips). The resume starts as soon as "cut" has ended;
    the uninterrupted run then trains in this process beside it (conftest's run_in_process: the
    numbers do not depend on which process computes them)."""
    first = {
        "cut": (signal.SIGTERM, [*train(), "hydra.run.dir=cut"]),
        "ctrl_c": (signal.SIGINT, [*train(epochs=100), "hydra.run.dir=cut"]),  # still training then
    }
    scenarios = {}
    for name, (signum, args) in first.items():
        if not signal_ignored(signum):
            store = new_store(name)
            scenarios[name] = Scenario(store, store.start_cli(*args))
    try:
        if cut := scenarios.get("cut"):
            cut.first.wait_for(r"^\[2,\s+25\] loss")  # mid-epoch 2, 375 of 600 steps to go
            cut.first.proc.send_signal(signal.SIGTERM)
        if ctrl_c := scenarios.get("ctrl_c"):
            ctrl_c.first.wait_for(r"^\[1,\s+50\] loss")
            ctrl_c.first.wait_for(r"^MLflow run [0-9a-f]{32} ")  # opened in the background
            ctrl_c.runs = ctrl_c.store.runs()
            ctrl_c.first.proc.send_signal(signal.SIGINT)
        if cut:
            cut.result = cut.first.result()
            cut.runs = cut.store.runs()
            if cut.runs:  # else its test fails on what `first` did
                cut.then = cut.store.start_cli("resume", cut.runs[-1].info.run_id)
        whole, whole_run = new_store("whole"), Ended(0, "", "")
        if cut:  # only "cut" is compared with it
            env = {"MLFLOW_TRACKING_URI": whole.uri}
            whole_run = run_in_process(*train(), "hydra.run.dir=whole", cwd=whole.cwd, env=env)
        yield Started(scenarios, whole, whole_run)
    finally:
        for scenario in scenarios.values():
            for command in (scenario.first, scenario.then):
                if command is not None:
                    command.stop()


# ---------------------------------------------------------------- signals and exact resume
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(started: Started) -> None:
    if signal_ignored(signal.SIGTERM):
        pytest.skip("SIGTERM is ignored here, so the command would ignore it too")
    cut, whole = started.scenarios["cut"], started.whole
    assert cut.result.returncode == 143, cut.result.stdout + cut.result.stderr
    [interrupted] = cut.runs
    assert interrupted.info.status == "KILLED"
    assert (cut.store.cwd / "cut" / "checkpoint.pt").is_file()

    ok(cut.then.result())  # resume
    [final] = cut.store.runs()  # resume continues the same MLflow run
    assert final.info.run_id == interrupted.info.run_id
    assert final.info.status == "FINISHED"

    assert started.whole_run.returncode == 0, started.whole_run.stderr
    [uninterrupted] = whole.runs()
    for key in ("train/loss", "train/loss_epoch", "val/loss", "val/acc", "test/loss", "test/acc"):
        expected = whole.history(uninterrupted.info.run_id, key)
        assert cut.store.history(final.info.run_id, key) == expected, key
    a = torch.load(whole.cwd / "whole" / "checkpoint.pt", weights_only=True)["model"]
    new_dir = Path(final.data.tags["checkpoint"]).parent
    b = torch.load(new_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights must be bit-identical"


def test_ctrl_c_exits_130_and_the_run_ends_killed_with_what_it_logged(started: Started) -> None:
    if signal_ignored(signal.SIGINT):
        pytest.skip("SIGINT is ignored here, so the command would ignore it too")
    ctrl_c = started.scenarios["ctrl_c"]
    result = ctrl_c.first.result()
    assert [r.info.status for r in ctrl_c.runs] == ["RUNNING"]  # one run, open while it trained
    assert result.returncode == 130, result.stdout + result.stderr
    [run] = ctrl_c.store.runs()
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    steps = [step for step, _ in ctrl_c.store.history(run.info.run_id, "train/loss")]
    assert steps[:2] == [25, 50]  # what it logged is kept
    assert checkpoints.load(ctrl_c.store.cwd / "cut" / "checkpoint.pt")["progress"]["step"] >= 50


def test_rerunning_a_sweep_skips_finished_jobs(
    main_in_process, empty_store_file: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """Both sweeps in this process (conftest's main_in_process), one after the other."""
    shutil.copy(empty_store_file, tmp_path / "mlflow.db")  # the test's store (MLFLOW_TRACKING_URI)
    first = main_in_process(*SWEEP)
    assert first.returncode == 0, first.stderr
    second = main_in_process(*SWEEP)  # the same sweep again
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already finished") + second.stderr.count("already finished") == 2
    runs = Store(mlflow_store).runs()
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert len(children) == 2, "no job ran twice"
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 2
    linked = [k for k in parents[-1].data.tags if k.startswith("linked/")]
    assert sorted(k.removeprefix("linked/") for k in linked) == sorted(c.info.run_id for c in children)


# ---------------------------------------------------------------- resume never harms (#12)
TRAIN = [  # 1600 training images (200 steps an epoch) and 160 held out for validation
    "dataset=synthetic",
    "dataset.train_size=1760",
    "dataset.val_size=160",
    "dataset.test_size=200",
    "trainer.batch_size=8",
    "trainer.epochs=3",
    "trainer.log_every_n_steps=25",
    "optimizer.lr=0.01",
    "device=cpu",
]


def _env(store: Path) -> dict[str, str]:
    return cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db")


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


def test_resume_leaves_a_finished_run_alone_unless_asked_to_train_it_further(
    tmp_path: Path, main_in_process, monkeypatch: pytest.MonkeyPatch, empty_store_file: Path
) -> None:
    """Each command in this process (conftest's main_in_process), one after another on one store."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(empty_store_file, store / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    # 400 training images in batches of 8: 50 steps an epoch, the loss logged every 25
    short = main_in_process(*TRAIN, "dataset.train_size=560", "trainer.epochs=1")
    assert short.returncode == 0, short.stderr
    (run,) = _runs(store)
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    before = _snapshot(client, run.info.run_id)

    again = main_in_process("resume", run.info.run_id)  # the typo of issue 12
    assert again.returncode != 0
    said = [line for line in again.stderr.splitlines() if "already FINISHED" in line]
    assert len(said) == 1 and "trainer.epochs=2" in said[0], again.stderr
    assert "Traceback" not in again.stderr
    assert _snapshot(client, run.info.run_id) == before, "a refused resume changes nothing"

    longer = main_in_process("resume", run.info.run_id, "trainer.epochs=2")
    assert longer.returncode == 0, longer.stderr
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert [s for s, _ in _history(store, run.info.run_id, "val/acc")] == [50, 100]  # appended
    assert [s for s, _ in _history(store, run.info.run_id, "test/acc")] == [50, 100]  # each end's test
    losses = [s for s, _ in _history(store, run.info.run_id, "train/loss")]
    assert losses == list(range(25, 101, 25)), "each step once"
    assert after.data.params == before[2], "params stay as first recorded"
    assert after.data.tags[resumption.EPOCHS_TAG] == "2"
    again = main_in_process("resume", run.info.run_id)  # it ran 2 epochs now
    assert "already FINISHED its 2 epoch(s)" in again.stderr, again.stderr


# ---------------------------------------------------------------- what resume may do, from the store
def _snapshot(client: MlflowClient, run_id: str) -> tuple:
    """Everything a user sees of a run: status, end, params, tags, every metric point."""
    run = client.get_run(run_id)
    points = {
        key: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    return run.info.status, run.info.end_time, run.data.params, run.data.tags, points


@pytest.fixture(scope="module")
def recorded(compose_config, tmp_path_factory: pytest.TempPathFactory, empty_store_file: Path):
    """make(status, tags) records a run as training 2 epochs of 10 steps leaves it (its params,
    train/loss every 5 steps, test/acc per epoch); returns (config, client, make). One store for
    the module: creating one takes seconds (copied: conftest's empty_store_file)."""
    from mlflow.entities import Metric, Param
    from omegaconf import OmegaConf

    folder = tmp_path_factory.mktemp("resume")
    shutil.copy(empty_store_file, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    cfg = compose_config("dataset=synthetic", "trainer.epochs=2", "device=cpu", f"mlflow.tracking_uri={uri}")
    params = identity.flatten(OmegaConf.to_container(cfg, resolve=True))
    client = MlflowClient(uri)
    experiment = client.create_experiment("cifar_exp")

    def make(status: str, tags: dict[str, str] | None = None) -> str:
        run_id = client.create_run(experiment, tags=tags or {}).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        points = [Metric("train/loss", 1 / s, 0, s) for s in (5, 10, 15, 20)]
        client.log_batch(run_id, [*points, Metric("test/acc", 0.5, 0, 10), Metric("test/acc", 0.6, 0, 20)])
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    return cfg, client, make


DONE = {"epoch": 3, "epoch_step": 0, "step": 20}  # a checkpoint after both epochs


@pytest.mark.parametrize(
    "status, overrides, progress, said",
    [
        ("FAILED", {}, DONE, "FAILED"),
        ("FINISHED", {}, DONE, "already FINISHED its 2 epoch(s)"),
        ("FINISHED", {"trainer": {"epochs": 1}}, DONE, "already FINISHED"),
        ("KILLED", {"optimizer": {"lr": 0.5}}, DONE, "optimizer.lr=0.001 -> 0.5"),
        ("KILLED", {"trainer": {"epochs": 1}}, {"epoch": 2, "epoch_step": 3, "step": 13}, "fewer than"),
        ("RUNNING", {}, DONE, "is being continued by process"),
        ("KILLED", {}, DONE, "is being continued by process"),  # taken, not yet reopened
    ],
)
def test_a_resume_that_cannot_proceed_says_why_and_changes_nothing(
    recorded, status: str, overrides: dict, progress: dict, said: str
) -> None:
    from omegaconf import OmegaConf

    cfg, client, make = recorded
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # cifar_exp"])
    try:
        held = leases.Lease(f"{socket.gethostname()}:{alive.pid}", "a", time.time() + 60)
        run_id = make(status, held.tag() if "continued" in said else {})  # a live process holds it
        before = _snapshot(client, run_id)
        with pytest.raises(UserError, match=re.escape(said)) as error:
            resumption.check(OmegaConf.merge(cfg, overrides), run_id, run_id, progress)
    finally:
        alive.kill()
        alive.wait()
    assert "\n" not in str(error.value) and "nothing was changed" in str(error.value)
    assert _snapshot(client, run_id) == before


def test_a_checkpoint_of_another_run_is_refused(recorded) -> None:
    cfg, _, make = recorded
    with pytest.raises(UserError, match="belongs to run"):
        resumption.check(cfg, make("KILLED"), make("KILLED"), DONE)


def test_resume_continues_a_killed_process_and_trains_a_finished_run_further(recorded) -> None:
    from omegaconf import OmegaConf

    cfg, client, make = recorded
    gone = subprocess.Popen([sys.executable, "-c", "pass  # cifar_exp"])
    gone.wait()
    # SIGKILLed after its checkpoint at step 10, with train/loss 15, 20 and test/acc 20 recorded;
    # what was logged at the checkpoint's own step (the end's test metrics are) is not logged again
    run_id = make("RUNNING", leases.Lease(f"{socket.gethostname()}:{gone.pid}", "b", time.time() + 60).tag())
    plan = resumption.check(cfg, run_id, run_id, {"epoch": 2, "epoch_step": 0, "step": 10})
    assert plan.run_id == run_id and plan.tags == {}
    assert plan.recorded == {
        ("train/loss", 10),
        ("test/acc", 10),
        ("train/loss", 15),
        ("train/loss", 20),
        ("test/acc", 20),
    }

    finished = make("FINISHED")
    plan = resumption.check(OmegaConf.merge(cfg, {"trainer": {"epochs": 3}}), finished, finished, DONE)
    assert plan.tags == {resumption.EPOCHS_TAG: "3"}
    assert plan.recorded == {("train/loss", 20), ("test/acc", 20)}  # its end, never logged again


def test_a_resumed_run_records_only_the_points_the_store_lacks() -> None:
    class Client:
        points: list = []

        def log_batch(self, run_id: str, metrics: list, params: list, tags: list = ()) -> None:
            self.points += [(m.key, m.step) for m in metrics]

    writer = RecordWriter(Client(), "run", recorded={("train/loss", 15), ("test/acc", 20)})
    writer.log_metrics({"train/loss": 1.0}, 15)
    writer.log_metrics({"train/loss": 1.0, "test/acc": 0.5, "test/loss": 2.0}, 20)
    writer.close()
    assert Client.points == [("train/loss", 20), ("test/loss", 20)]


def test_metrics_are_flushed_before_a_checkpoint_and_it_is_named_after(tmp_path: Path) -> None:
    path, events = tmp_path / "checkpoint.pt", []
    write = checkpoints.writer(
        path,
        run_id=lambda: "abc123",
        before=lambda: events.append(("flush", path.exists())),
        after=lambda written: events.append(("tag", written.exists())),
    )
    write(dict.fromkeys(checkpoints.LOOP_KEYS))
    assert events == [("flush", False), ("tag", True)]


# ---------------------------------------------------------------- preemption under submitit
def test_a_preemption_signal_checkpoints_first_then_hands_the_job_to_submitit() -> None:
    """submitit's handler of SIGUSR2 would requeue at once, mid-step; held, the signal is a
    deferred stop (the loop finishes its step and checkpoints), raised as Preempted, whose
    requeue() then calls submitit's handler."""
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    try:
        signals.hold_preemption()
        signals.hold_preemption()  # once only
        with pytest.raises(signals.Preempted) as stop:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGUSR2)
                assert requeued == []  # not yet: the step finishes
                taken = signals.take()
                assert isinstance(taken, signals.Preempted) and isinstance(taken, KeyboardInterrupt)
                raise taken  # what the loop does after its checkpoint
        stop.value.requeue()
        assert requeued == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_without_submitit_the_preemption_signal_is_left_alone() -> None:
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    signals.hold_preemption()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


@pytest.mark.slow
def test_a_preempted_submitit_job_ends_killed_and_its_requeued_job_finishes_the_same_run(
    tmp_path: Path,
) -> None:
    """hydra/launcher=submitit_local: SIGUSR2 (what SLURM sends before preempting or at the time
    limit) to the job process mid-epoch; submitit_local requeues by itself (exit code 144)."""
    store = tmp_path / "store"
    args = [*TRAIN, "trainer.epochs=2", "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep", "-m"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_exp", *args],
        cwd=tmp_path,
        env=_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    jobs, deadline, statuses = tmp_path / "sweep" / ".submitit", time.monotonic() + 300, []
    while proc.poll() is None and not statuses:
        for log in jobs.glob("*/*_0_log.out"):  # <job id>/<job id>_0_log.out; the job id: its controller
            text = log.read_text()
            if "[1,    50]" in text and "MLflow run " in text:  # training, with the run open
                controller = log.parent.name
                (task,) = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
                os.kill(int(task), signal.SIGUSR2)
                run_id = re.search(r"MLflow run ([0-9a-f]{32})", text)[1]
                client = MlflowClient(f"sqlite:///{store}/mlflow.db")
                while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
                    time.sleep(0.05)
                statuses.append(client.get_run(run_id).info.status)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    log = next(jobs.glob("*/*_0_log.out")).read_text()
    assert statuses == ["KILLED"], log  # read between the job's end and its requeued start
    assert "Requeued job" in log and f"resumed from {run_id}" in log, log
    runs = [r for r in _runs(store) if r.data.tags.get("sweep") != "true"]
    assert [r.info.run_id for r in runs] == [run_id], "the requeued job resumed the same run"
    assert runs[0].info.status == "FINISHED"
    losses = [s for s, _ in _history(store, run_id, "train/loss")]
    assert losses == list(range(25, 401, 25)), "each step once, none lost"


# ---------------------------------------------------------------- bad numbers, sweeps


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_with_nothing_lost_or_twice(tmp_path: Path) -> None:
    """benchmarks/kill_resume.py with a few kills (the README's figures come from 24 or more)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_resume.py"
    args = ["--kills", "4", "--per-run", "2", "--early", "1", "--concurrent", "1", "--seed", "1"]
    args += ["--keep", str(tmp_path / "kills")]
    result = subprocess.run(
        [sys.executable, str(script), *args], env=_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metric points lost: 0, duplicated: 0, differing: 0" in result.stdout, result.stdout
    assert "store corruptions: 0" in result.stdout, result.stdout
    early = r"killed before the first checkpoint: tried 1, opened (\d), closed \1, orphans 0"
    assert re.search(early, result.stdout), result.stdout
    assert "resumed twice at once: tried 1, one trained 1, other refused 1" in result.stdout, result.stdout


# ---------------------------------------------------------------- one writer per run; no run RUNNING forever
def test_of_two_processes_taking_a_run_at_once_one_holds_it(recorded) -> None:
    """Both write their lease, then read it back: the one whose write landed last holds it, the
    other refuses in one line. A lease whose owner is gone is taken over; one renewed is kept."""
    import threading

    _, client, make = recorded
    run_id = make("KILLED")
    outcomes: list[object] = []

    def take() -> None:
        try:
            outcomes.append(leases.take(MlflowClient(client.tracking_uri), run_id))
        except UserError as e:
            outcomes.append(str(e))

    takers = [threading.Thread(target=take) for _ in range(2)]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join()
    (held,) = [o for o in outcomes if isinstance(o, leases.Lease)]
    (refused,) = [o for o in outcomes if isinstance(o, str)]
    assert "is being continued by process" in refused and "\n" not in refused
    assert leases.Lease.of(client.get_run(run_id).data.tags).token == held.token
    assert leases.heartbeat(held)(client, run_id) is None  # renewed: still its own
    rival = leases.Lease("elsewhere:1", "rival", time.time() + 60)
    client.set_tag(run_id, leases.LEASE_TAG, rival.tag()[leases.LEASE_TAG])
    assert leases.heartbeat(held)(client, run_id) == "elsewhere:1"  # taken over: it stops writing


def test_runs_whose_process_died_are_closed_killed_and_live_ones_left_alone(recorded, capsys) -> None:
    _, client, make = recorded
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here, now = socket.gethostname(), time.time()
    owners = {
        "killed here": leases.Lease(f"{here}:{gone.pid}", "a", now + 60),
        "silent elsewhere": leases.Lease("elsewhere:1", "b", now - 1),  # its heartbeat stopped
        "training here": leases.Lease(f"{here}:{os.getpid()}", "c", now + 60),
        "training elsewhere": leases.Lease("elsewhere:2", "d", now + 60),
    }
    ids = {name: make("RUNNING", lease.tag()) for name, lease in owners.items()}
    assert commands.dispatch("sync", ["--stale", "--tracking-uri", client.tracking_uri], None) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if any(i in line for i in ids.values())]
    closed = {name for name, run_id in ids.items() if any(run_id in line for line in said)}
    assert closed == {"killed here", "silent elsewhere"} and len(said) == 2, said
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        assert run.info.status == ("KILLED" if name in closed else "RUNNING"), name
        if name in closed:
            assert run.data.tags["error"].startswith(f"its process {owners[name].owner} stopped"), name
            assert run.info.end_time <= time.time() * 1000


def test_a_run_resumed_to_finished_loses_its_interruption_tags(recorded) -> None:
    _, client, make = recorded
    run_id = make("KILLED", {"error": "interrupted (Ctrl-C or SIGTERM)"})
    writer = RecordWriter(MlflowClient(client.tracking_uri), run_id)
    runs._end(writer, leases.new_lease(), "FINISHED", None, cleared=("error",))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert not leases.Lease.of(run.data.tags).alive()  # released at the end


@pytest.mark.slow
def test_two_resumes_at_once_one_trains_and_a_kill_before_the_first_checkpoint_is_closed(
    tmp_path: Path,
) -> None:
    """Two `cifar-exp resume RUN_ID` started together on a KILLED run: one trains it to FINISHED
    (its interruption's tag gone), the other refuses in one line; no step is recorded twice. A run
    killed -9 before its first checkpoint is closed KILLED by the next `cifar-exp runs`."""
    store = tmp_path / "store"
    ok(_cli(TRAIN + ["trainer.epochs=1"], tmp_path, store))
    (run,) = _runs(store)
    run_id = run.info.run_id
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    client.set_terminated(run_id, "KILLED")
    client.set_tag(run_id, "error", "interrupted (Ctrl-C or SIGTERM)")
    args = [sys.executable, "-m", "cifar_exp", "resume", run_id, "trainer.epochs=2"]
    both = [
        subprocess.Popen(
            args, cwd=tmp_path, env=_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(300), *p.communicate()) for p in both]
    assert sorted(code != 0 for code, _, _ in results) == [False, True], results
    (refused,) = [err for code, _, err in results if code != 0]
    lines = [line for line in refused.splitlines() if not line.startswith("Error executing job")]  # Hydra's
    assert len(lines) == 1 and "is being continued by process" in lines[0], refused
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and "error" not in after.data.tags
    for key in ("train/loss", "test/acc"):
        steps = [s for s, _ in _history(store, run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [s for s, _ in _history(store, run_id, "test/acc")] == [200, 400]

    killed = subprocess.Popen(
        [sys.executable, "-m", "cifar_exp", *TRAIN, "trainer.epochs=50", "trainer.batch_size=1"],
        cwd=tmp_path,
        env=_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in killed.stdout:  # the run is open; its first epoch (1600 steps) far from done
        if re.match(r"^MLflow run [0-9a-f]{32} ", line):
            break
    killed.kill()
    killed.wait()
    listed = ok(_cli(["runs"], tmp_path, store))
    orphan = next(r for r in _runs(store) if r.info.run_id != run_id)
    assert f"closed run {orphan.info.run_id}" in listed.stderr, listed.stderr
    assert orphan.info.status == "KILLED" and orphan.data.tags["error"].startswith("its process")
    assert "checkpoint" not in orphan.data.tags


@pytest.mark.slow
def test_a_search_killed_at_random_moments_keeps_one_child_per_trial(tmp_path: Path) -> None:
    """benchmarks/kill_resume.py --search-kills: the controller SIGKILLed, the same command run
    again until the search completes; one child per trial, none RUNNING, one best trial."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_resume.py"
    args = ["--kills", "0", "--early", "0", "--concurrent", "0", "--search-kills", "2", "--seed", "3"]
    result = subprocess.run(
        [sys.executable, str(script), *args], env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = re.search(r"^search controller killed: 2 kills landed .*$", result.stdout, re.M)
    assert summary, result.stdout
    for zero in ("duplicated 0", "missing 0", "orphans 0", "disagreeing 0", "tracebacks 0"):
        assert zero in summary[0], summary[0]
