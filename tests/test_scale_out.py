"""Scale out, read back the way a user would: a sweep whose jobs run as submitit jobs
(hydra/launcher=submitit_local: the path a SLURM sweep takes, on this machine) and what
experiment=slurm asks SLURM for; a sweep into a team's `mlflow server`, with its parent run,
children and summary. (A search end to end, its parent run and best trial: test_search.py.)

Every command runs from a temporary folder on tiny generated data. The submitit sweep (a
subprocess, `python -m cifar_exp ... -m`) and the server start together, so their imports and
training share the cores instead of queueing; the sweep into the server runs in this process once
it answers."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest
import yaml
from conftest import (
    PNG,
    Command,
    Server,
    Store,
    Sweep,
    finished_sweep,
    ok,
    recorded_sweep,
    run_in_process,
    start,
    synthetic,
)

TINY = synthetic(train=320, test=100, epochs=1, batch=32, log_every=None)  # 10 steps: a job is ~1 s
WIDTHS = "model.conv1_out=4,8"  # the two jobs of a sweep


def assert_parent_and_finished_children(sweep: Sweep, count: int) -> None:
    ok(sweep.result)
    parent_id = sweep.parent.info.run_id
    assert len(sweep.children) == count, [c.info.run_name for c in sweep.children]
    for child in sweep.children:
        assert child.info.status == "FINISHED", child.data.tags.get("error")
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert "test/acc" in child.data.metrics
    assert "mlflow.parentRunId" not in sweep.parent.data.tags
    assert sweep.parent.info.status == "FINISHED"
    assert sweep.parent.info.end_time is not None
    best = max(child.data.metrics["test/acc"] for child in sweep.children)
    assert sweep.parent.data.metrics["best/test/acc"] == pytest.approx(best)


# ---------------------------------------------------------------- the commands, started together
@dataclass
class Launched:
    submitit: tuple[Store, Command]
    server: Server
    server_sweep: Sweep | str  # str: why the server never answered
    decoy: Store  # $MLFLOW_TRACKING_URI of the sweep into the server


@pytest.fixture(scope="module")
def launched(new_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """The submitit sweep and a tracking server start together; once the server answers, a sweep
    into it runs in this process (conftest's run_in_process: the submitit sweep is the one whose
    own processes are tested). Each sweep has its own folder and store."""
    server = Server(tmp_path_factory.mktemp("server")).start()
    command = None
    try:
        store = new_store("submitit")
        command = store.start_cli("hydra/launcher=submitit_local", *TINY, WIDTHS, "-m")
        # The server by mlflow.tracking_uri, while $MLFLOW_TRACKING_URI names a decoy store.
        decoy = new_store("decoy", created=False)
        try:
            server.wait_until_up()
        except AssertionError as e:
            server_sweep: Sweep | str = str(e)
        else:
            args = [*TINY, WIDTHS, f"mlflow.tracking_uri={server.uri}", "-m"]
            ended = run_in_process(*args, cwd=decoy.cwd, env={"MLFLOW_TRACKING_URI": decoy.uri})
            server_sweep = recorded_sweep(Store(server.uri), ended, decoy.cwd)
        yield Launched((store, command), server, server_sweep, decoy)
    finally:
        if command is not None:
            command.stop()
        server.stop()


# ---------------------------------------------------------------- a cluster: submitit jobs
@pytest.fixture(scope="module")
def submitit_sweep(launched: Launched) -> Sweep:
    return finished_sweep(*launched.submitit)


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


def test_slurm_preset_asks_slurm_for_a_gpu_a_job(
    compose_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sbatch script that experiment=slurm submits, as the submitit launcher writes it from the
    composed config (taken from the executor instead of submitted: there is no cluster here)."""
    import hydra.utils
    import submitit
    import submitit.slurm.slurm

    class Submitted(Exception):
        pass

    def submit(executor: submitit.AutoExecutor, *args: object) -> None:
        raise Submitted(executor)

    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # srun
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    cfg = compose_config("experiment=slurm", f"hydra.sweep.dir={tmp_path}", hydra_config=True)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Submitted) as submitted:
        launcher.launch([[f"seed={seed}"] for seed in range(20)], initial_job_idx=0)
    executor = submitted.value.args[0]._executor
    executor.parameters["map_count"] = 20  # what map_array adds for 20 jobs
    sbatch = executor._make_submission_file_text("python -m job", "uid").splitlines()
    for line in ["--gpus-per-node=1", "--time=60", "--cpus-per-task=8", "--mem=32GB", "--array=0-19%16"]:
        assert f"#SBATCH {line}" in sbatch, "\n".join(sbatch)
    assert not [line for line in sbatch if "--partition" in line]  # null: the cluster's default
    # The sweep itself stays as configured: one parent run per sweep, from the callback.
    assert "mlflow_sweep" in cfg.hydra.callbacks


def test_a_job_started_with_a_clean_environment_still_finds_the_parent_run(
    compose_config, tmp_path: Path
) -> None:
    """A launcher that runs jobs elsewhere pickles the sweep callback and the task function;
    unpickled in a process whose environment lacks the sweep's store (sbatch --export=NONE), the
    callback hands the task its parent run, swept keys and store as the job starts."""
    from cifar_exp.sweeps import Job, SweepCallback

    callback = SweepCallback()
    callback.parent_id, callback.uri, callback.swept = "parent123", "sqlite:////shared/mlflow.db", ["seed"]
    config = compose_config("experiment=slurm", *TINY, hydra_config=True)  # what a SLURM job gets
    job = tmp_path / "job.pkl"
    # as joblib and submitit pickle them: with cloudpickle (a task defined in __main__ goes by value)
    job.write_bytes(cloudpickle.dumps((callback, config, Job(lambda cfg, context: context))))
    code = (
        "import pickle, sys\n"
        "callback, config, task = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "callback.on_job_start(config=config, task_function=task)\n"
        "context = task(config)\n"
        "print(context.parent_run_id, context.swept_keys, context.store_uri, context.trial)\n"
    )
    command = start([sys.executable, "-c", code, str(job)], tmp_path, env={"MLFLOW_TRACKING_URI": None})
    result = ok(command.result())
    assert result.stdout.split() == ["parent123", "('seed',)", "sqlite:////shared/mlflow.db", "None"]


