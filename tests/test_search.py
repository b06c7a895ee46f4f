"""Hyperparameter search on our Optuna sweeper (`hydra/sweeper=optuna`, cifar_exp/search/): the
search-space syntax hydra-optuna-sweeper users write; the ask/launch/tell loop (a trial per free
slot, pruned and diverged trials recorded, a stopped search continued by the same command, one
controller per study), unit-tested with a stand-in launcher; and searches run end to end on
generated data: pruned trials as MLflow children with their metrics so far and a clear mark, the
parent's story, and one line for every bad input."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    PNG,
    Store,
    compose_config,
    finished_sweep,
    ok,
    recorded_sweep,
    run_in_process,
    signal_ignored,
    synthetic,
)
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig

from cifar_exp.errors import TrialPruned, UserError
from cifar_exp.search import space, study
from cifar_exp.search.trials import search
from cifar_exp.train import NonFiniteLossError


# ---------------------------------------------------------------- the search space
def test_the_space_reads_hydra_optuna_sweeper_syntax() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    items = [
        "optimizer.lr=tag(log, interval(0.001, 0.3))",
        "optimizer.momentum=interval(0.5, 0.95)",
        "model.conv1_out=choice(6, 16, 32)",
        "model.conv2_out=8,16",
        "trainer.epochs=range(1, 4)",  # as in Hydra: the stop is left out
        "model.fc1_out=tag(int, interval(32, 128))",
        "model=cnn",
        "dataset=synthetic",
        "model.conv2_out=16,32",  # a later item for a key replaces the earlier one
    ]
    distributions, fixed = space.parse(items)
    assert distributions == {
        "optimizer.lr": FloatDistribution(0.001, 0.3, log=True),
        "optimizer.momentum": FloatDistribution(0.5, 0.95),
        "model.conv1_out": CategoricalDistribution([6, 16, 32]),
        "model.conv2_out": CategoricalDistribution([16, 32]),
        "trainer.epochs": IntDistribution(1, 3),
        "model.fc1_out": IntDistribution(32, 128),
    }
    assert fixed == ["model=cnn", "dataset=synthetic"]


def test_a_trials_values_read_back_as_the_same_overrides() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = {"optimizer.lr": 0.012345678901234, "model.conv1_out": 16, "trainer.flip": True, "model": "cnn"}
    parsed = OverridesParser.create().parse_overrides(space.overrides(params))
    assert {o.key_or_group: o.value() for o in parsed} == params


@pytest.mark.parametrize(
    ("items", "says"),
    [
        ([], "the search space is empty"),
        (["dataset=synthetic"], "the search space is empty"),
        (["optimizer.lr=interval(0.3, 0.001)"], "'optimizer.lr=interval(0.3, 0.001)': `low <= high`"),
        (["optimizer.lr=tag(log, interval(0, 1))"], "`low > 0` must hold for `log=True`"),
        (["optimizer.lr=choice(0.1,"], "cannot read 'optimizer.lr=choice(0.1,'"),
        (["trainer.epochs=range(5, 1)"], "holds no values"),
        (["model.conv1_out=glob(*)"], "a search takes choice(), range() or interval()"),
    ],
)
def test_a_bad_space_is_one_line(items: list[str], says: str) -> None:
    with pytest.raises(UserError) as error:
        space.parse(items)
    assert says in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- the ask/launch/tell loop
class StandIn:
    """A launcher that runs no training: `outcome(number, params)` is a job's return value, or an
    exception the job raised (as Hydra returns it), or raises itself (the launcher failed)."""

    def __init__(self, outcome: Callable[[int, dict[str, str]], Any]) -> None:
        self.outcome = outcome
        self.launched: list[tuple[int, list[str]]] = []
        self.lock = threading.Lock()

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        [overrides] = job_overrides
        with self.lock:
            self.launched.append((initial_job_idx, overrides))
        params = dict(item.split("=", 1) for item in overrides)
        value = self.outcome(initial_job_idx, params)
        status = JobStatus.FAILED if isinstance(value, BaseException) else JobStatus.COMPLETED
        return [JobReturn(overrides=overrides, status=status, _return_value=value)]

    def numbers(self) -> list[int]:
        return [number for number, _ in self.launched]


@pytest.fixture
def searching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., DictConfig]:
    """searching(*overrides): the composed config of `experiment=search` with a store and sweep
    folder of this test's own, as the sweeper receives it."""

    def config(*overrides: str) -> DictConfig:
        return compose_config(
            "experiment=search",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
            "hydra.sweeper.n_trials=5",
            *overrides,
            hydra_config=True,
        )

    return config


