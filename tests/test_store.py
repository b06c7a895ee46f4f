"""The store itself: one that cannot be written or is nearly full stops a run before training, in one
line; one that is busy or stops answering mid-run never stops training. RecordWriter retries with
backoff and writes what piled up once the store answers again; what the store still does not take
goes to <run folder>/unrecorded_metrics.jsonl with a line naming it, and the run still ends;
`cifar-exp sync` records it afterwards, each step once. MLflow's own HTTP retries are bounded.

The writer is tested in-process against fake clients (cheap); the check before training in two
subprocesses started together; a real `mlflow server` killed mid-run is the one slow test."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, Store, start_cli, synthetic, wait_until
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from cifar_exp import commands
from cifar_exp.errors import UserError
from cifar_exp.tracking import leases, records, runs, sync
from cifar_exp.tracking import store as tracking_store
from cifar_exp.tracking.records import RecordWriter

TINY = synthetic(train=320, test=100, epochs=2, batch=32, log_every=5)


# ---------------------------------------------------------------- RecordWriter against fake stores
class FlakyClient:
    """A store client whose log_batch raises `error` while `down()` is true, else records the batch."""

    def __init__(self, down: Any, error: Exception | None = None) -> None:
        self.down = down
        self.error = error or ConnectionError("Connection refused")
        self.calls = 0
        self.batches: list[tuple[list, list]] = []

    def log_batch(self, run_id: str, metrics: list, params: list, tags: list = ()) -> None:
        self.calls += 1
        if self.down():
            raise self.error
        self.batches.append((metrics, params))

    def metrics(self) -> list[tuple[str, int, float]]:
        return [(m.key, m.step, m.value) for ms, _ in self.batches for m in ms]

    def params(self) -> dict[str, str]:
        return {p.key: p.value for _, ps in self.batches for p in ps}


def _fill(writer: RecordWriter, steps: range) -> list[tuple[str, int, float]]:
    """What a training loop logs: a loss per step and an accuracy every 10th; returns it, in order."""
    logged = []
    for step in steps:
        values = {"train/loss": 1 / step} | ({"test/acc": step / 100} if step % 10 == 0 else {})
        writer.log_metrics(values, step)
        logged += [(key, step, value) for key, value in values.items()]
    return logged


def _training(writer: RecordWriter, steps: range) -> list[tuple[str, int, float]]:
    """_fill as the training loop does it, which must return while the store is still down."""
    logged: list[tuple[str, int, float]] = []
    loop = threading.Thread(target=lambda: logged.extend(_fill(writer, steps)))
    loop.start()
    loop.join(60)  # generous: it takes milliseconds unless it waits for the store
    assert not loop.is_alive(), "the training loop waited for the store"
    return logged


def test_a_store_that_comes_back_gets_everything_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Down until the test brings it back: the training loop goes on meanwhile, and once the store
    answers it gets everything, in order, and the user reads that nothing was lost."""
    state = {"down": True}
    client = FlakyClient(down=lambda: state["down"])
    spill = tmp_path / "unrecorded_metrics.jsonl"
    writer = RecordWriter(client, "run", spill, retry_s=600)  # far longer than this outage
    writer.log_params({"model.conv1_out": "8", "seed": "0"})
    logged = _training(writer, range(1, 101))
    wait_until(lambda: client.calls >= 2, what="a second try")  # it retries while down...
    logged += _training(writer, range(101, 201))  # ...and the rest of the run piles up meanwhile
    assert not client.batches
    state["down"] = False
    assert writer.close() is None
    assert client.metrics() == logged
    assert client.params() == {"model.conv1_out": "8", "seed": "0"}
    assert writer.unrecorded == 0 and not writer.down
    assert not spill.exists()
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2 and "does not answer" in said[0] and "answers again; nothing was lost" in said[1], (
        said
    )


