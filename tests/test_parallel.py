"""Parallel sweeps: with Hydra's joblib launcher several jobs write to one SQLite store at once, and
every run is recorded whole: no "database is locked", no lost metric, no half-created experiment.
On several GPUs each parallel job gets a GPU of its own (faked here: this machine has none).

The full joblib sweep is slow (8 jobs, 4 at a time, each a fresh process importing torch); the writer
under contention and the GPU assignment are tested in-process."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN_ARTIFACTS, Store, ok, start, synthetic
from omegaconf import OmegaConf

from cifar_exp import devices, sweeps
from cifar_exp.tracking import identity, store
from cifar_exp.tracking.records import RecordWriter

TRAIN_SIZE, TEST_SIZE, EPOCHS, BATCH, LOG_EVERY = 320, 100, 2, 32, 5
SMALL = synthetic(train=TRAIN_SIZE, test=TEST_SIZE, epochs=EPOCHS, batch=BATCH, log_every=LOG_EVERY)
JOBS, N_JOBS = 8, 4
CLASSES = 10  # the synthetic dataset's
EPOCH_METRICS = [
    "train/loss_epoch",
    "test/loss",
    "test/acc",
    "time/epoch_s",
    "time/eval_s",
    "throughput/images_per_s",
]


STEPS_PER_EPOCH = math.ceil(TRAIN_SIZE / BATCH)
EPOCH_ENDS = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]


def expected_metric_steps(keys: set[str]) -> dict[str, list[int]]:
    """The steps of every metric a job logs, from the config: the loss every LOG_EVERY global
    steps, the epoch metrics and per-class accuracies (and any metric added since) at each epoch's
    last step. Fails if one of the metrics listed here is missing from `keys`."""
    expected = {"train/loss": list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))}
    for key in EPOCH_METRICS + [f"test/acc/class_{i}" for i in range(CLASSES)]:
        expected[key] = EPOCH_ENDS
    assert set(expected) <= keys, set(expected) - keys
    return {key: expected.get(key, EPOCH_ENDS) for key in keys}


# ---------------------------------------------------------------- the joblib sweep, end to end
@pytest.mark.slow
def test_a_joblib_sweep_records_every_run_whole(new_store, compose_config) -> None:
    store = new_store("joblib", created=False)  # one fresh store for all jobs
    seeds = ",".join(str(seed) for seed in range(JOBS))
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={N_JOBS}"]
    result = ok(store.run_cli(*SMALL, f"seed={seeds}", *launcher, "-m", timeout=600))
    output = result.stdout + result.stderr
    assert "locked" not in output and "Traceback" not in output, output
    assert "Joblib.Parallel(n_jobs=4" in output, output  # the jobs did run through joblib
    # The parent run (and with it the store and the experiment) existed before any worker started.
    assert output.index("MLflow parent run") < output.index("Joblib.Parallel("), output

    experiments = {e.name: e.experiment_id for e in store.client().search_experiments()}
    assert set(experiments) == {"cifar_exp"}  # created once, whole; MLflow's empty "Default" hidden
    runs = store.client().search_runs(list(experiments.values()), max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert len(children) == JOBS
    assert all(r.info.status == "FINISHED" and r.info.end_time for r in runs)
    assert {r.info.experiment_id for r in runs} == {experiments["cifar_exp"]}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    overlapping = sum(
        a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
        for i, a in enumerate(children)
        for b in children[i + 1 :]
    )
    assert overlapping > 0, "no two jobs ran at the same time"

    by_seed = {int(c.data.params["seed"]): c for c in children}
    assert set(by_seed) == set(range(JOBS))
    expected_steps = expected_metric_steps(set(by_seed[0].data.metrics))
    points = 0
    for seed, child in by_seed.items():
        cfg = compose_config(*SMALL, f"seed={seed}")
        config = identity.flatten(OmegaConf.to_container(cfg, resolve=True))
        expected_params = {**config, "data": "synthetic", "split/val_images": "0"}  # no validation split
        assert child.data.params == expected_params, seed
        assert set(child.data.metrics) == set(expected_steps), seed
        for key, steps in expected_steps.items():
            history = store.history(child.info.run_id, key)
            assert [step for step, _ in history] == steps, (seed, key)
            points += len(history)
        found = store.artifacts(child.info.run_id)
        assert RUN_ARTIFACTS <= found, (seed, RUN_ARTIFACTS - found)
    assert points == JOBS * sum(len(steps) for steps in expected_steps.values())  # 8 x 36 today
    assert len({c.data.tags["hydra_output_dir"] for c in children}) == JOBS
    assert {"sweep/summary.csv", "sweep/summary.md"} <= store.artifacts(parent.info.run_id)
    assert store.history(parent.info.run_id, "best/test/acc")


# ---------------------------------------------------------------- a fresh store, opened at once
OPEN_STORE = """
import sys, time
from pathlib import Path
from cifar_exp.tracking import store
from cifar_exp.config import TrackingConfig
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(store.ensure_experiment(TrackingConfig(tracking_uri=sys.argv[1])), flush=True)
"""


def test_processes_opening_a_fresh_store_at_once_create_it_once(tmp_path: Path) -> None:
    """Left to MLflow, of four processes opening a new SQLite file at once three failed (tables
    created twice, migrations colliding), and of two, one failed in each of three tries;
    ensure_experiment lets one create it at a time."""
    uri, go = f"sqlite:///{tmp_path}/store/mlflow.db", tmp_path / "go"
    commands = [start([sys.executable, "-c", OPEN_STORE, uri, str(go)], tmp_path) for _ in range(2)]
    try:
        for command in commands:  # every process imported everything: they now start together
            command.wait_for("^ready$")
        go.touch()
        results = [command.result(120) for command in commands]
    finally:
        for command in commands:
            command.stop()
    assert [result.returncode for result in results] == [0, 0], [r.stderr for r in results]
    ids = {result.stdout.removeprefix("ready\n").strip() for result in results}
    assert len(ids) == 1
    experiments = Store(uri).client().search_experiments()
    assert sorted(e.name for e in experiments) == ["cifar_exp"]  # MLflow's empty "Default" hidden


# ---------------------------------------------------------------- many writers, one SQLite store
def test_writers_of_parallel_runs_lose_nothing_on_one_sqlite_store(tmp_path: Path) -> None:
    """Eight runs' writers and their training loops at once, against one SQLite file: every param
    and every metric point lands (a locked database is waited out or retried, never dropped)."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.config import TrackingConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = store.ensure_experiment(TrackingConfig(tracking_uri=uri))
    client = MlflowClient(uri)
    run_ids = [client.create_run(experiment_id).info.run_id for _ in range(JOBS)]
    steps, keys, params = 60, [f"m/{k}" for k in range(16)], {f"p{k}": str(k) for k in range(46)}

    def train(run_id: str, errors: list) -> None:
        writer = RecordWriter(MlflowClient(uri), run_id, tmp_path / run_id / "unrecorded.jsonl")
        writer.log_params(params)
        for step in range(1, steps + 1):
            writer.log_metrics({key: step / 7 for key in keys}, step)
            if step % 10 == 0:
                time.sleep(0.01)  # training: what comes next goes out as another batch
        errors.append(writer.close())

    errors: list = []
    loops = [threading.Thread(target=train, args=(run_id, errors)) for run_id in run_ids]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join(120)
    assert errors == [None] * JOBS
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.data.params == params
        for key in keys:
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, steps + 1))
    assert not list(tmp_path.rglob("unrecorded.jsonl"))