def states(config: DictConfig) -> dict[int, str]:
    """The study's trials by number: their state's name."""
    import optuna

    name, storage = study.study_name(config), study.storage_of(config)
    found = optuna.load_study(study_name=name, storage=study.open_storage(storage))
    return {t.number: t.state.name for t in found.get_trials(deepcopy=False)}


def test_each_trial_is_one_job_that_finds_its_study(searching) -> None:
    config = searching()
    launcher = StandIn(lambda number, params: float(params["optimizer.momentum"]))
    returns = search(config, launcher, ["dataset=synthetic"])
    assert launcher.numbers() == [0, 1, 2, 3, 4] and len(returns) == 5
    name, storage = study.study_name(config), study.storage_of(config)
    for _, overrides in launcher.launched:
        assert overrides[0] == "dataset=synthetic"  # the command line's fixed overrides come first
        assert f"hydra.sweeper.study_name='{name}'" in overrides
        assert f"hydra.sweeper.storage='{storage}'" in overrides
        assert {o.split("=")[0] for o in overrides} >= {
            "optimizer.lr",
            "optimizer.momentum",
            "model.conv1_out",
        }
    assert states(config) == dict.fromkeys(range(5), "COMPLETE")
    results = (Path(config.hydra.sweep.dir) / "optimization_results.yaml").read_text()
    best = max(float(dict(o.split("=", 1) for o in ov)["optimizer.momentum"]) for _, ov in launcher.launched)
    assert f"best_value: {best}" in results


