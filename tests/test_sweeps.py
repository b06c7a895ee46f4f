"""A sweep as a person reads it: names that say what differs, the parent run that describes its
sweep, the summary and plot, `cifar-exp compare`, `runs` and `ui`'s links, a tidy store; and a run's
code: the uncommitted diff kept with it, and `rerun` warning when the code differs, reproducing the
metrics once the recorded commit and diff are restored.

Naming, the summary and the plot are unit-tested on fake runs; one two-job sweep and one run from a
dirty copy of the project (with its reruns from clean clones) run end to end, the sweep in this
process while that run's subprocess starts, so their imports and training share the cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Ended, run_in_process

from cifar_exp import commands, run_names, sweep_plots, sweep_summary, sweeps, tables, ui_server
from cifar_exp.errors import UserError
from cifar_exp.tracking import identity

REPO = Path(__file__).resolve().parent.parent
SMALL = [  # as a user types it: fixed overrides first
    "dataset=synthetic",
    "dataset.train_size=160",
    "dataset.test_size=50",
    "trainer.epochs=1",
    "trainer.batch_size=32",
    "device=cpu",
]


# ---------------------------------------------------------------- names
def test_short_keys_are_the_shortest_unambiguous_endings() -> None:
    assert run_names.short_keys(["model.conv1_out", "optimizer.lr"]) == {
        "model.conv1_out": "conv1_out",
        "optimizer.lr": "lr",
    }
    assert run_names.short_keys(["optimizer.lr", "scheduler.lr", "seed"]) == {
        "optimizer.lr": "optimizer.lr",
        "scheduler.lr": "scheduler.lr",
        "seed": "seed",
    }


def test_a_sweeps_job_is_named_by_its_swept_values_only() -> None:
    overrides = [*SMALL, "+extra=1", "model.conv1_out=16", "optimizer.lr=0.0123456789"]
    swept = ["model.conv1_out", "optimizer.lr"]
    assert run_names.run_name(overrides, swept) == "conv1_out=16,lr=0.01235"
    assert run_names.run_name(["model=airbench94", "seed=3"], ["model", "seed"]) == "model=airbench94,seed=3"


def test_sweep_overrides_split_what_varies_from_what_is_fixed() -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"model.conv2_out": "16,32", "seed": "0"}},
                "overrides": {"task": [*SMALL, "model.conv1_out=4,8", "+extra=a,b", "model.conv2_out=64"]},
            }
        }
    )
    swept, fixed = sweeps.sweep_overrides(config)
    assert swept == {"model.conv1_out": "4,8", "extra": "a,b"}  # conv2_out: fixed by the command line
    assert fixed == {"seed": "0", **dict(o.split("=") for o in SMALL), "model.conv2_out": "64"}
    search = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"optimizer.lr": "tag(log, interval(0.001, 0.3))"}},
                "overrides": {"task": []},
            }
        }
    )
    assert sweeps.sweep_overrides(search) == ({"optimizer.lr": "tag(log, interval(0.001, 0.3))"}, {})


def test_a_sweeps_parent_is_named_by_what_it_varies_and_when() -> None:
    started = time.mktime((2025, 6, 12, 15, 30, 12, 0, 0, -1))
    grid = {"model.conv1_out": "8,16,32", "optimizer.lr": "0.01,0.1"}
    assert sweeps.sweep_name(grid, False, started) == "sweep conv1_out=8,16,32 lr=0.01,0.1 @ 06-12 15:30:12"
    search = {"optimizer.lr": "tag(log, interval(0.001, 0.3))", "model.conv1_out": "choice(6,16,32)"}
    assert sweeps.sweep_name(search, True, started) == "search lr,conv1_out @ 06-12 15:30:12"
    wide = {f"model.key{i}": "1,2,3,4,5,6" for i in range(4)}
    assert sweeps.sweep_name(wide, False, started) == "sweep key0,key1,key2,key3 @ 06-12 15:30:12"


# ---------------------------------------------------------------- the summary, on fake runs
def fake_run(n: int, overrides: list[str], acc: float | None, status: str = "FINISHED", **tags: str) -> Any:
    values = dict(run_names.split_override(o) for o in overrides)
    metrics = {} if acc is None else {"test/acc": acc, "test/loss": 2.0 - acc}
    return SimpleNamespace(
        info=SimpleNamespace(
            run_id=f"{n:032x}", run_name=f"run {n}", status=status, start_time=n, experiment_id="7"
        ),
        data=SimpleNamespace(
            params={"dataset._target_": "load_synthetic", **values},
            metrics=metrics,
            tags={"overrides": json.dumps(overrides), **tags},
        ),
    )


@pytest.fixture
def grid() -> tuple[Any, list[Any]]:
    """A 3x2 grid (conv1_out x lr; seed swept but held at one value) with one failed job; two
    children share the best accuracy, the one with the lower loss is the best."""
    parent = fake_run(
        0,
        [],
        None,
        sweep_params=json.dumps({"model.conv1_out": "4,8,16", "optimizer.lr": "0.01,0.1", "seed": "0"}),
    )
    accs = {(4, 0.01): 0.41, (8, 0.01): 0.52, (16, 0.01): 0.47, (4, 0.1): 0.3, (8, 0.1): 0.10000000149011612}
    children = []
    for n, (width, lr) in enumerate([(4, 0.01), (8, 0.01), (16, 0.01), (4, 0.1), (8, 0.1), (16, 0.1)], 1):
        overrides = [*SMALL, "seed=0", f"model.conv1_out={width}", f"optimizer.lr={lr}"]
        acc = accs.get((width, lr))
        children.append(fake_run(n, overrides, acc, "FINISHED" if acc else "FAILED"))
    return parent, children


def test_summary_shows_only_what_varies_rounded_best_first(grid: tuple[Any, list[Any]]) -> None:
    parent, children = grid
    keys = sweep_summary.varying_keys(parent, children)
    assert keys == ["model.conv1_out", "optimizer.lr"]  # not seed, not the fixed overrides
    # no child logs val/acc (dataset.val_size=0): the test split chooses, and says so
    metric, maximize = sweep_summary.objective(parent, children)
    assert (metric, maximize) == ("test/acc", True)
    rows = sweep_summary.summary_rows(children, keys, {c.info.run_id: [12.345] for c in children}, metric)
    assert [r["test/acc"] for r in rows] == [0.52, 0.47, 0.41, 0.3, 0.10000000149011612, ""]
    assert [r["best"] for r in rows] == [True] + [False] * 5
    markdown = tables.markdown_table(sweep_summary.display_rows(rows, keys, metric=metric))
    lines = markdown.splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["best", "conv1_out", "lr", "test/acc", "test/loss", "train s", "status", "run"]
    best = ["★", "8", "0.01", "0.5200", "1.4800", "12.35", "FINISHED", children[1].info.run_id[:8]]
    assert cells[2] == best
    assert "0.1000" in cells[-2] and "0.10000000149" not in markdown
    assert max(len(line) for line in lines) < 100  # one short line a row, no run names
    finished = [c for c in children if c.info.status == "FINISHED"]
    table = tables.markdown_table(
        sweep_summary.display_rows(
            sweep_summary.summary_rows(finished, keys, {}, metric), keys, metric=metric
        )
    )
    assert "status" not in table  # said only when a job did not finish
    footer = sweep_summary.Summary(parent, rows, keys, metric, maximize).footer()
    assert footer[0].startswith("chosen on the test split (test/acc): no validation split")
    assert footer[1].startswith("one seed per config: these differences carry no error bars")


def test_summary_of_an_old_parent_uses_the_overrides_that_differ(grid: tuple[Any, list[Any]]) -> None:
    _, children = grid
    old_parent = fake_run(0, [], None)  # recorded before sweep_params held command-line sweeps
    assert sweep_summary.varying_keys(old_parent, children) == ["model.conv1_out", "optimizer.lr"]


def test_parent_description_links_the_best_child(grid: tuple[Any, list[Any]]) -> None:
    parent, children = grid
    keys = sweep_summary.varying_keys(parent, children)
    metric, maximize = sweep_summary.objective(parent, children)
    rows = sweep_summary.summary_rows(children, keys, {}, metric)
    note = sweep_summary.sweep_note(
        parent, sweep_summary.Summary(parent, rows, keys, metric, maximize), False
    )
    best = children[1].info.run_id
    assert note.startswith("**Sweep over conv1_out, lr**: 6 runs, 5 finished.")
    assert f"Best: [conv1_out=8,lr=0.01](#/experiments/7/runs/{best}?workflowType=machine_learning)" in note
    assert "test/acc 0.5200" in note and "chosen on test/acc" in note


@pytest.fixture
def seeded() -> tuple[Any, list[Any]]:
    """conv1_out=4,8,16 x seed=0,1,2 with validation and test accuracies: 8 is best on val/acc,
    16 best on test/acc (which must not choose), 4 close to 8 on val/acc."""
    parent = fake_run(0, [], None, sweep_params=json.dumps({"model.conv1_out": "4,8,16", "seed": "0,1,2"}))
    scores = {  # (val/acc, test/acc) per seed
        4: [(0.600, 0.58), (0.620, 0.59), (0.610, 0.57)],
        8: [(0.615, 0.60), (0.625, 0.61), (0.620, 0.60)],
        16: [(0.500, 0.70), (0.510, 0.71), (0.505, 0.69)],
    }
    children = []
    for width, per_seed in scores.items():
        for seed, (val, test) in enumerate(per_seed):
            run = fake_run(len(children) + 1, [*SMALL, f"model.conv1_out={width}", f"seed={seed}"], test)
            run.data.params["seed"] = str(seed)
            run.data.metrics.update({"val/acc": val, "val/loss": 2 - val})
            children.append(run)
    return parent, children


def test_seeds_are_replicates_grouped_with_mean_ci_and_welchs_test(seeded: tuple[Any, list[Any]]) -> None:
    from scipy import stats

    parent, children = seeded
    keys = sweep_summary.varying_keys(parent, children)
    metric, maximize = sweep_summary.objective(parent, children)
    assert keys == ["model.conv1_out", "seed"] and metric == "val/acc"
    rows = sweep_summary.summary_rows(children, keys, {c.info.run_id: [1.0, 2.0] for c in children}, metric)
    summary = sweep_summary.Summary(parent, rows, keys, metric, maximize)
    groups = summary.csv_rows()
    assert [g["model.conv1_out"] for g in groups] == ["8", "4", "16"]  # by mean val/acc, not test/acc
    best, runner_up, last = groups
    assert best["best"] and best["n"] == 3 and best["seeds"] == "0 1 2"
    vals = [0.615, 0.625, 0.620]
    assert best["val/acc_mean"] == pytest.approx(sum(vals) / 3)
    assert best["val/acc_sd"] == pytest.approx(statistics.stdev(vals))
    half = stats.t.ppf(0.975, 2) * statistics.stdev(vals) / 3**0.5
    assert (best["val/acc_ci_low"], best["val/acc_ci_high"]) == pytest.approx((0.62 - half, 0.62 + half))
    assert best["test/acc_mean"] == pytest.approx(0.6033333)  # reported beside it
    welch = stats.ttest_ind(vals, [0.600, 0.620, 0.610], equal_var=False).pvalue
    assert runner_up["p_vs_best"] == pytest.approx(welch) and runner_up["distinguishable"] is False
    assert last["p_vs_best"] < 0.05 and last["distinguishable"] is True
    # the chosen run is the best group's run with the best val/acc; the parent records the group's means
    chosen = summary.best()
    assert chosen["run_id"] == children[4].info.run_id  # conv1_out=8, seed=1
    assert chosen["metrics"] == pytest.approx({"val/acc": 0.62, "test/acc": 0.6033333, "n": 3})
    text = summary.text()
    lines = text.splitlines()
    assert lines[1].split() == [
        *("best", "conv1_out", "n", "val/acc", "sd", "val", "95%", "CI"),
        *("test/acc", "test", "95%", "CI", "p", "vs", "best"),
    ]
    assert lines[2].split()[:4] == ["*", "8", "3", "0.6200"]
    assert f"{welch:.3g}" in lines[3]
    assert lines[-1] == (
        "best by mean val/acc over seeds: conv1_out=8 (n=3); runner-up conv1_out=4: Welch's t-test "
        f"p={welch:.3g}, not distinguishable (p >= 0.05: it may be seed noise)"
    )
    header = tables.csv_table(groups).splitlines()[0].split(",")
    assert {"n", "val/acc_mean", "val/acc_sd", "val/acc_ci_low", "test/acc_ci_high", "p_vs_best"} <= set(
        header
    )
    figure = summary.figure()  # means with their confidence intervals as error bars
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["4", "8", "16"]
    assert len(figure.axes[0].containers) == 2  # val/acc and test/acc, each with error bars
    sweep_plots.close(figure)


def test_one_seed_per_group_has_no_error_bars_and_no_test(seeded: tuple[Any, list[Any]]) -> None:
    parent, children = seeded
    one_seed = [c for c in children if c.data.params["seed"] == "0"]
    keys = ["model.conv1_out", "seed"]
    rows = sweep_summary.summary_rows(one_seed, keys, {}, "val/acc")
    summary = sweep_summary.Summary(parent, rows, keys, "val/acc", True)
    best, runner_up, _ = summary.csv_rows()
    assert best["n"] == 1 and best["val/acc_sd"] == "" and best["val/acc_ci_low"] == ""
    assert runner_up["p_vs_best"] == ""
    assert summary.footer()[-1].endswith(
        "runner-up conv1_out=4: not testable (needs 2+ finished seeds in each)"
    )


def test_a_failed_seed_is_left_out_of_its_groups_spread(seeded: tuple[Any, list[Any]]) -> None:
    parent, children = seeded
    children[3].info.status = "FAILED"  # conv1_out=8, seed=0
    keys = ["model.conv1_out", "seed"]
    rows = sweep_summary.summary_rows(children, keys, {}, "val/acc")
    groups = sweep_summary.Summary(parent, rows, keys, "val/acc", True).csv_rows()
    eight = next(g for g in groups if g["model.conv1_out"] == "8")
    assert eight["n"] == 2 and eight["val/acc_mean"] == pytest.approx(0.6225)
    assert len(eight["run_ids"].split()) == 3


def png_size(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_sweep_plot_one_panel_per_varying_key_or_a_heatmap(grid: tuple[Any, list[Any]]) -> None:
    parent, children = grid
    two = sweep_summary.varying_keys(parent, children)
    rows = sweep_summary.summary_rows(children, [*two, "seed"], {}, "test/acc")
    heatmap = sweep_plots.sweep_figure(rows, two, run_names.short_keys(two))
    assert len(heatmap.axes) == 2 and heatmap.axes[0].images  # the grid and its colour bar
    assert [t.get_text() for t in heatmap.axes[0].get_xticklabels()] == ["4", "8", "16"]
    assert png_size(sweep_plots.figure_png(heatmap))[0] <= 1000
    one = sweep_plots.sweep_figure(rows, ["model.conv1_out"], {"model.conv1_out": "conv1_out"})
    assert [ax.get_xlabel() for ax in one.axes] == ["conv1_out"]
    width, height = png_size(sweep_plots.figure_png(one))
    assert 400 <= width <= 1000 and 300 <= height <= 800  # legible in MLflow's artifact preview
    three = sweep_plots.sweep_figure(rows, [*two, "seed"])
    visible = [ax for ax in three.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in visible] == [*two, "seed"]
    assert png_size(sweep_plots.figure_png(three))[0] <= 1000  # two panels a row, not one long strip


# ---------------------------------------------------------------- a tidy store
def test_a_new_store_holds_only_the_projects_experiment_with_artifacts_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from cifar_exp.config import TrackingConfig
    from cifar_exp.tracking import store

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    store.ensure_experiment(TrackingConfig(tracking_uri=uri))
    [experiment] = MlflowClient(uri).search_experiments()  # no "Default" beside it
    assert experiment.name == "cifar_exp"
    assert experiment.artifact_location == (tmp_path / "store" / "artifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not (tmp_path / "mlruns").exists()


# ---------------------------------------------------------------- end to end
def start(args: list[str], cwd: Path, uri: str, pythonpath: Path = REPO) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIFAR_EXP_", "MLFLOW_", "HYDRA_"))}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", PYTHONPATH=str(pythonpath))
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_exp", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, f"exit {result.returncode}\n{stdout}\n{stderr}"
    return result


def git(*args: str, cwd: Path) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Recorded:
    uri: str
    sweep: Ended
    copy: Path  # a git copy of the project with an uncommitted change that alters training
    commit: str
    diff: str
    dirty_run: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """A two-job sweep of this project (in this process: conftest's run_in_process), and a run
    from a copy of the project whose run.py seeds differently (uncommitted, a subprocess), both
    into one store, at once."""
    root = tmp_path_factory.mktemp("recorded")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    copy = root / "project"
    for name in git("ls-files", "-z", cwd=REPO).split("\0"):
        if name and (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    git("init", "-q", cwd=copy)
    git("add", "-A", cwd=copy)
    git("commit", "-q", "-m", "the recorded commit", cwd=copy)
    run_py = copy / "cifar_exp" / "run.py"
    source = run_py.read_text()
    assert "torch.manual_seed(seed)" in source
    run_py.write_text(source.replace("torch.manual_seed(seed)", "torch.manual_seed(seed + 1)"))
    dirty = start([*SMALL, "model.conv1_out=6"], root / "dirty_cwd", uri, pythonpath=copy)
    (root / "sweep_cwd").mkdir()  # the sweep runs this checkout's code: in this process, meanwhile
    sweep = run_in_process(
        *SMALL, "model.conv1_out=4,8", "-m", cwd=root / "sweep_cwd", env={"MLFLOW_TRACKING_URI": uri}
    )
    assert sweep.returncode == 0, sweep.stderr
    return Recorded(
        uri,
        sweep,
        copy,
        git("rev-parse", "HEAD", cwd=copy),
        git("diff", "HEAD", cwd=copy),
        finish(dirty),
    )


def store_runs(uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, order_by=["attributes.start_time ASC"], max_results=100)


def dirty_run(recorded: Recorded) -> Any:
    """The run from the dirty copy (not a rerun)."""
    [run] = [
        r
        for r in store_runs(recorded.uri)
        if r.data.params.get("model.conv1_out") == "6" and "rerun_of" not in r.data.tags
    ]
    return run


def sweep_runs(uri: str) -> tuple[Any, list[Any]]:
    runs = store_runs(uri)
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "true"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_sweep_names_parent_and_children_by_what_varies(recorded: Recorded) -> None:
    parent, children = sweep_runs(recorded.uri)
    assert sorted(c.info.run_name for c in children) == ["conv1_out=4", "conv1_out=8"]
    assert parent.info.run_name.startswith("sweep conv1_out=4,8 @ ")
    assert json.loads(parent.data.tags["sweep_params"]) == {"model.conv1_out": "4,8"}
    fixed = dict(run_names.split_override(o) for o in SMALL)
    assert parent.data.params == {**fixed, "model.conv1_out": "4,8"}
    best = max(children, key=lambda c: (c.data.metrics["val/acc"], -c.data.metrics["val/loss"]))
    assert parent.data.tags["best_run_id"] == best.info.run_id  # chosen on the validation split
    assert parent.data.tags["best/chosen_on"] == "val/acc"
    assert parent.data.metrics["best/test/acc"] == best.data.metrics["test/acc"]  # reported beside it
    note = parent.data.tags["mlflow.note.content"]
    assert f"({'#'}/experiments/{parent.info.experiment_id}/runs/{best.info.run_id}?" in note


def test_sweep_summary_has_a_column_only_for_the_swept_key(recorded: Recorded, tmp_path: Path) -> None:
    import mlflow

    parent, _ = sweep_runs(recorded.uri)
    path = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id,
        artifact_path="sweep/summary.md",
        dst_path=str(tmp_path),
        tracking_uri=recorded.uri,
    )
    header = Path(path).read_text().splitlines()[0]
    assert " ".join(header.split()) == "| best | conv1_out | val/acc | test/acc | train s | run |"


def test_compare_prints_the_latest_sweep_best_first(
    recorded: Recorded, capsys: pytest.CaptureFixture
) -> None:
    parent, children = sweep_runs(recorded.uri)
    assert commands.compare(recorded.uri, "latest", as_csv=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{parent.info.run_name}  ({parent.info.run_id}, finished, 2 runs)")
    assert lines[1].split() == ["best", "conv1_out", "val/acc", "test/acc", "train", "s", "run"]
    best = next(c for c in children if c.info.run_id == parent.data.tags["best_run_id"])
    assert lines[2].split()[:4] == [
        "*",
        best.data.params["model.conv1_out"],
        f"{best.data.metrics['val/acc']:.4f}",
        f"{best.data.metrics['test/acc']:.4f}",
    ]
    assert float(lines[2].split()[4]) >= 0  # training seconds
    assert lines[4:] == [
        "chosen on val/acc (the validation split); test/acc shown, never used to choose",
        "one seed per config: these differences carry no error bars; to tell configs apart, run each "
        "with several seeds (add seed=0,1,2 to the sweep)",
    ]

    assert commands.compare(recorded.uri, parent.info.run_id[:6], as_csv=True) == 0
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run_id"] for r in rows][0] == best.info.run_id and rows[0]["best"] == "True"
    assert float(rows[0]["test/acc"]) == best.data.metrics["test/acc"]  # full precision for scripts
    assert float(rows[0]["train_s"]) > 0  # the sum of its time/epoch_s


def test_runs_lists_the_newest_runs(recorded: Recorded, capsys: pytest.CaptureFixture) -> None:
    assert commands.list_runs(recorded.uri, limit=10) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "id", "name", "status", "val/acc", "test/acc", "duration"]
    assert len(lines) == 1 + 4  # the sweep's parent and two children, the run from the copy
    names = [line.split()[1] for line in lines[1:]]
    assert {"conv1_out=4", "conv1_out=8", "sweep"} <= set(names)
    # a long single-run name keeps the overrides typed last, then its own token
    assert any(re.search(r",conv1_out=6 #[a-z0-9]{6} ", line) for line in lines[1:])


def test_ui_links_open_the_runs_and_the_latest_sweeps_comparison(recorded: Recorded) -> None:
    parent, children = sweep_runs(recorded.uri)
    links = ui_server.ui_links(commands.open_store(recorded.uri), "http://127.0.0.1:5000")
    eid = parent.info.experiment_id
    assert (
        links["runs:"]
        == f"http://127.0.0.1:5000/#/experiments/{eid}/runs?workflowType=machine_learning&searchFilter="
    )
    compare = links["its runs compared:"]
    ids = ",".join(f"%22{c.info.run_id}%22" for c in sorted(children, key=lambda c: c.info.start_time))
    assert (
        compare
        == f"http://127.0.0.1:5000/#/compare-runs?runs=[{ids}]&experiments=[%22{eid}%22]&workflowType=machine_learning"
    )
    assert (
        parent.info.run_id in links["latest sweep:"] and parent.info.run_id in links["its runs, best first:"]
    )


@pytest.mark.parametrize(
    ("ref", "said"),
    [("nosuch", "no sweep with a run id starting nosuch"), ("0" * 32, f"no run {'0' * 32}")],
)
def test_compare_an_unknown_sweep_says_so_in_one_line(recorded: Recorded, ref: str, said: str) -> None:
    with pytest.raises(UserError, match=said):
        commands.compare(recorded.uri, ref, as_csv=False)


def test_reading_commands_on_no_store_or_a_silent_server_say_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    for command in ("compare", "runs"):
        assert commands.dispatch(command, ["--tracking-uri", missing], lambda *a: None) == 2
        assert (
            capsys.readouterr().err
            == f"error: nothing recorded yet: no MLflow store at {tmp_path}/none/mlflow.db\n"
        )
    assert not (tmp_path / "none").exists()  # reading does not create a store
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket_nobody_listens() as url:
        assert commands.dispatch("runs", ["--tracking-uri", url], lambda *a: None) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the MLflow store {url} does not answer") and err.count("\n") == 1


class socket_nobody_listens:
    """An http:// URL on 127.0.0.1 where nothing listens (a port bound, never listened on)."""

    def __enter__(self) -> str:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_compare_on_a_store_without_sweeps_says_so(recorded: Recorded, tmp_path: Path) -> None:
    from cifar_exp.config import TrackingConfig
    from cifar_exp.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.ensure_experiment(TrackingConfig(tracking_uri=uri))
    with pytest.raises(UserError, match="no sweeps in .* yet"):
        commands.compare(uri, "latest", as_csv=False)


# ---------------------------------------------------------------- code snapshots and rerun
def test_a_dirty_checkout_records_its_uncommitted_diff(recorded: Recorded, tmp_path: Path) -> None:
    import mlflow

    run = dirty_run(recorded)
    assert run.data.tags["git_commit"] == recorded.commit and run.data.tags["git_dirty"] == "True"
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path=identity.DIFF_ARTIFACT,
        dst_path=str(tmp_path),
        tracking_uri=recorded.uri,
    )
    assert Path(path).read_text().strip() == recorded.diff
    assert "torch.manual_seed(seed + 1)" in recorded.diff
    from mlflow.tracking import MlflowClient

    _, children = sweep_runs(recorded.uri)  # this checkout's runs: a diff exactly when it is dirty
    for child in children:
        kept = bool(MlflowClient(recorded.uri).list_artifacts(child.info.run_id, "code"))
        assert kept == (child.data.tags["git_dirty"] == "True")


