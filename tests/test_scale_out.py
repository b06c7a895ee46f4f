"""Scale out, read back the way a user would: a sweep whose jobs run as submitit jobs
(hydra/launcher=submitit_local: the path a SLURM sweep takes, on this machine), a sweep into a team's
`mlflow server`, and an Optuna search whose parent run records the best trial.

Every command runs as a subprocess (`python -m cifar_exp ... -m`) from a temporary folder on tiny
generated data. The submitit sweep, the search and the server start together, so their imports and
training share the cores instead of queueing; the sweep into the server starts once it answers."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = [  # 10 steps of 32 images, one epoch: a job trains in about a second
    "dataset=synthetic",
    "dataset.train_size=320",
    "dataset.test_size=100",
    "trainer.epochs=1",
    "trainer.batch_size=32",
    "device=cpu",
]
WIDTHS = "model.conv1_out=4,8"  # the two jobs of a sweep
SEARCH_TRIALS = 3
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- commands and stores
def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MLflow, Hydra or sweep state, one torch thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIFAR_EXP_", "MLFLOW_", "HYDRA_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Command:
    """A command started in the background in `cwd`; stdout and stderr go to files beside it."""

    proc: subprocess.Popen
    cwd: Path

    @classmethod
    def start(cls, args: list[str], cwd: Path, env: dict[str, str]) -> Command:
        with open(cwd.parent / "stdout", "w") as out, open(cwd.parent / "stderr", "w") as err:
            return cls(subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err), cwd)

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        out, err = ((self.cwd.parent / name).read_text() for name in ("stdout", "stderr"))
        result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{err}"
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cifar_exp(*args: str, cwd: Path, env: dict[str, str]) -> Command:
    return Command.start([sys.executable, "-m", "cifar_exp", *args], cwd, env)


def new_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """<tmp>/<name>/cwd: where a command runs; its store and output go beside it."""
    cwd = tmp_path_factory.mktemp(name) / "cwd"
    cwd.mkdir()
    return cwd


@dataclass
class Sweep:
    """What one sweep recorded: its parent run and its children in start order."""

    client: Any
    cwd: Path  # where the command ran: Hydra's multirun/ is in it
    result: subprocess.CompletedProcess
    parent: Any
    children: list[Any]


def read_sweep(command: Command, uri: str | None = None) -> Sweep:
    """Waits for the command, then reads its store: `uri`, else the SQLite store beside its folder.
    (Not before: a client on a new SQLite store creates its tables, racing the command doing so.)"""
    from mlflow.tracking import MlflowClient

    result = command.result()
    client = MlflowClient(uri or f"sqlite:///{command.cwd.parent / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=100, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.info.run_id != parents[0].info.run_id]
    return Sweep(client, command.cwd, result, parents[0], children)


def assert_parent_and_finished_children(sweep: Sweep, count: int) -> None:
    parent_id = sweep.parent.info.run_id
    assert len(sweep.children) == count, [c.info.run_name for c in sweep.children]
    for child in sweep.children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert "test/acc" in child.data.metrics
    assert sweep.parent.info.status == "FINISHED"
    assert sweep.parent.info.end_time is not None
    best = max(child.data.metrics["test/acc"] for child in sweep.children)
    assert sweep.parent.data.metrics["best/test/acc"] == pytest.approx(best)


def artifact_paths(client: Any, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# ---------------------------------------------------------------- the commands, started together
@dataclass
class Server:
    """An `mlflow server` on 127.0.0.1 with a SQLite backend that serves artifacts itself (clients
    upload them through it, as to a team's server), in its own process group."""

    proc: subprocess.Popen
    url: str
    root: Path

    @property
    def artifacts(self) -> Path:  # --artifacts-destination: where it keeps what runs upload
        return self.root / "artifacts"

    @classmethod
    def start(cls, root: Path) -> Server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            f"--backend-store-uri=sqlite:///{root / 'server.db'}",
            f"--artifacts-destination={root / 'artifacts'}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
        ]
        # Its background job runner (for GenAI features) would start eight more processes: off.
        env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(root / "server.log", "w") as log:
            proc = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=log, start_new_session=True)
        return cls(proc, f"http://127.0.0.1:{port}", root)

    def wait_until_up(self, timeout: float = 120) -> str | None:
        """None once it answers /health, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return (
                    f"mlflow server exited {self.proc.returncode}:\n{(self.root / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(0.2)
        return f"mlflow server did not answer in {timeout:.0f} s"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Launched:
    commands: dict[str, Command]
    server: Server
    server_problem: str | None  # why the server never answered, if it did not


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """The submitit sweep, the search and a tracking server start together; once the server
    answers, a sweep into it. Each sweep has its own folder and store."""
    server = Server.start(tmp_path_factory.mktemp("server"))
    started: dict[str, Command] = {}
    try:
        cwd = new_folder(tmp_path_factory, "submitit")
        env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{cwd.parent / 'mlflow.db'}")
        started["submitit"] = cifar_exp(
            "hydra/launcher=submitit_local", *TINY, WIDTHS, "-m", cwd=cwd, env=env
        )
        cwd = new_folder(tmp_path_factory, "search")
        env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{cwd.parent / 'mlflow.db'}")
        search = ["experiment=search", f"hydra.sweeper.n_trials={SEARCH_TRIALS}", *TINY, "-m"]
        started["search"] = cifar_exp(*search, cwd=cwd, env=env)
        problem = server.wait_until_up()
        if problem is None:
            # The server by mlflow.tracking_uri, while $MLFLOW_TRACKING_URI names a decoy store.
            cwd = new_folder(tmp_path_factory, "server_sweep")
            env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{cwd.parent / 'decoy' / 'mlflow.db'}")
            args = [*TINY, WIDTHS, f"mlflow.tracking_uri={server.url}", "-m"]
            started["server"] = cifar_exp(*args, cwd=cwd, env=env)
        yield Launched(started, server, problem)
    finally:
        for command in started.values():
            command.stop()
        server.stop()


# ---------------------------------------------------------------- a cluster: submitit jobs
@pytest.fixture(scope="module")
def submitit_sweep(launched: Launched) -> Sweep:
    return read_sweep(launched.commands["submitit"])


def test_submitit_jobs_are_children_of_the_sweeps_parent_run(submitit_sweep: Sweep) -> None:
    assert_parent_and_finished_children(submitit_sweep, 2)
    widths = sorted(child.data.params["model.conv1_out"] for child in submitit_sweep.children)
    assert widths == ["4", "8"]


def test_submitit_ran_each_job_in_its_own_process(submitit_sweep: Sweep) -> None:
    """Each child's run was opened by a submitit job: its log, in the sweep's .submitit folder,
    names that run; the sweep's own output does not train."""
    cwd = submitit_sweep.cwd
    folder = cwd / submitit_sweep.parent.data.tags["hydra_sweep_dir"] / ".submitit"
    logs = "".join(p.read_text() for p in folder.glob("*/*_log.*"))
    for child in submitit_sweep.children:
        assert f"MLflow run {child.info.run_id}" in logs
        assert (cwd / child.data.tags["hydra_output_dir"] / ".hydra").is_dir()
    assert "epoch 1/1" not in submitit_sweep.result.stdout + submitit_sweep.result.stderr