def test_pruned_and_diverged_trials_are_recorded_and_the_search_goes_on(searching) -> None:
    outcomes = {1: TrialPruned("after epoch 1"), 3: NonFiniteLossError("training loss became nan")}
    launcher = StandIn(lambda number, params: outcomes.get(number, 0.5))
    search(searching(), launcher, [])
    assert launcher.numbers() == [0, 1, 2, 3, 4]
    assert states(searching()) == {0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE", 3: "FAIL", 4: "COMPLETE"}


def stops_at_trial_2(kind: str) -> Callable[[int, dict[str, str]], Any]:
    def outcome(number: int, params: dict[str, str]) -> Any:
        if number != 2:
            return 0.5
        if kind == "crashed worker":
            raise RuntimeError("A worker process managed by the executor was unexpectedly terminated")
        return UserError("dataset.root=/nowhere: no such folder")

    return outcome


@pytest.mark.parametrize("kind", ["crashed worker", "user error"])
def test_a_stopped_search_continues_where_it_stopped(searching, kind: str) -> None:
    launcher = StandIn(stops_at_trial_2(kind))
    with pytest.raises(UserError) as error:
        search(searching(), launcher, [])
    assert launcher.numbers() == [0, 1, 2]  # nothing new is asked once a trial stopped the search
    message = str(error.value)
    if kind == "crashed worker":
        assert "trial 2 stopped the search" in message and "run the same command again" in message
    else:
        assert message == "dataset.root=/nowhere: no such folder"
    assert states(searching()) == {0: "COMPLETE", 1: "COMPLETE", 2: "RUNNING"}
    interrupted = launcher.launched[2][1]

    again = StandIn(lambda number, params: 0.5)  # the same command, in a new process
    search(searching(), again, [])
    assert again.numbers() == [2, 3, 4]  # the interrupted trial first, under its own number
    assert again.launched[0][1] == interrupted  # with its own values
    assert states(searching()) == dict.fromkeys(range(5), "COMPLETE")
    search(searching(), StandIn(lambda number, params: 0.5), [])  # done: nothing to run
    assert states(searching()) == dict.fromkeys(range(5), "COMPLETE")


def test_a_larger_n_trials_adds_new_trials_to_the_study(searching) -> None:
    first = StandIn(lambda number, params: float(params["optimizer.lr"]))
    search(searching("hydra.sweeper.n_trials=3"), first, [])
    more = StandIn(lambda number, params: float(params["optimizer.lr"]))
    search(searching("hydra.sweeper.n_trials=5"), more, [])
    assert more.numbers() == [3, 4]
    lrs = [dict(o.split("=", 1) for o in ov)["optimizer.lr"] for _, ov in first.launched + more.launched]
    assert len(set(lrs)) == 5  # a continued study draws new values (seeded afresh it would repeat)


def test_a_free_slot_starts_the_next_trial_without_waiting_for_the_others(searching) -> None:
    third_started = threading.Event()

    def outcome(number: int, params: dict[str, str]) -> Any:
        if number == 2:
            third_started.set()
        if number == 0:  # the slow trial: a batch-by-batch sweeper would wait for it before trial 2
            return 1.0 if third_started.wait(timeout=60) else RuntimeError("trial 2 waited for trial 0")
        return 0.5

    launcher = StandIn(outcome)
    search(searching("hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"), launcher, [])
    assert sorted(launcher.numbers()) == [0, 1, 2, 3, 4]
    assert states(searching()) == dict.fromkeys(range(5), "COMPLETE")


def test_one_controller_per_study(searching, tmp_path: Path) -> None:
    from filelock import FileLock

    config = searching()
    claim = study.claim(config)
    assert Path(claim.storage) == tmp_path / study.JOURNAL  # beside the MLflow store
    study.claim(config).release()  # the sweep callback and the sweeper of one process share it
    claim.release()
    assert not claim.lock.is_locked  # released by every holder: free for another search
    other = FileLock(tmp_path / f"optuna-{claim.name}.lock")  # another process's lock (its own file handle)
    with other, pytest.raises(UserError, match=r"is being searched by another process \(pid \d+\)"):
        study.claim(config)


def test_the_same_command_names_the_same_study(searching) -> None:
    name = study.study_name(searching())
    assert name == study.study_name(searching())
    assert name != study.study_name(searching("hydra.sweeper.pruner.name=none"))
    assert name != study.study_name(searching("trainer.epochs=3"))
    assert name == study.study_name(searching("hydra.sweeper.n_trials=50"))  # more trials: same study
    assert study.study_name(searching("hydra.sweeper.study_name=mine")) == "mine"


def test_the_retired_plugin_taking_our_place_is_one_line(searching) -> None:
    config = searching()
    config.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    with pytest.raises(UserError, match="pip uninstall hydra-optuna-sweeper"):
        study.is_search(config)


def test_n_jobs_without_a_parallel_launcher_is_one_line(searching) -> None:
    with pytest.raises(UserError, match="hydra.sweeper.n_jobs=2 needs a parallel launcher"):
        search(searching("hydra.sweeper.n_jobs=2"), StandIn(lambda n, p: 0.5), [])


# ---------------------------------------------------------------- searches, end to end
TINY = synthetic(train=320, val=100, test=100, epochs=3, batch=32, log_every=None)
# Half the trials learn nothing (lr 1e-7): the median pruner, after one finished trial, stops them.
# Each trial reports val/acc twice an epoch (after 5 and 10 of its 10 steps).
PRUNING = [
    "experiment=search",
    *TINY,
    "hydra.sweeper.reports_per_epoch=2",
    "hydra.sweeper.n_trials=6",
    "hydra.sweeper.sampler.name=random",
    "hydra.sweeper.pruner.name=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=2",  # from the end of epoch 1 (report 2) on
    "optimizer.lr=choice(0.05, 0.0000001)",
    "-m",
]


@pytest.fixture(scope="module")
def pruned_search(new_store) -> Any:
    """Run in this process (conftest's run_in_process); the slow tests below run real ones."""
    store = new_store("search")
    ended = run_in_process(*PRUNING, cwd=store.cwd, env={"MLFLOW_TRACKING_URI": store.uri})
    return recorded_sweep(store, ended, store.cwd)


def test_a_pruned_trial_is_a_child_with_its_metrics_so_far_and_a_clear_mark(pruned_search) -> None:
    ok(pruned_search.result)
    children = pruned_search.children
    assert len(children) == 6
    pruned = [c for c in children if "pruned" in c.data.tags]
    finished = [c for c in children if "pruned" not in c.data.tags]
    assert pruned and finished, [(c.info.run_name, c.info.status) for c in children]
    store: Store = pruned_search.store
    for child in pruned:
        assert child.info.status == "KILLED"  # stopped early, not failed
        assert child.data.tags["pruned"].startswith("after epoch ")
        assert child.data.params["optimizer.lr"] == "1e-07"
        assert 1 <= len(store.history(child.info.run_id, "val/acc")) < 6  # its reports so far
        assert store.history(child.info.run_id, "test/acc") == []  # the test split is for the end
    for child in finished:
        assert child.info.status == "FINISHED"
        # val/acc twice an epoch, at steps 5, 10, ..., 30; test/acc once, at the end
        assert [step for step, _ in store.history(child.info.run_id, "val/acc")] == [5, 10, 15, 20, 25, 30]
        assert [step for step, _ in store.history(child.info.run_id, "test/acc")] == [30]


def test_the_study_agrees_with_the_runs(pruned_search) -> None:
    import optuna

    tags = pruned_search.parent.data.tags
    found = optuna.load_study(
        study_name=tags["search/study"], storage=study.open_storage(tags["search/storage"])
    )
    by_number = {t.number: t for t in found.get_trials()}
    for child in pruned_search.children:
        number = int(Path(child.data.tags["hydra_output_dir"]).name)  # a trial's job number is its own
        trial = by_number[number]
        assert trial.state.name == ("PRUNED" if "pruned" in child.data.tags else "COMPLETE")
        reported = [value for _, value in pruned_search.store.history(child.info.run_id, "val/acc")]
        assert [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)] == reported
        if trial.state.name == "COMPLETE":  # it returned val/acc, chosen on the validation split
            assert sorted(trial.intermediate_values) == [1, 2, 3, 4, 5, 6]
            assert trial.value == child.data.metrics["val/acc"]