def test_a_store_that_never_comes_back_leaves_everything_in_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = FlakyClient(down=lambda: True)
    spill = tmp_path / "outputs" / "unrecorded_metrics.jsonl"
    writer = RecordWriter(client, "run-1", spill, retry_s=0.6)
    with caplog.at_level(logging.WARNING, logger="cifar_exp.tracking"):
        writer.log_params({"optimizer.lr": "0.01"})
        logged = _fill(writer, range(1, 51))
        assert writer.close() == "Connection refused"
    assert client.calls > 1  # retried, then gave up
    assert writer.down and writer.unrecorded == len(logged) + 1

    lines = [json.loads(line) for line in spill.read_text().splitlines()]
    assert {line["run_id"] for line in lines} == {"run-1"}
    assert [(x["param"], x["value"]) for x in lines if "param" in x] == [("optimizer.lr", "0.01")]
    assert [(x["metric"], x["step"], x["value"]) for x in lines if "metric" in x] == logged
    assert all(isinstance(x["timestamp"], int) for x in lines if "metric" in x)

    said = [r.getMessage() for r in caplog.records]
    naming = [m for m in said if str(spill.parent) in m]
    assert naming and all("\n" not in m for m in said) and "answers again" not in str(said), said
    assert any("Connection refused" in m for m in naming), said


def test_after_giving_up_it_records_again_when_the_store_answers(tmp_path: Path) -> None:
    state = {"down": True}
    client = FlakyClient(down=lambda: state["down"])
    spill = tmp_path / "unrecorded_metrics.jsonl"
    writer = RecordWriter(client, "run", spill, retry_s=0.3)
    early = _fill(writer, range(1, 11))
    wait_until(spill.exists, what="the writer to give up")
    assert writer.down
    state["down"] = False
    late = _fill(writer, range(11, 21))
    assert writer.close() == "Connection refused"
    assert client.metrics() == late  # recorded once it answered
    kept = [(x["metric"], x["step"], x["value"]) for x in map(json.loads, spill.read_text().splitlines())]
    assert kept == early  # the rest, in the file: nothing lost, nothing twice
    assert not writer.down


class FlakyServer(FlakyClient):
    """A FlakyClient that takes files too, and refuses them while down, as a tracking server does."""

    def __init__(self, down: Any) -> None:
        super().__init__(down)
        self.uploads: list[str] = []

    def log_artifacts(self, run_id: str, local_dir: str) -> None:
        self.calls += 1
        if self.down():
            raise self.error
        files = [p for p in Path(local_dir).rglob("*") if p.is_file()]
        self.uploads += sorted(p.relative_to(local_dir).as_posix() for p in files)


