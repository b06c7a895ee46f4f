"""The one test harness: a temporary MLflow store for every test; commands in a subprocess (their
environment, blocking and background runs); a real `mlflow server`; the store read back the way a
user would; Hydra's compose API; and generated datasets in the formats users bring (CIFAR-10
pickles, PNG folders)."""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
T = TypeVar("T")

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR_PER_BATCH = 20  # images per data_batch_N and in test_batch (the real files hold 10000)
SYNTHETIC_CLASSES = [f"class_{i}" for i in range(10)]  # dataset=synthetic's class names
PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file
FIGURES = {"figures/train_samples.png", "figures/test_predictions.png", "figures/confusion_matrix.png"}
RUN_ARTIFACTS = FIGURES | {  # what every tracked run records
    "config/config.yaml",
    "config/hydra/config.yaml",
    "config/hydra/hydra.yaml",
    "config/hydra/overrides.yaml",
    "tables/per_class_accuracy.md",
    "tables/per_class_accuracy.csv",
    "model/state_dict.pt",
    "model/classes.json",
}


def pytest_configure(config: pytest.Config) -> None:
    # On a shared 2-core machine torch's default of one OpenMP thread per core spins against the
    # other processes and a CNN step takes ~70x longer; one thread keeps in-process tests steady.
    torch.set_num_threads(1)


def synthetic(
    *,
    train: int = 320,
    test: int = 100,
    epochs: float = 2,
    batch: int = 32,
    log_every: int | None = 5,
    device: str | None = "cpu",
    val: int = 0,
) -> list[str]:
    """The overrides of a small run on generated data (10 classes, learnt within an epoch); on
    the CPU every machine computes the same numbers, so runs can be compared exactly. `train`
    images train; `val` more are generated and held out as the validation split (0: none, each
    epoch is evaluated on the test split)."""
    overrides = [
        "dataset=synthetic",
        f"dataset.train_size={train + val}",
        f"dataset.val_size={val}",
        f"dataset.test_size={test}",
        f"trainer.epochs={epochs}",
        f"trainer.batch_size={batch}",
    ]
    if log_every is not None:
        overrides.append(f"trainer.log_every_n_steps={log_every}")
    return overrides + ([f"device={device}"] if device else [])


# What a run prints: Hydra's job log (loss lines, epoch summaries) and the tutorial's closing report.
TOTAL = re.compile(r"^Accuracy of the network on the (\d+) test images: (\d+) %$", re.M)
PER_CLASS = re.compile(r"^Accuracy of\s+(\S+) :\s+(\d+) %$", re.M)
LOSS = re.compile(r"^\[\d+,\s+\d+\] loss: \d+\.\d+$", re.M)
EPOCH = re.compile(r"^epoch \d+/\d+: train loss [\d.]+, (val|test) loss [\d.]+, (val|test) acc [\d.]+%", re.M)


def accuracy_report(stdout: str) -> tuple[int, int, dict[str, int]]:
    """(test images, overall %, {class: %}) from the closing report; exactly one report."""
    totals = TOTAL.findall(stdout)
    assert len(totals) == 1, stdout
    per_class = {name: int(acc) for name, acc in PER_CLASS.findall(stdout)}
    return int(totals[0][0]), int(totals[0][1]), per_class


def wait_until(condition: Callable[[], T], timeout: float = 120, what: str = "the condition") -> T:
    """Polls `condition` until it returns something truthy, and returns that. The deadline is
    generous (the machine may be busy): reaching it is a failure, never a measurement."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.1)
    return value


# ---------------------------------------------------------------- the MLflow store of every test
@pytest.fixture(autouse=True, scope="session")
def session_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """No test, fixture or command tracks into the repo's mlruns/ or the user's own store."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('session_store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test (and every command it starts, unless told otherwise) tracks into tmp_path."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return uri


@pytest.fixture(autouse=True, scope="session")
def session_decoded_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded datasets are never cached in the user's ~/.cache/cifar_exp, not even by fixtures
    wider than one test (each test then gets its own folder, below)."""
    folder = tmp_path_factory.mktemp("decoded-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFAR_EXP_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def decoded_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every subprocess it starts) caches decoded datasets in its own tmp_path."""
    folder = tmp_path / "decoded-cache"
    monkeypatch.setenv("CIFAR_EXP_CACHE_DIR", str(folder))
    return folder