def test_the_parent_tells_the_searchs_story(pruned_search, tmp_path: Path) -> None:
    parent, store = pruned_search.parent, pruned_search.store
    metrics = parent.data.metrics
    pruned = sum("pruned" in c.data.tags for c in pruned_search.children)
    assert parent.info.status == "FINISHED"
    assert metrics["search/trials_pruned"] == pruned
    assert metrics["search/trials_finished"] == 6 - pruned
    # a trial pruned within an epoch (reports twice an epoch) counts the part it trained
    trained = sum(
        float(c.data.tags["pruned"].split()[2])
        if "pruned" in c.data.tags
        else len(store.history(c.info.run_id, "time/epoch_s"))
        for c in pruned_search.children
    )
    assert metrics["search/epochs_trained"] == trained < metrics["search/epochs_unpruned"] == 18
    best = max(c.data.metrics["val/acc"] for c in pruned_search.children if "pruned" not in c.data.tags)
    assert metrics["best/val/acc"] == pytest.approx(best)
    best_child = store.run(parent.data.tags["best_run_id"])
    assert best_child.data.metrics["val/acc"] == pytest.approx(best)
    assert metrics["best/test/acc"] == best_child.data.metrics["test/acc"]  # reported, never chosen on
    assert parent.data.tags["best/optimizer.lr"] == best_child.data.params["optimizer.lr"]
    note = parent.data.tags["mlflow.note.content"]
    assert f"{pruned} pruned" in note and f"Epochs trained: {trained:.4g} of the 18" in note
    assert best_child.info.run_id in note  # the link to the best trial
    assert "search/history.png" in store.artifacts(parent.info.run_id)
    rows = pruned_search.summary(tmp_path)
    assert sorted(r["status"] for r in rows) == sorted(["PRUNED"] * pruned + ["FINISHED"] * (6 - pruned))