def test_an_outage_met_by_a_file_upload_does_not_hold_up_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Since the run opens in the background, the first record to meet an outage is often a file
    (the config, the sample images), still retrying when training reaches its first checkpoint: the
    flush before it does not wait for that upload, the outage is said once, and once the store
    answers it gets the files and every metric."""
    state = {"down": True}
    client = FlakyServer(down=lambda: state["down"])
    writer = RecordWriter(client, "run", tmp_path / records.UNRECORDED_METRICS, 600, uri="http://127.0.0.1:9")
    writer.log_files({"figures/train_samples.png": b"png"}, "the sample images")
    wait_until(lambda: client.calls >= 2, what="a second try")  # retrying the upload...
    logged = _training(writer, range(1, 101))
    checkpoint = threading.Thread(target=writer.flush)  # ...when the first checkpoint comes
    checkpoint.start()
    checkpoint.join(60)  # generous: it returns at once unless it waits for the store
    assert not checkpoint.is_alive(), "the flush before a checkpoint waited for the store"
    state["down"] = False
    assert writer.close() is None
    assert client.uploads == ["figures/train_samples.png"] and client.metrics() == logged
    assert not (tmp_path / records.UNRECORDED_METRICS).exists()
    assert not (tmp_path / records.UNRECORDED_ARTIFACTS).exists()
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2 and "nothing was lost" in said[1], said
    assert said[0].startswith("MLflow: http://127.0.0.1:9 does not answer (Connection refused)"), said


def test_a_refusal_is_not_retried(tmp_path: Path) -> None:
    refused = MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    client = FlakyClient(down=lambda: True, error=refused)
    spill = tmp_path / "unrecorded_metrics.jsonl"
    writer = RecordWriter(client, "run", spill, retry_s=30)
    writer.log_params({"seed": "1"})
    assert writer.close() == "Changing param values is not allowed"
    assert client.calls == 1
    assert json.loads(spill.read_text()) == {"run_id": "run", "param": "seed", "value": "1"}


@pytest.mark.parametrize(
    ("error", "passes"),
    [
        (ConnectionError("refused"), True),
        (TimeoutError(), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed"), True),
        (MlflowException("Changing param values is not allowed", INVALID_PARAMETER_VALUE), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (ValueError("bad"), False),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Exception) else str(x),
)
def test_which_errors_are_retried(error: Exception, passes: bool) -> None:
    assert tracking_store.transient(error) is passes


def test_retrying_waits_out_a_busy_store_and_raises_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []  # what this thread asked to sleep: the backoff, not a measurement
    sleep = time.sleep

    def recorded_sleep(seconds: float) -> None:
        if threading.current_thread() is threading.main_thread():
            waits.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", recorded_sleep)
    calls = []

    def locked_twice() -> str:
        calls.append("try")
        if len(calls) < 3:
            raise MlflowException("database is locked", TEMPORARILY_UNAVAILABLE)
        return "written"

    assert tracking_store.retrying(locked_twice, "writing", retry_s=10) == "written"
    assert len(calls) == 3 and waits == [tracking_store.FIRST_RETRY_S, 2 * tracking_store.FIRST_RETRY_S]
    waits.clear()
    with pytest.raises(ValueError):
        tracking_store.retrying(lambda: int("x"), "writing", retry_s=10)
    assert waits == []  # not retried
    with pytest.raises(ConnectionError):  # still failing once retry_s has passed
        tracking_store.retrying(
            lambda: (_ for _ in ()).throw(ConnectionError("down")), "writing", retry_s=0.5
        )


def test_a_dead_store_delays_the_end_of_a_run_by_at_most_end_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run never opened (the store refused every connection, retried for up to 60 s while
    training went on): its end waits at most END_WAIT_S more, then everything is in the folder and
    the last line names the sync command. Bounded by the writer's own rule, not measured."""
    monkeypatch.setattr(records, "END_WAIT_S", 0.5)  # the rule, not its 3 s: they would only be waited

    def dead() -> tuple[Any, str]:
        raise ConnectionError("Connection refused")

    writer = RecordWriter(spill_path=tmp_path / records.UNRECORDED_METRICS, retry_s=60, opener=dead, uri="X")
    writer.log_params({"seed": "0"})
    writer.log_metrics({"test/acc": 0.5}, 10)
    writer.log_files({"model/state_dict.pt": b"weights"}, "the weights")
    assert writer.wait_open() is None  # a checkpoint does not wait for the store
    started = time.monotonic()
    runs._end(writer, leases.new_lease(), "FINISHED", None)
    assert time.monotonic() - started < records.END_WAIT_S + 5  # + one backoff step, generously
    lines = [json.loads(line) for line in (tmp_path / records.UNRECORDED_METRICS).read_text().splitlines()]
    assert [x["status"] for x in lines if "status" in x] == ["FINISHED"]
    assert (tmp_path / records.UNRECORDED_ARTIFACTS / "model" / "state_dict.pt").read_bytes() == b"weights"


# ---------------------------------------------------------------- the check before training
def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_store_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")  # works as root too: no folder can be made under a file
    folder = tmp_path / "a_file" / "mlruns"
    with pytest.raises(UserError) as error:
        tracking_store.check_store(folder, f"sqlite:///{folder}/mlflow.db", 100)
    assert str(folder) in _one_line(error) and "cannot be written" in str(error.value)


def test_a_read_only_store_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mlruns"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through chmod 555: make the write itself fail instead
        denied = PermissionError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(tempfile, "mkstemp", lambda **kwargs: (_ for _ in ()).throw(denied))
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(UserError) as error:
            tracking_store.check_store(folder, f"sqlite:///{folder}/mlflow.db", 100)
    finally:
        folder.chmod(0o755)
    assert str(folder) in _one_line(error) and "cannot be written" in str(error.value)