# ---------------------------------------------------------------- commands in a subprocess
# Never inherited by a command: sweep state (CIFAR_EXP_*), another store or MLflow's client
# settings (MLFLOW_*), HYDRA_FULL_ERROR. A test sets what it means to.
STRIPPED_ENV = ("CIFAR_EXP_", "MLFLOW_", "HYDRA_")


def cli_env(**extra: str | None) -> dict[str, str]:
    """The environment of every command a test starts: this process's less STRIPPED_ENV, this
    checkout first on the path, one torch thread (see pytest_configure; the commands share the
    cores), output unbuffered (a test watches it), tracking into this test's store; then `extra`,
    where None unsets a variable."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_ENV) or k == "CIFAR_EXP_CACHE_DIR"
    }  # the test's own decoded-dataset cache (the fixtures above) is kept
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"],  # set by the fixtures above
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@dataclass
class Command:
    """A command running in the background. Its stdout and stderr go to files (a pipe nobody reads
    can fill and stall it), so a test can watch them while it runs."""

    proc: subprocess.Popen
    cwd: Path  # where it runs: Hydra's outputs/ and multirun/ are in it
    out: Path
    err: Path

    def output(self) -> str:
        """stdout and stderr so far (Hydra's job log goes to stdout, warnings to stderr)."""
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """Until a line of the output matches `pattern`; fails if the command ends first."""
        regex = re.compile(pattern, re.MULTILINE)

        def seen() -> re.Match | None:
            running = self.proc.poll() is None  # before reading: what it printed is all there
            match = regex.search(self.output())
            assert match or running, f"exit {self.proc.returncode} before {pattern!r}:\n{self.output()}"
            return match

        return wait_until(seen, timeout, f"{pattern!r} in the output of {self.proc.args}")

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Waits for the command (killing it after `timeout`) and returns what it did."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        return subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, self.out.read_text(), self.err.read_text()
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start(argv: list[str], cwd: Path, env: dict[str, str | None] | None = None) -> Command:
    """`argv` in the background in `cwd`, in cli_env() updated with `env`; its output goes to
    hidden files in `cwd`."""
    cwd.mkdir(parents=True, exist_ok=True)
    n = len(list(cwd.glob(".command-*.out")))
    out, err = cwd / f".command-{n}.out", cwd / f".command-{n}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=cwd, env=cli_env(**(env or {})), stdout=stdout, stderr=stderr)
    return Command(proc, cwd, out, err)


def start_cli(*args: str, cwd: Path, env: dict[str, str | None] | None = None) -> Command:
    """`python -m cifar_exp ARGS...` in the background (Hydra writes outputs/ and multirun/ in cwd)."""
    return start([sys.executable, "-m", "cifar_exp", *args], cwd, env)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str | None] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m cifar_exp ARGS...` to its end."""
    return start_cli(*args, cwd=cwd, env=env).result(timeout)


@pytest.fixture(name="run_cli", scope="session")
def run_cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """The command exited 0; else the failure shows its output."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


# ---------------------------------------------------------------- commands in this process
@dataclass
class Ended:
    """How a command ended in this process: its exit status (0: it returned), what it printed."""

    returncode: int
    stdout: str
    stderr: str


def _main_here(args: tuple[str, ...]) -> int:
    """cifar_exp.__main__.main with `args`, in this process: its exit status. What a command
    changes of its process is put back when it ends: sys.argv and sys.path, the environment, the
    SIGINT/SIGTERM handlers, Hydra's record of the job it ran (HydraConfig: run() called directly
    would take it for its own job); its exit hooks (atexit: a failed sweep's parent run is closed
    then) run then, as at a process's exit."""
    import atexit

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cifar_exp.__main__ import main

    at_exit: list[Callable[[], Any]] = []
    environ = dict(os.environ)
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as inner:
        inner.setattr(sys, "argv", ["cifar-exp", *args])
        inner.setattr(sys, "path", sys.path[:])
        inner.setattr(atexit, "register", lambda f, *a, **k: at_exit.append(lambda: f(*a, **k)) or f)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            for hook in reversed(at_exit):
                hook()
            os.environ.clear()
            os.environ.update(environ)
            for signum, handler in signals.items():
                signal.signal(signum, handler)
            HydraConfig.instance().cfg = None
            GlobalHydra.instance().clear()
    return code


@pytest.fixture
def main_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., Ended]]:
    """`cifar-exp ARGS` from tmp_path into this test's store, run in this process: the same entry
    point (cifar_exp.__main__.main: Hydra's command line or a subcommand, compose, the task, the
    one-line report) without a new interpreter's ~4 s of imports. What only a real process shows
    (the exit status the shell gets, signals, a clean environment) needs start_cli. What a command
    changes of its process is put back when it ends (see _main_here), and Hydra's logging handlers
    are taken away after the test."""
    import logging

    monkeypatch.chdir(tmp_path)
    handlers = logging.getLogger().handlers[:]

    def run(*args: str) -> Ended:
        capsys.readouterr()
        code = _main_here(args)
        out, err = capsys.readouterr()
        return Ended(code, out, err)

    yield run
    logging.getLogger().handlers[:] = handlers


def run_in_process(*args: str, cwd: Path, env: dict[str, str | None] | None = None) -> Ended:
    """main_in_process for fixtures wider than one test (which cannot take it): `cifar-exp ARGS`
    in this process from `cwd`, with `env` set (None unsets) while it runs, its output captured
    here; Hydra's logging handlers are taken away after it."""
    import contextlib
    import logging

    handlers = logging.getLogger().handlers[:]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for key, value in (env or {}).items():
            if value is None:
                patch.delenv(key, raising=False)
            else:
                patch.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _main_here(args)
    logging.getLogger().handlers[:] = handlers
    return Ended(code, out.getvalue(), err.getvalue())


def signal_ignored(signum: int) -> bool:
    """Inherited as ignored (e.g. pytest started with `&`): a command would ignore it too."""
    return signal.getsignal(signum) is signal.SIG_IGN


# ---------------------------------------------------------------- stores, read back as a user would
@dataclass
class Store:
    """An MLflow store read back through MlflowClient. A temporary SQLite store also has a
    `root` (mlflow.db, its artifacts in artifacts/) and a `cwd` to run commands from."""

    uri: str
    root: Path | None = None
    _client: Any = field(default=None, init=False, repr=False)

    @property
    def cwd(self) -> Path:
        assert self.root is not None, f"{self.uri} is not a temporary SQLite store"
        return self.root / "cwd"

    def client(self) -> Any:
        """Open it only once its file exists (a client on a missing SQLite file creates the tables,
        racing a command doing the same)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def runs(self, experiment: str = "cifar_exp") -> list[Any]:
        """The experiment's runs in start order (none if it does not exist)."""
        found = self.client().get_experiment_by_name(experiment)
        if found is None:
            return []
        return self.client().search_runs(
            [found.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"]
        )

    def run(self, run_id: str) -> Any:
        return self.client().get_run(run_id)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every point of one metric, by step."""
        return sorted((m.step, m.value) for m in self.client().get_metric_history(run_id, key))

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        """Every artifact file of the run (under `path`), as paths relative to its root."""
        found: set[str] = set()
        for item in self.client().list_artifacts(run_id, path):
            found |= self.artifacts(run_id, item.path) if item.is_dir else {item.path}
        return found

    def download(self, run_id: str, artifact: str, dest: Path) -> Path:
        return Path(self.client().download_artifacts(run_id, artifact, str(dest)))

    def start_cli(
        self, *args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None
    ) -> Command:
        """`python -m cifar_exp ARGS...` in the background, tracking into this store (run from
        its cwd unless told otherwise)."""
        return start_cli(*args, cwd=cwd or self.cwd, env={"MLFLOW_TRACKING_URI": self.uri, **(env or {})})

    def run_cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self.start_cli(*args, cwd=cwd).result(timeout)


@dataclass
class Sweep:
    """A sweep command, ended, and what it recorded."""

    store: Store
    cwd: Path  # where it ran: Hydra's multirun/ is in it
    result: subprocess.CompletedProcess[str] | Ended  # Ended: run in this process
    parent: Any
    children: list[Any]  # in start order

    def summary(self, dest: Path) -> list[dict[str, str]]:
        """The rows of the parent's sweep/summary.csv."""
        text = self.store.download(self.parent.info.run_id, "sweep/summary.csv", dest).read_text()
        return list(csv.DictReader(io.StringIO(text)))


def finished_sweep(store: Store, command: Command) -> Sweep:
    return recorded_sweep(store, command.result(), command.cwd)


def recorded_sweep(store: Store, result: subprocess.CompletedProcess[str] | Ended, cwd: Path) -> Sweep:
    """The sweep that ended with `result` (run from `cwd`), read back from its store."""
    runs = store.runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1, f"{[r.info.run_name for r in runs]}\n{result.stdout}\n{result.stderr}"
    children = [r for r in runs if r.info.run_id != parents[0].info.run_id]
    return Sweep(store, cwd, result, parents[0], children)


@pytest.fixture(scope="session")
def empty_store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlflow.db with MLflow's tables and nothing else. Creating them takes MLflow ~50 schema
    migrations, each a disk sync (seconds on a busy disk): copied instead, once per store."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def new_store(tmp_path_factory: pytest.TempPathFactory, empty_store_file: Path) -> Callable[..., Store]:
    """new_store(name): a SQLite store of its own in a new temporary folder, with a cwd/ beside it.
    With created=False the folder is empty: the first command to track creates the store."""

    def new(name: str, created: bool = True) -> Store:
        root = tmp_path_factory.mktemp(name)
        (root / "cwd").mkdir()
        if created:
            shutil.copyfile(empty_store_file, root / "mlflow.db")
        return Store(f"sqlite:///{root / 'mlflow.db'}", root)

    return new


# ---------------------------------------------------------------- a real tracking server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 only, on a free port that it keeps across restarts, over a
    SQLite file in `root`. It serves artifacts itself (runs upload through it, as to a team's
    server). In its own process group: stop() kills it and its workers at once, as a crash would."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"  # --artifacts-destination: what runs upload lands here
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        """Starts it without waiting: see wait_until_up()."""
        argv = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            f"--backend-store-uri=sqlite:///{self.root / 'server.db'}",
            f"--artifacts-destination={self.artifacts}",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--workers=1",
        ]
        # Its background job runner (for GenAI features) would start eight more processes: off.
        env = cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                argv, cwd=self.root, env=env, stdout=log, stderr=log, start_new_session=True
            )
        return self

    def answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            f"mlflow server exited:\n{self.log.read_text()}"
        )
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_until_up(self, timeout: float = 180) -> Server:
        try:
            wait_until(self.answers, timeout, f"mlflow server on {self.uri}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log.read_text()}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A tracking server for one test, answering."""
    root = tmp_path / "server"
    root.mkdir()
    server = Server(root).start()
    try:
        yield server.wait_until_up()
    finally:
        server.stop()


# ---------------------------------------------------------------- Hydra's compose API
def compose_config(*overrides: str, hydra_config: bool = False):
    """The config `python -m cifar_exp OVERRIDES...` would run, composed in-process."""
    from hydra import compose, initialize_config_dir

    from cifar_exp.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture(name="compose_config", scope="session")
def compose_config_fixture() -> Callable:
    return compose_config


# ---------------------------------------------------------------- CIFAR-10 in its real pickle format
class _Python2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (the opcodes cPickle used for the real CIFAR-10 files), so
    the files load like the originals: with encoding='latin1' (torchvision) keys are str,
    with encoding='bytes' (the dataset page's recipe) they are b'data', b'labels', ..."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _dump_python2(obj: object, path: Path) -> None:
    with path.open("wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


@dataclass
class CifarFolder:
    root: Path  # what dataset.root points at: it holds cifar-10-batches-py/
    train_data: np.ndarray  # N x 3072 uint8 rows as written: 1024 red, 1024 green, 1024 blue
    train_labels: list[int]
    test_data: np.ndarray
    test_labels: list[int]
    classes: list[str]


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> CifarFolder:
    """A tiny cifar-10-batches-py: data_batch_1..5 and test_batch of CIFAR_PER_BATCH images each,
    batches.meta with label_names. Pixels are random, labels cycle through all 10 classes."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[np.ndarray, list[int]]] = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, size=(CIFAR_PER_BATCH, 3072), dtype=np.uint8)
        labels = [(j + i) % 10 for j in range(CIFAR_PER_BATCH)]
        filenames = [f"{name}_{j}.png".encode() for j in range(CIFAR_PER_BATCH)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": filenames}
        _dump_python2(entry, folder / name)
        splits[name] = (data, labels)
    meta = {
        b"num_cases_per_batch": CIFAR_PER_BATCH,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    _dump_python2(meta, folder / "batches.meta")

    # The files read back the way the dataset page says they do.
    with (folder / "data_batch_1").open("rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (CIFAR_PER_BATCH, 3072)

    train = [splits[f"data_batch_{k}"] for k in range(1, 6)]
    return CifarFolder(
        root=root,
        train_data=np.concatenate([d for d, _ in train]),
        train_labels=[label for _, labels in train for label in labels],
        test_data=splits["test_batch"][0],
        test_labels=splits["test_batch"][1],
        classes=CIFAR10_CLASSES,
    )


CIFAR100_CLASSES = [f"class_{i:02d}" for i in range(100)]  # the real names (apple, ...) are not needed


@pytest.fixture(scope="session")
def cifar100_folder(tmp_path_factory: pytest.TempPathFactory) -> CifarFolder:
    """A tiny cifar-100-python in torchvision's format: train and test of CIFAR100_PER_SPLIT images
    (fine_labels cycle through the 100 classes, coarse_labels beside them), meta with
    fine_label_names. Python 2 pickles like the real files; md5s as skip_cifar_md5 patches them."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    splits: dict[str, tuple[np.ndarray, list[int]]] = {}
    for name, count in (("train", 400), ("test", 200)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        labels = [j % 100 for j in range(count)]
        entry = {
            b"filenames": [f"{name}_{j}.png".encode() for j in range(count)],
            b"batch_label": name.encode(),
            b"fine_labels": labels,
            b"coarse_labels": [label // 5 for label in labels],
            b"data": data,
        }
        _dump_python2(entry, folder / name)
        splits[name] = (data, labels)
    meta = {
        b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
        b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)],
    }
    _dump_python2(meta, folder / "meta")
    return CifarFolder(root, *splits["train"], *splits["test"], classes=CIFAR100_CLASSES)


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the real files' md5s: the data batches through CIFAR10._check_integrity,
    batches.meta through the module's check_integrity. Generated files pass both, in this process."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


# ---------------------------------------------------------------- an image folder of PNGs
# Created in this order; the loader must sort them (apple, mango, zebra).
PNG_CLASSES = {"zebra": (40, 40, 220), "apple": (220, 30, 30), "mango": (30, 200, 40)}
PNG_TRAIN_PER_CLASS = 8
PNG_TEST_PER_CLASS = 4
ODD_SIZE = (48, 40)  # height x width of the one training image that is not 32x32


@dataclass
class PngFolder:
    root: Path  # holds train/<class>/*.png and test/<class>/*.png
    classes: list[str]  # sorted, as the loader must report them
    images: dict[str, torch.Tensor]  # "train/apple/000.png" -> the uint8 3 x H x W written
    odd_image: str  # key of the non-32x32 image (a solid colour, so resizing must keep it)


@pytest.fixture(scope="session")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> PngFolder:
    from PIL import Image  # an encoder other than the one the loader decodes with

    def write_png(image: torch.Tensor, path: Path) -> None:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)

    root = tmp_path_factory.mktemp("pngs")
    gen = torch.Generator().manual_seed(0)
    images: dict[str, torch.Tensor] = {}
    for name, colour in PNG_CLASSES.items():
        base = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)
        for split, count in (("train", PNG_TRAIN_PER_CLASS), ("test", PNG_TEST_PER_CLASS)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = torch.randn(3, 32, 32, generator=gen) * 20
                image = (base + noise).round().clamp(0, 255).to(torch.uint8)
                key = f"{split}/{name}/{i:03d}.png"
                write_png(image, root / key)
                images[key] = image
    odd_image = "train/apple/odd.png"
    image = torch.tensor(PNG_CLASSES["apple"], dtype=torch.uint8).view(3, 1, 1).expand(3, *ODD_SIZE)
    write_png(image.contiguous(), root / odd_image)
    images[odd_image] = image
    return PngFolder(root=root, classes=sorted(PNG_CLASSES), images=images, odd_image=odd_image)


@pytest.fixture
def fresh_data_cache() -> Iterator[None]:
    """run.load_data caches datasets per process (for in-process sweeps); start and end empty."""
    from cifar_exp.run import load_data

    load_data.cache_clear()
    yield
    load_data.cache_clear()