def test_the_parent_records_the_best_trial_beside_the_sweep(pruned_search, tmp_path: Path) -> None:
    """The best trial's values as tags, the same best value the sweeper wrote beside the sweep (as
    hydra-optuna-sweeper did), every trial inside experiments/search.yaml's space, the history plot a
    PNG. (Moved from test_scale_out.py, which ran a search of its own for them.)"""
    parent, store = pruned_search.parent, pruned_search.store
    assert "best trial" in pruned_search.result.stdout + pruned_search.result.stderr  # our sweeper ran
    for child in pruned_search.children:  # the space PRUNING leaves as experiments/search.yaml has it
        assert 0.5 <= float(child.data.params["optimizer.momentum"]) <= 0.95
        assert child.data.params["model.conv1_out"] in {"6", "16", "32"}
    best_child = store.run(parent.data.tags["best_run_id"])
    for key in ("optimizer.lr", "optimizer.momentum", "model.conv1_out"):
        assert float(parent.data.tags[f"best/{key}"]) == pytest.approx(float(best_child.data.params[key]))
    sweep_dir = pruned_search.cwd / parent.data.tags["hydra_sweep_dir"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(parent.data.metrics["best/val/acc"])
    assert json.loads(parent.data.tags["sweep_params"]).keys() == results["best_params"].keys()
    history = store.download(parent.info.run_id, "search/history.png", tmp_path)
    assert history.read_bytes()[:8] == PNG


def test_compare_tells_pruned_from_finished(
    pruned_search, main_in_process, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pruned_search.store.uri)
    result = main_in_process("compare", "latest")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pruned = sum("pruned" in c.data.tags for c in pruned_search.children)
    assert sum(" PRUNED " in line for line in lines) == pruned
    assert sum(" FINISHED " in line for line in lines) == 6 - pruned


def test_the_search_history_marks_pruned_trials() -> None:
    from cifar_exp import sweep_plots

    fig = sweep_plots.search_history_figure(
        [0.2, 0.1, 0.5, 0.3, None], pruned=[False, True, False, False, False]
    )
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert list(lines["best so far"].get_ydata()) == [0.2, 0.5, 0.5]  # finished trials only
    assert list(lines["pruned (last value)"].get_xdata()) == [2]
    assert list(lines["failed"].get_xdata()) == [5]
    sweep_plots.close(fig)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["hydra.sweeper.pruner.name=sometimes"], "hydra.sweeper.pruner.name"),
        (["hydra.sweeper.sampler.name=grid"], "hydra.sweeper.sampler.name"),
        (["hydra.sweeper.direction=sideways"], "hydra.sweeper.direction"),
        (["hydra.sweeper.metric=test/f1"], "hydra.sweeper.metric=test/f1: no run logs it"),
        (["hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0 must be at least 1"),
        (["hydra.sweeper.reports_per_epoch=0"], "hydra.sweeper.reports_per_epoch=0 must be at least 1"),
        (["hydra.sweeper.params=null"], "the search space is empty"),
        (["optimizer.lr=interval(0.3, 0.001)"], "`low <= high` must hold"),
        (['hydra.sweeper.params={optimizer.lr:"choice(0.1,"}'], "cannot read 'optimizer.lr=choice(0.1,'"),
    ],
)
def test_bad_search_input_is_one_line_before_anything_is_written(
    main_in_process, empty_store_file: Path, tmp_path: Path, overrides: list[str], says: str
) -> None:
    """Through the front door in this process (tests/test_errors.py runs one mistake as a command)."""
    shutil.copy(empty_store_file, tmp_path / "mlflow.db")  # the test's store (MLFLOW_TRACKING_URI)
    result = main_in_process("experiment=search", *TINY, *overrides, "-m")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert says in line, result.stderr
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    assert store.runs() == []  # not even the search's parent run