def test_slurm_preset_sets_the_job_resources(compose_config) -> None:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    launcher = compose_config("experiment=slurm", hydra_config=True).hydra.launcher
    assert launcher._target_ == SlurmQueueConf._target_
    for key in ("partition", "timeout_min", "gpus_per_node", "mem_gb", "cpus_per_task"):
        assert key in launcher, key
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0
    preset = yaml.safe_load((PROJECT_ROOT / "experiments" / "slurm.yaml").read_text())
    for key, value in preset["hydra"]["launcher"].items():  # every key it sets is the plugin's
        assert launcher[key] == value, key
    # The sweep itself stays as configured: one parent run per sweep, from the callback.
    assert "mlflow_sweep" in compose_config("experiment=slurm", hydra_config=True).hydra.callbacks


def test_a_job_started_with_a_clean_environment_still_finds_the_parent_run(compose_config) -> None:
    """A launcher that runs jobs elsewhere pickles the sweep callback; unpickled in a process whose
    environment lacks the sweep's variables (sbatch --export=NONE), it sets them before the job."""
    from cifar_exp.sweeps import SweepCallback

    callback = SweepCallback()
    callback.parent_id, callback.uri, callback.pid = "parent123", "sqlite:////shared/mlflow.db", os.getpid()
    config = compose_config("experiment=slurm", *TINY, hydra_config=True)  # what a SLURM job gets
    job = (
        "import os, pickle, sys\n"
        "from cifar_exp.tracking import identity\n"
        "callback, config = pickle.loads(sys.stdin.buffer.read())\n"
        "callback.on_job_start(config=config)\n"
        "print(identity.sweep_parent(), os.environ.get('MLFLOW_TRACKING_URI'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", job],
        input=pickle.dumps((callback, config)),
        env=clean_env(),
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["parent123", "sqlite:////shared/mlflow.db"]