@pytest.mark.slow
def test_submitit_jobs_without_the_sweeps_environment_are_still_children(new_store) -> None:
    """submitit_local with its jobs started in an environment stripped of CIFAR_EXP_* and MLFLOW_*,
    as a cluster that starts jobs with a clean environment would."""
    store = new_store("clean_jobs")
    wrapper = store.root / "clean_jobs.py"
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
    # The store by name: a job that lost it would write to the project's own store, not a temp one.
    args = ["hydra/launcher=submitit_local", *TINY, WIDTHS, f"mlflow.tracking_uri={store.uri}", "-m"]
    command = start([sys.executable, str(wrapper), *args], store.cwd, env={"MLFLOW_TRACKING_URI": None})
    assert_parent_and_finished_children(finished_sweep(store, command), 2)


# ---------------------------------------------------------------- a team's tracking server
@pytest.fixture(scope="module")
def server_sweep(launched: Launched) -> Sweep:
    """The two-job sweep into the server, read back through the server."""
    if isinstance(launched.server_sweep, str):
        pytest.fail(launched.server_sweep)
    return launched.server_sweep


def test_sweep_into_a_tracking_server_has_a_parent_and_a_child_per_job(server_sweep: Sweep) -> None:
    assert_parent_and_finished_children(server_sweep, 2)
    for child, width in zip(server_sweep.children, ["4", "8"], strict=True):  # in start order
        assert f"conv1_out={width}" in child.info.run_name
        assert child.data.params["model.conv1_out"] == width
        assert child.data.params["dataset._target_"] == "cifar_exp.data.load_synthetic"
        assert child.data.params["trainer.batch_size"] == "32"
        for key in ("train/loss_epoch", "test/loss", "test/acc", "throughput/images_per_s"):
            assert math.isfinite(child.data.metrics[key]), key
        [(step, value)] = server_sweep.store.history(child.info.run_id, "test/acc")
        assert step > 0 and value == child.data.metrics["test/acc"]
    job_dirs = {Path(child.data.tags["hydra_output_dir"]) for child in server_sweep.children}
    assert len(job_dirs) == 2 and all((server_sweep.cwd / d / ".hydra").is_dir() for d in job_dirs)


def test_the_sweeps_store_is_its_override_not_the_env(server_sweep: Sweep, launched: Launched) -> None:
    decoy = launched.decoy
    assert [p.name for p in decoy.root.iterdir()] == ["cwd"]  # $MLFLOW_TRACKING_URI: not created
    assert not (decoy.cwd / "mlruns").exists() and not (decoy.cwd / "mlartifacts").exists()
    assert len(server_sweep.store.runs()) == 3  # the parent and both jobs


def test_artifacts_go_through_the_server(server_sweep: Sweep, launched: Launched, tmp_path: Path) -> None:
    store = server_sweep.store
    for child in server_sweep.children:
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a client path
        found = store.artifacts(child.info.run_id)
        assert {"config/config.yaml", "model/state_dict.pt", "figures/train_samples.png"} <= found, found
        assert (launched.server.artifacts / child.info.experiment_id / child.info.run_id).is_dir()
    config = store.download(server_sweep.children[0].info.run_id, "config/config.yaml", tmp_path)
    assert yaml.safe_load(config.read_text())["mlflow"]["tracking_uri"] == launched.server.uri


def test_sweep_parent_holds_the_summary(server_sweep: Sweep, tmp_path: Path) -> None:
    store, parent_id = server_sweep.store, server_sweep.parent.info.run_id
    found = store.artifacts(parent_id)
    assert {"sweep/summary.csv", "sweep/summary.md", "sweep/accuracy.png"} <= found, found
    rows = server_sweep.summary(tmp_path)
    width = next((c for c in rows[0] if c.endswith("conv1_out")), None)
    assert width is not None, f"no column for the swept model.conv1_out in {list(rows[0])}"
    by_width = {float(row[width]): row for row in rows}
    assert set(by_width) == {4.0, 8.0}
    for child in server_sweep.children:
        row = by_width[float(child.data.params["model.conv1_out"])]
        assert child.info.run_id in row.values()
        assert float(row["test/acc"]) == pytest.approx(child.data.metrics["test/acc"])
        assert float(row["test/loss"]) == pytest.approx(child.data.metrics["test/loss"])
    markdown = store.download(parent_id, "sweep/summary.md", tmp_path).read_text()
    assert "test/acc" in markdown and len(markdown.strip().splitlines()) >= 4  # header, rule, 2 rows
    assert store.download(parent_id, "sweep/accuracy.png", tmp_path).read_bytes()[:8] == PNG


# ---------------------------------------------------------------- hyperparameter search
def test_search_history_figure_marks_failed_trials() -> None:
    from cifar_exp import sweep_plots

    fig = sweep_plots.search_history_figure([0.2, None, 0.5, 0.3])
    ax = fig.axes[0]
    best_so_far = next(line for line in ax.lines if line.get_label() == "best so far")
    assert list(best_so_far.get_ydata()) == [0.2, 0.5, 0.5]
    failed = next(line for line in ax.lines if line.get_label() == "failed")
    assert list(failed.get_xdata()) == [2]
    sweep_plots.close(fig)