# ---------------------------------------------------------------- one child per trial
def test_a_trial_run_again_keeps_one_child_its_finished_pruned_or_checkpointed_one(
    new_store, tmp_path: Path
) -> None:
    """search.trial.previous_trial_run, on children as a killed controller leaves them: a trial's child
    without a checkpoint (RUNNING, its process gone; or failed) is deleted and the trial trains
    again; its FINISHED, pruned or checkpointed child stands; other trials' children are not touched;
    a child another live process writes is one line, nothing deleted."""
    import os
    import socket
    import time

    from cifar_exp.search.trial import previous_trial_run
    from cifar_exp.tracking import identity, leases

    store = new_store("trial-children")
    client = store.client()
    experiment = client.create_experiment("cifar_exp", str(store.root / "artifacts"))
    parent = client.create_run(experiment, run_name="search").info.run_id
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")
    gone = leases.Lease(f"{socket.gethostname()}:999999999", "gone", time.time() + 60).tag()
    alive = leases.Lease(f"{socket.gethostname()}:{os.getpid()}", "here", time.time() + 60).tag()

    def child(trial: int, status: str, **tags: str) -> str:
        tags = {
            "mlflow.parentRunId": parent,
            identity.HASH_TAG: f"h{trial}",
            "search/trial": str(trial),
            **tags,
        }
        run_id = client.create_run(experiment, tags=tags).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    def again(trial: int) -> identity.PreviousRun | None:
        return previous_trial_run(client, experiment, parent, trial, f"h{trial}")

    orphans = [child(0, "RUNNING", **gone), child(0, "FAILED", error="boom")]
    assert again(0) is None  # trained again, into a new child
    assert {client.get_run(r).info.lifecycle_stage for r in orphans} == {"deleted"}
    finished = child(1, "FINISHED")
    extra = child(1, "RUNNING", **gone)
    assert (again(1).run_id, again(1).status) == (finished, "FINISHED")
    assert client.get_run(extra).info.lifecycle_stage == "deleted"
    pruned = child(2, "KILLED", pruned="after epoch 1 of 3: val/acc 0.1000")
    assert (again(2).run_id, again(2).pruned) == (pruned, "after epoch 1 of 3: val/acc 0.1000")
    killed = child(3, "KILLED", checkpoint=str(checkpoint))
    assert (again(3).run_id, again(3).checkpoint) == (killed, str(checkpoint))
    busy = child(4, "RUNNING", **alive)
    with pytest.raises(UserError, match="is being continued by process"):
        again(4)
    assert client.get_run(busy).info.lifecycle_stage == "active"
    assert client.get_run(finished).info.lifecycle_stage == "active"


def test_a_searchs_best_is_its_studys_best_trial_never_a_pruned_one() -> None:
    """Two trials with the same val/acc: the summary marks the one the study names (Optuna: the
    lowest number), not the lower loss; a pruned trial's higher value is never best."""
    from types import SimpleNamespace

    from cifar_exp.sweep_summary import Summary, summary_rows

    def child(trial: int, acc: float, loss: float, status: str = "FINISHED", **tags: str) -> Any:
        data = SimpleNamespace(
            metrics={"val/acc": acc, "val/loss": loss}, params={}, tags={"search/trial": str(trial), **tags}
        )
        info = SimpleNamespace(run_id=f"{trial:032d}", status=status, run_name=f"t{trial}", start_time=trial)
        return SimpleNamespace(data=data, info=info)

    children = [child(0, 0.5, 0.9), child(1, 0.5, 0.1), child(2, 0.9, 0.1, "KILLED", pruned="after epoch 1")]
    rows = summary_rows(children, [], {}, "val/acc", True, best_trial=0)
    assert [r["trial"] for r in rows if r["best"]] == ["0"] and rows[0]["trial"] == "0"
    parent = SimpleNamespace(data=SimpleNamespace(tags={"search/metric": "val/acc"}))
    assert "best trial 0: val/acc 0.5000" in Summary(parent, rows, [], "val/acc", True).footer()[-1]
    fallback = summary_rows(children, [], {}, "val/acc", True)  # the study not readable here
    assert [r["trial"] for r in fallback if r["best"]] == ["1"]