@pytest.mark.slow
def test_submitit_jobs_without_the_sweeps_environment_are_still_children(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """submitit_local with its jobs started in an environment stripped of CIFAR_EXP_* and MLFLOW_*,
    as a cluster that starts jobs with a clean environment would."""
    cwd = new_folder(tmp_path_factory, "clean_jobs")
    wrapper = cwd.parent / "clean_jobs.py"
    wrapper.write_text(
        "import runpy, subprocess, sys, types\n"
        "import submitit.local.local as local\n"
        "def popen(cmd, *args, env=None, **kwargs):\n"
        "    env = {k: v for k, v in (env or {}).items() if not k.startswith(('CIFAR_EXP_', 'MLFLOW_'))}\n"
        "    return subprocess.Popen(cmd, *args, env=env, **kwargs)\n"
        "local.subprocess = types.SimpleNamespace(Popen=popen)\n"
        "sys.argv = ['cifar_exp', *sys.argv[1:]]\n"
        "runpy.run_module('cifar_exp', run_name='__main__', alter_sys=True)\n"
    )
    uri = f"sqlite:///{cwd.parent / 'mlflow.db'}"
    # The store by name: a job that lost it would write to the project's own store, not a temp one.
    args = ["hydra/launcher=submitit_local", *TINY, WIDTHS, f"mlflow.tracking_uri={uri}", "-m"]
    command = Command.start([sys.executable, str(wrapper), *args], cwd, clean_env())
    sweep = read_sweep(command)
    assert_parent_and_finished_children(sweep, 2)


# ---------------------------------------------------------------- a team's tracking server
@pytest.fixture(scope="module")
def mlflow_server(launched: Launched) -> Server:
    if launched.server_problem:
        pytest.fail(launched.server_problem)
    return launched.server


@pytest.fixture(scope="module")
def server_sweep(launched: Launched, mlflow_server: Server) -> Sweep:
    """The two-job sweep into the server, read back through the server."""
    command = launched.commands["server"]
    sweep = read_sweep(command, mlflow_server.url)
    assert not (command.cwd.parent / "decoy").exists()  # $MLFLOW_TRACKING_URI's store
    assert not (command.cwd / "mlruns").exists() and not (command.cwd / "mlartifacts").exists()
    return sweep


def test_sweep_into_a_tracking_server_records_parent_and_children(server_sweep: Sweep) -> None:
    assert_parent_and_finished_children(server_sweep, 2)
    client = server_sweep.client
    by_width = {child.data.params["model.conv1_out"]: child for child in server_sweep.children}
    assert set(by_width) == {"4", "8"}
    for child in server_sweep.children:
        assert child.data.params["dataset._target_"] == "cifar_exp.data.load_synthetic"
        assert child.data.params["trainer.batch_size"] == "32"
        for key in ("train/loss_epoch", "test/loss", "test/acc", "throughput/images_per_s"):
            assert math.isfinite(child.data.metrics[key]), key
        [point] = client.get_metric_history(child.info.run_id, "test/acc")
        assert point.step > 0 and point.value == child.data.metrics["test/acc"]


def test_artifacts_go_through_the_server(server_sweep: Sweep, mlflow_server: Server, tmp_path: Path) -> None:
    client = server_sweep.client
    for child in server_sweep.children:
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a client path
        found = artifact_paths(client, child.info.run_id)
        assert {"config/config.yaml", "model/state_dict.pt", "figures/train_samples.png"} <= found, found
        assert (mlflow_server.artifacts / child.info.experiment_id / child.info.run_id).is_dir()
    parent_id = server_sweep.parent.info.run_id
    found = artifact_paths(client, parent_id)
    assert {"sweep/summary.csv", "sweep/summary.md", "sweep/test_acc.png"} <= found, found
    summary = Path(client.download_artifacts(parent_id, "sweep/summary.csv", str(tmp_path))).read_text()
    for child in server_sweep.children:
        assert child.info.run_id in summary
    config = client.download_artifacts(
        server_sweep.children[0].info.run_id, "config/config.yaml", str(tmp_path)
    )
    assert yaml.safe_load(Path(config).read_text())["mlflow"]["tracking_uri"] == mlflow_server.url


# ---------------------------------------------------------------- hyperparameter search
@pytest.fixture(scope="module")
def search(launched: Launched) -> Sweep:
    return read_sweep(launched.commands["search"])


def test_search_runs_its_trials_as_children(search: Sweep) -> None:
    assert_parent_and_finished_children(search, SEARCH_TRIALS)
    for child in search.children:  # every trial inside experiments/search.yaml's space
        assert 0.001 <= float(child.data.params["optimizer.lr"]) <= 0.3
        assert 0.5 <= float(child.data.params["optimizer.momentum"]) <= 0.95
        assert child.data.params["model.conv1_out"] in {"6", "16", "32"}
    assert "Best value" in search.result.stdout + search.result.stderr  # Optuna's sweeper ran


def test_search_parent_records_the_best_trial(search: Sweep) -> None:
    parent = search.parent
    best = max(child.data.metrics["test/acc"] for child in search.children)
    assert parent.data.metrics["best/test/acc"] == pytest.approx(best)
    best_child = next(c for c in search.children if c.info.run_id == parent.data.tags["best_run_id"])
    assert best_child.data.metrics["test/acc"] == pytest.approx(best)
    for key in ("optimizer.lr", "optimizer.momentum", "model.conv1_out"):
        assert float(parent.data.tags[f"best/{key}"]) == pytest.approx(float(best_child.data.params[key]))
    # The same best value Hydra's Optuna sweeper wrote beside the sweep.
    sweep_dir = search.cwd / parent.data.tags["hydra_sweep_dir"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(best)
    assert json.loads(parent.data.tags["sweep_params"]).keys() == results["best_params"].keys()


def test_search_parent_holds_the_history_plot(search: Sweep, tmp_path: Path) -> None:
    parent_id = search.parent.info.run_id
    assert "search/history.png" in artifact_paths(search.client, parent_id)
    path = search.client.download_artifacts(parent_id, "search/history.png", str(tmp_path))
    assert Path(path).read_bytes()[:8] == PNG


def test_search_history_figure_marks_failed_trials() -> None:
    from cifar_exp import reports

    fig = reports.search_history_figure([0.2, None, 0.5, 0.3])
    ax = fig.axes[0]
    best_so_far = next(line for line in ax.lines if line.get_label() == "best so far")
    assert list(best_so_far.get_ydata()) == [0.2, 0.5, 0.5]
    failed = next(line for line in ax.lines if line.get_label() == "failed")
    assert list(failed.get_xdata()) == [2]
    reports.close(fig)