# ---------------------------------------------------------------- one GPU per parallel job
@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch believes it sees four GPUs and has not initialised CUDA; CUDA_VISIBLE_DEVICES unset."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _release_locks(lock_dir: Path) -> None:
    """claim_gpu holds each lock for the life of the worker; this process is not one."""
    for lock in [lock for lock in devices.HELD_GPU_LOCKS if Path(lock.lock_file).parent == lock_dir]:
        lock.release()
        devices.HELD_GPU_LOCKS.remove(lock)


def test_parallel_jobs_get_a_gpu_each(
    four_gpus: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    locks = tmp_path / ".gpu_locks"
    try:
        claimed = []
        for job in [0, 1, 5, 3]:  # job 5 prefers GPU 1, which job 1's worker holds: it takes the next
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # a worker: the sweep's env
            claimed.append((devices.claim_gpu(job, locks), os.environ["CUDA_VISIBLE_DEVICES"]))
        assert claimed == [(0, "0"), (1, "1"), (2, "2"), (3, "3")]
        assert not caplog.records
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert devices.claim_gpu(6, locks) == 2  # a fifth worker at once: shares, and says so
        assert "n_jobs to at most 4" in caplog.text
    finally:
        _release_locks(locks)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.claim_gpu(7, locks) == 3  # once the workers are gone, GPU 3 is free again
    _release_locks(locks)


def test_claimed_gpus_are_taken_from_the_visible_ones(
    four_gpus: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    try:
        assert devices.claim_gpu(2, tmp_path) == 2
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    finally:
        _release_locks(tmp_path)


def test_claiming_a_gpu_changes_nothing_on_cpu_or_once_cuda_is_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a CPU-only machine
    assert devices.claim_gpu(3, tmp_path / "locks") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.claim_gpu(3, tmp_path / "locks") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a reused worker keeps its GPU
    assert devices.claim_gpu(3, tmp_path / "locks") is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert not (tmp_path / "locks").exists()


@pytest.mark.parametrize(
    ("overrides", "claims"),
    [
        (["hydra/launcher=joblib", "device=auto"], True),
        (["hydra/launcher=joblib", "device=cuda"], True),
        (["hydra/launcher=joblib", "device=cpu"], False),
        (["device=auto"], False),  # Hydra's basic launcher runs the jobs one after another
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else str(x),
)
def test_the_sweep_callback_claims_a_gpu_for_each_joblib_job(
    compose_config, monkeypatch: pytest.MonkeyPatch, overrides: list[str], claims: bool
) -> None:
    calls = []
    monkeypatch.setattr(devices, "claim_gpu", lambda num, lock_dir: calls.append((num, lock_dir)))
    cfg = compose_config(*overrides, hydra_config=True)
    OmegaConf.update(cfg, "hydra.job.num", 5, force_add=True)
    sweeps.SweepCallback().on_job_start(config=cfg, task_function=None)
    if claims:
        assert calls == [(5, Path(cfg.hydra.sweep.dir) / ".gpu_locks")]
    else:
        assert calls == []