# ---------------------------------------------------------------- slow: a real Ctrl-C, real workers
@pytest.mark.slow
def test_ctrl_c_then_the_same_command_continues_the_search(new_store) -> None:
    if signal_ignored(signal.SIGINT):
        pytest.skip("SIGINT is ignored here, so the command would ignore it too")
    store = new_store("interrupted")
    args = [
        "experiment=search",
        *synthetic(train=640, test=100, epochs=3, batch=32),
        "hydra.sweeper.n_trials=4",
    ]
    args += ["hydra.sweeper.pruner.name=none", "-m"]
    first = store.start_cli(*args)
    first.wait_for(r"(?s)trial 2: .*epoch 2/3")  # trial 2 has a checkpoint
    first.proc.send_signal(signal.SIGINT)
    assert first.result().returncode == 130
    interrupted = [r for r in store.runs() if r.info.status == "KILLED" and "sweep" not in r.data.tags]
    assert len(interrupted) == 1
    second = ok(store.run_cli(*args))
    assert "2 of 4 trials done, 1 to resume" in second.stderr + second.stdout
    runs = store.runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent, reopened
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    resumed = store.run(interrupted[0].info.run_id)  # the interrupted trial's run, resumed
    assert resumed.info.status == "FINISHED"
    assert [step for step, _ in store.history(resumed.info.run_id, "test/acc")] == sorted(
        {step for step, _ in store.history(resumed.info.run_id, "test/acc")}
    )
    assert len(store.history(resumed.info.run_id, "test/acc")) == 3  # no epoch lost or repeated


@pytest.mark.slow
def test_parallel_trials_in_joblib_workers_report_and_prune(new_store) -> None:
    store = new_store("parallel")
    args = [a for a in PRUNING if a != "-m"]
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "-m"]
    sweep = finished_sweep(store, store.start_cli(*args, *parallel))
    ok(sweep.result)
    assert len(sweep.children) == 6
    assert any("pruned" in c.data.tags for c in sweep.children)  # workers reported to the study
    assert sweep.parent.info.status == "FINISHED"
    assert json.loads(sweep.parent.data.tags["sweep_params"]).keys() >= {"optimizer.lr"}


@pytest.mark.slow
def test_a_search_killed_before_a_trials_first_checkpoint_keeps_one_child_per_trial(new_store) -> None:
    """SIGKILL of the controller while trial 1 trains its first epoch (no checkpoint yet), then the
    same command: the trial trains again into one child (the orphan is replaced), none is left
    RUNNING, the parent ends FINISHED, and it names the study's best trial, as the console does."""
    import optuna

    store = new_store("killed-search")
    args = ["experiment=search", *synthetic(train=1500, val=100, test=100, epochs=1, batch=1, log_every=None)]
    args += ["hydra.sweeper.n_trials=3", "hydra.sweeper.pruner.name=none", "-m"]
    first = store.start_cli(*args)
    first.wait_for(r"(?s)trial 1: .*^MLflow run [0-9a-f]{32} ")
    first.proc.send_signal(signal.SIGKILL)
    assert first.result().returncode == -signal.SIGKILL
    assert not list(store.cwd.glob("multirun/*/*/1/checkpoint.pt")), (
        "killed too late: trial 1 had a checkpoint"
    )
    second = ok(store.run_cli(*args))
    output = second.stdout + second.stderr
    assert "Traceback" not in output and "1 of 3 trials done, 1 to resume" in output, output
    runs = store.runs()
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert sorted(c.data.tags["search/trial"] for c in children) == ["0", "1", "2"]
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    found = optuna.load_study(
        study_name=tags["search/study"], storage=study.open_storage(tags["search/storage"])
    )
    best = found.best_trial.number
    assert tags["best_trial"] == str(best)
    assert store.run(tags["best_run_id"]).data.tags["search/trial"] == str(best)
    assert f"best trial {best}: val/acc" in output  # the console's line, and the summary's
    assert output.count(f"best trial {best}: val/acc") == 2, output