def test_a_read_only_database_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"")
    if os.geteuid() == 0:
        opened = Path.open

        def read_only(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if self == database and mode != "r":
                raise PermissionError(errno.EACCES, "Permission denied")
            return opened(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", read_only)
    else:
        database.chmod(0o444)
    with pytest.raises(UserError) as error:
        tracking_store.check_store(tmp_path, f"sqlite:///{database}", 100)
    assert str(database) in _one_line(error) and "Permission denied" in str(error.value)


def test_a_nearly_full_disk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=42 * 2**20))
    with pytest.raises(UserError) as error:
        tracking_store.check_store(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", 100)
    assert "42 MB free" in _one_line(error) and "mlflow.min_free_mb=100" in str(error.value)
    tracking_store.check_store(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", 10)  # enough for a lower bar
    assert [p.name for p in tmp_path.iterdir()] == []  # the probe leaves nothing behind


def test_only_local_stores_are_checked() -> None:
    assert tracking_store.local_store_folder("sqlite:////data/mlruns/mlflow.db") == Path("/data/mlruns")
    assert tracking_store.local_store_folder("file:///data/mlruns") == Path("/data/mlruns")
    assert tracking_store.local_store_folder("http://127.0.0.1:5000") is None
    assert tracking_store.local_store_folder("postgresql://user@host/db") is None


REFUSED = {
    # a run against a store under a regular file
    "unwritable": ("a_file/mlruns/mlflow.db", TINY),
    # a sweep that asks for more free space than any disk has
    "sweep_full": ("s/mlflow.db", [*TINY, "mlflow.min_free_mb=1000000000", "seed=0,1", "-m"]),
}


@pytest.mark.parametrize(
    ("case", "said"),
    [("unwritable", "cannot be written"), ("sweep_full", "MB free")],
)
def test_a_bad_store_stops_the_run_before_training(
    main_in_process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, said: str
) -> None:
    """Through the front door in this process (tests/test_errors.py runs one mistake as a command).
    (The messages of each check: the tests above.)"""
    (tmp_path / "a_file").write_text("")
    store, args = REFUSED[case]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / store}")
    result = main_in_process(*args)
    root = tmp_path
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    assert said in result.stderr and "mlflow.tracking_uri" in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if said in line]) == 1
    assert "loss" not in result.stdout and "Accuracy of the network" not in result.stdout  # no training
    assert not list(root.rglob("checkpoint.pt"))
    if case == "sweep_full":  # stopped before launching any job
        assert "Launching" not in result.stdout + result.stderr