def test_rerun_warns_about_changed_code_and_reproduces_once_it_is_restored(
    recorded: Recorded, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    original = dirty_run(recorded)
    run_id = original.info.run_id
    clean, restored = tmp_path / "clean", tmp_path / "restored"
    for clone in (clean, restored):  # clean checkouts of the recorded commit
        git("clone", "-q", str(recorded.copy), str(clone), cwd=tmp_path)
    diff = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=identity.DIFF_ARTIFACT,
            dst_path=str(tmp_path),
            tracking_uri=recorded.uri,
        )
    )
    git("checkout", "-q", recorded.commit, cwd=restored)
    git("apply", str(diff), cwd=restored)  # what the warning says to do
    warned = start(["rerun", run_id], tmp_path / "cwd_clean", recorded.uri, pythonpath=clean)
    same = start(["rerun", run_id], tmp_path / "cwd_restored", recorded.uri, pythonpath=restored)
    warned, same = finish(warned), finish(same)
    line = next(line for line in warned.stderr.splitlines() if line.startswith("warning:"))
    assert f"run {run_id}" in line and "uncommitted diff" in line
    restore = line.split("from a clean checkout: ")[1]
    assert restore.startswith(f"git checkout {recorded.commit[:12]} && git apply ")
    assert Path(restore.split("git apply ")[1]).read_text() == diff.read_text()
    assert "warning:" not in same.stderr

    client = MlflowClient(recorded.uri)
    reruns = {
        r.data.tags["git_dirty"]: r for r in store_runs(recorded.uri) if r.data.tags.get("rerun_of") == run_id
    }
    assert set(reruns) == {"False", "True"}  # the clean clone's, the restored one's

    def history(run: Any) -> list[tuple[int, float]]:
        return sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss_epoch")
        )

    assert history(original)
    assert history(reruns["True"]) == history(original)  # commit + diff: the same numbers
    assert history(reruns["False"]) != history(original)  # without the diff, other numbers