# ---------------------------------------------------------------- after an outage: cifar-exp sync
class DeadClient:
    """A store client to a server that is gone: every call is refused."""

    def __getattr__(self, name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("Connection refused")

        return refused


def _outage(folder: Path, run_id: str | None, status: str = "FINISHED") -> None:
    """A run's end as the store saw none of it: train/loss at steps 5-20 and a param, the weights,
    the `unrecorded` tag and the run's end; all of it in `folder` (run_id None: never opened)."""
    opener = None
    if run_id is None:

        def opener() -> tuple[Any, str]:
            raise ConnectionError("Connection refused")

    writer = RecordWriter(DeadClient(), run_id, folder / records.UNRECORDED_METRICS, 0.2, opener=opener)
    writer.log_params({"data": "synthetic"})
    if run_id is not None:
        for step in (5, 10, 15, 20):
            writer.log_metrics({"train/loss": 1 / step}, step)
    writer.log_files({"model/state_dict.pt": b"weights"}, "the weights")
    runs._end(writer, leases.new_lease(), status, None if status == "FINISHED" else "interrupted")


def test_sync_records_what_an_outage_left_into_its_run_once(tmp_path: Path, mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("cifar_exp", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "train/loss", 1 / 5, step=5)  # recorded before the store went away
    folder = tmp_path / "outputs" / "run"
    _outage(folder, run_id)
    client.set_tag(run_id, "unrecorded", "5 metrics and params; they are in ...")  # as a sweep's end sets

    assert commands.dispatch("sync", [str(tmp_path / "outputs")], hydra_main=None) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time
    points = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(points) == [(s, 1 / s) for s in (5, 10, 15, 20)], "each step once"
    assert run.data.params == {"data": "synthetic"}
    assert "unrecorded" not in run.data.tags and "synced" in run.data.tags
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/state_dict.pt"]
    assert not (folder / records.UNRECORDED_METRICS).exists()
    assert (folder / (records.UNRECORDED_METRICS + sync.SYNCED)).is_file()
    assert (folder / (records.UNRECORDED_ARTIFACTS + sync.SYNCED) / "model" / "state_dict.pt").is_file()

    before = client.get_run(run_id).data, client.get_metric_history(run_id, "train/loss")
    assert sync.sync(None, folder) == []  # nothing left to sync
    spilled = folder / (records.UNRECORDED_METRICS + sync.SYNCED)
    spilled.rename(folder / records.UNRECORDED_METRICS)  # as if a sync was cut short before marking
    (again,) = sync.sync(None, folder)
    assert again.metrics == again.params == 0 and again.skipped == 4
    after = client.get_run(run_id).data, client.get_metric_history(run_id, "train/loss")
    assert after[1] == before[1] and after[0].params == before[0].params


def test_sync_creates_a_run_that_was_never_opened(tmp_path: Path, mlflow_store: str) -> None:
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 3\nmlflow:\n  experiment_name: outage\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    _outage(folder, None, status="KILLED")
    lines = (folder / records.UNRECORDED_METRICS).read_text()
    (created,) = sync.sync(None, folder)
    assert created.created and created.status == "KILLED" and created.params == 1
    (folder / records.UNRECORDED_METRICS).write_text(lines)  # synced again: found, not created twice
    sync.sync(None, folder)

    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.run_id == created.run_id and run.info.run_name.startswith("seed=3 #")
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"
    assert run.data.params == {"data": "synthetic"}
    files = {f.path for f in client.list_artifacts(run.info.run_id, "config/hydra")}
    assert files == {"config/hydra/config.yaml", "config/hydra/overrides.yaml"}
    assert [f.path for f in client.list_artifacts(run.info.run_id, "model")] == ["model/state_dict.pt"]


# ---------------------------------------------------------------- MLflow's own HTTP retries
@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[int]]]:
    """A port that accepts connections and closes them unanswered, counting them: a tracking
    server that is gone (behind a proxy that still answers TCP)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()


def test_mlflow_retries_each_request_a_bounded_number_of_times(
    silent_server: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    for name in tracking_store.HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    # a user's value wins (here no backoff: the default's 1 + 2 s between tries only wait)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    tracking_store.limit_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "0"

    uri, accepted = silent_server
    with pytest.raises(MlflowException) as error:
        MlflowClient(uri).get_experiment_by_name("cifar_exp")
    assert tracking_store.transient(error.value)  # our own retrying takes over from here
    assert len(accepted) == 3, "one try and MLflow's 2 retries (its default: 8 tries, ~4 minutes)"


@pytest.mark.slow
def test_a_dead_server_at_the_end_of_a_run_leaves_everything_for_sync(tmp_path: Path, monkeypatch) -> None:
    """The store dies just before a run ends: the writer waits retry_s (60 s by default) for it,
    then each remaining call (the weights, the tags, the run's end) is tried once, each bounded by
    MLflow's retries (no wall-clock assert: the retry counts are tested above); everything goes to
    the run's folder for `cifar-exp sync`."""
    from mlflow.tracking import MlflowClient

    for name in [*tracking_store.HTTP_RETRY_DEFAULTS, tracking_store.RETRY_ENV]:
        monkeypatch.delenv(name, raising=False)
    tracking_store.limit_http_retries()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    writer = RecordWriter(MlflowClient(dead), "0" * 32, tmp_path / records.UNRECORDED_METRICS)
    writer.log_metrics({"test/acc": 0.5}, 100)
    writer.log_files({"model/state_dict.pt": b"weights"}, "the weights")
    runs._end(writer, leases.new_lease(), "FINISHED", None)
    lines = [json.loads(line) for line in (tmp_path / records.UNRECORDED_METRICS).read_text().splitlines()]
    assert [x["status"] for x in lines if "status" in x] == ["FINISHED"]
    assert [x["metric"] for x in lines if "metric" in x] == ["test/acc"]


# ---------------------------------------------------------------- a real tracking server, killed
@pytest.mark.slow
def test_a_server_killed_mid_run_does_not_stop_training(server: Server, tmp_path: Path) -> None:
    """Killed at the first loss line and started again once the run has said so: the run finishes,
    exit 0, and every metric is in the store (after `cifar-exp sync` if the run ended before the
    server was back). Killed for good: the run still finishes, exit 0, with its metrics in the file."""
    long = [*TINY, "dataset.train_size=6400", "trainer.epochs=3"]  # 200 steps an epoch
    env = {
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # MLflow's own retries would take minutes
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    results = {}
    # Retried for 10 minutes, far longer than the server takes to restart; or given up after 3 s.
    for name, retry_s in [("comes_back", "600"), ("gone", "3")]:
        cwd = tmp_path / name
        command = start_cli(
            *long, f"hydra.run.dir={cwd}/out", cwd=cwd, env={**env, tracking_store.RETRY_ENV: retry_s}
        )
        command.wait_for(r"^MLflow run [0-9a-f]{32} ")  # the run is open (in the background)
        command.wait_for(r"^\[1,")  # and training
        server.stop()
        if name == "comes_back":
            # the outage, noticed: by whichever record meets it first (metrics, or a file still
            # being uploaded from the background as training starts)
            command.wait_for(r"^MLflow: http.* does not answer")
            server.start().wait_until_up()
        result = command.result()
        results[name] = (result.returncode, result.stdout + result.stderr, cwd / "out")
    server.start().wait_until_up()

    store = Store(server.uri)
    by_dir = {Path(r.data.tags["hydra_output_dir"]).parent.name: r for r in store.runs()}

    code, output, folder = results["comes_back"]
    assert code == 0, output
    if (folder / records.UNRECORDED_METRICS).exists():  # it ended first: waited END_WAIT_S, not 600 s
        assert f"`cifar-exp sync {folder}`" in output, output
        assert commands.dispatch("sync", ["--tracking-uri", server.uri, str(folder)], None) == 0
    else:
        assert "answers again; nothing was lost" in output, output
    run = store.run(by_dir["comes_back"].info.run_id)
    assert run.info.status == "FINISHED", output
    steps = [step for step, _ in store.history(run.info.run_id, "train/loss")]
    assert steps == list(range(5, 3 * 200 + 1, 5)), "every step, once"

    code, output, folder = results["gone"]
    assert code == 0, output
    assert "Accuracy of the network" in output  # the training result stands
    spill = folder / records.UNRECORDED_METRICS
    said = [line for line in output.splitlines() if line.startswith("MLflow") or str(folder) in line]
    assert [line for line in said if str(folder) in line], output  # the folder is named
    assert [line for line in said if "its end" in line and f"cifar-exp sync {folder}" in line], output
    # one an event: opened, the outage noticed, metrics spilled, files kept, the checkpoint not
    # tagged (it is tagged after its first write), the count, the run's end
    assert len(said) <= 7 and all(len(line) < 600 for line in said), "\n".join(said)
    run = by_dir["gone"]
    assert run.info.status == "RUNNING"  # the store was never told otherwise
    recorded = {step for step, _ in store.history(run.info.run_id, "train/loss")}
    kept = {
        x["step"] for x in map(json.loads, spill.read_text().splitlines()) if x.get("metric") == "train/loss"
    }
    assert recorded | kept == set(range(5, 3 * 200 + 1, 5)) and not recorded & kept  # all, once
    assert (folder / records.UNRECORDED_ARTIFACTS / "model" / "state_dict.pt").is_file()


# ---------------------------------------------------------------- a store that is gone for the whole run
@pytest.fixture(scope="module")
def storeless(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """One epoch each, started together: with nothing listening on the tracking server's port,
    and with a SQLite store file that is garbage."""
    root = tmp_path_factory.mktemp("storeless")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    (root / "damaged").mkdir()
    (root / "damaged" / "mlflow.db").write_bytes(bytes(range(256)) * 16)
    stores = {"dead_port": dead, "damaged_sqlite": f"sqlite:///{root / 'damaged' / 'mlflow.db'}"}
    one_epoch = synthetic(train=320, test=100, epochs=1, batch=32, log_every=5)
    commands_ = {
        case: start_cli(
            *one_epoch, f"hydra.run.dir={root / case}/out", cwd=root / case, env={"MLFLOW_TRACKING_URI": uri}
        )
        for case, uri in stores.items()
    }
    return {
        case: (root / case / "out", command.result(), stores[case]) for case, command in commands_.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dead_port", "damaged_sqlite"])
def test_a_run_without_its_store_finishes_and_sync_records_it(
    storeless: dict, case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Training goes on, exit 0; one line names the store, one at the end the sync command, and no
    retry log nor a false "answers again"; the weights and the checkpoint are in the run's folder.
    Synced into a store that answers, the run is FINISHED with its weights: predict uses them."""
    folder, result, uri = storeless[case]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    said = [line for line in output.splitlines() if "MLflow" in line or "Retrying" in line]
    assert len(said) == 2 and uri in said[0], said
    assert said[-1].endswith(f"`cifar-exp sync {folder}` records them"), said
    assert "answers again" not in output and "Traceback" not in output
    assert len(result.stderr.splitlines()) <= 2, result.stderr
    assert (folder / "checkpoint.pt").is_file()
    assert (folder / records.UNRECORDED_ARTIFACTS / "model" / "state_dict.pt").is_file()

    synced_to = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert commands.dispatch("sync", ["--tracking-uri", synced_to, str(folder)], hydra_main=None) == 0
    (run,) = Store(synced_to).runs()
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == str(folder / "checkpoint.pt")
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    capsys.readouterr()
    assert commands.dispatch("predict", ["--tracking-uri", synced_to, run.info.run_id, str(image)], None) == 0
    assert capsys.readouterr().out.startswith(f"{image}: class_")
