"""The Hydra callback that owns a sweep's parent MLflow run, and the sweep's summary."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cifar_exp import reports
from cifar_exp.errors import UserError
from cifar_exp.tracking import identity, runs, store

log = logging.getLogger(__name__)

METRICS = ("test/acc", "test/loss")  # the summary's columns, besides the swept values and time
TRAIN_TIME = "time/epoch_s"  # a child's training time is the sum of this metric's history, s
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI, markdown
PARAM_KEY = re.compile(r"^[\w\-. /:]+$")  # the characters MLflow accepts in a param's name
PARAM_CHARS = 6000  # MLflow's longest param value
ACC_FORMAT, LOSS_FORMAT = "{:.4f}", "{:.4f}"  # how tables show test/acc (a fraction) and test/loss


class SweepCallback(Callback):
    """Creates the parent run before any job starts (so parallel jobs find the store and the
    experiment ready) and closes it with a summary when the sweep ends, also when a job failed:
    Hydra skips on_multirun_end then, so an atexit hook closes it."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.uri = ""
        self.search = False  # the sweeper picks trials from earlier results (Optuna), not a grid
        self.swept: list[str] = []  # the keys the sweep varies; its jobs are named by them
        self.pid = 0  # the process that owns the parent run

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.mlflow.enabled:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:
            experiment_id = store.ensure_experiment(config.mlflow)
        except UserError as e:  # a bad store stops the sweep before any job (Hydra would only warn)
            print(e, file=sys.stderr)
            sys.exit(1)
        self.uri = store.tracking_uri(config.mlflow)
        self.search = not str(config.hydra.sweeper._target_).endswith(".BasicSweeper")
        swept, fixed = sweep_overrides(config)
        self.swept = list(swept)
        commit, dirty = identity.git_state()
        client = MlflowClient(self.uri)
        run = client.create_run(
            experiment_id,
            run_name=sweep_name(swept, self.search, time.time()),
            tags={
                "sweep": "true",
                "overrides": json.dumps(list(config.hydra.overrides.task)),
                "sweep_params": json.dumps(swept),
                "git_commit": commit,
                "git_dirty": str(dirty),
                "hydra_sweep_dir": str(config.hydra.sweep.dir),
            },
        )
        self.parent_id = run.info.run_id
        # What the sweep holds fixed, and what it varies (as typed: "8,16,32"), as the parent's params.
        params = [
            Param(key, str(value)[:PARAM_CHARS])
            for key, value in {**fixed, **swept}.items()
            if PARAM_KEY.match(key)
        ]
        client.log_batch(self.parent_id, params=params)
        self.pid = os.getpid()
        identity.join_sweep(self.parent_id, self.swept)
        atexit.register(self.close)
        log.info(f"MLflow parent run {self.parent_id} for this sweep ({run.info.run_name})")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In a job that runs in another process (submitit, joblib), this callback is the sweep's,
        unpickled: its parent id and store go to the job whatever environment the job inherited
        (a cluster may start jobs with a clean one, as sbatch --export=NONE does)."""
        if self.parent_id and os.getpid() != self.pid:
            identity.join_sweep(self.parent_id, self.swept)
            os.environ["MLFLOW_TRACKING_URI"] = self.uri  # unless mlflow.tracking_uri names it
        # Parallel jobs (hydra/launcher=joblib) on several GPUs: one GPU per worker, so keep
        # hydra.launcher.n_jobs at most the GPU count. Does nothing on CPU or with one GPU.
        if "joblib" in str(config.hydra.launcher.get("_target_")) and config.device.name != "cpu":
            from cifar_exp.devices import claim_gpu

            claim_gpu(config.hydra.job.num, Path(config.hydra.sweep.dir) / ".gpu_locks")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Writes the summary and sets the parent's status from its children (once)."""
        if self.parent_id is None:
            return
        parent_id, self.parent_id = self.parent_id, None
        identity.join_sweep(None)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        status = "FAILED"
        try:
            status = summarise(client, parent_id, self.search)
        finally:
            client.set_terminated(parent_id, status)


# ---------------------------------------------------------------- what a sweep varies
def sweep_overrides(config: DictConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(swept, fixed): the keys the sweep varies with their values as written ({'model.conv1_out':
    '8,16,32'}, an Optuna search's 'tag(log, interval(0.001, 0.3))'), and the overrides it holds
    fixed ({'dataset': 'synthetic'}), from hydra.sweeper.params and the command line, in that
    order: a later override of a key wins, as in Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    items = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    swept: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for item, override in zip(items, OverridesParser.create().parse_overrides(items), strict=True):
        key, value = override.key_or_group, item.partition("=")[2]
        swept.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            swept[key] = value
        else:
            fixed[key] = value if not override.is_delete() else "(deleted)"
    return swept, fixed


def sweep_name(swept: dict[str, str], search: bool, started: float) -> str:
    """'sweep conv1_out=8,16,32 lr=0.01,0.1 @ 06-12 15:30:12': what it varies (short keys; only the
    keys when the values are long, or for a search, whose values are distributions) and when it
    started, which tells two sweeps of the same keys apart."""
    short = identity.short_keys(list(swept))
    what = " ".join(f"{short[key]}={values}" for key, values in swept.items())
    if search or len(what) > 48:
        what = ",".join(short.values())
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(started))
    return f"{'search' if search else 'sweep'} {what or 'default'} @ {stamp}"


# ---------------------------------------------------------------- the summary
def summarise(client: Any, parent_id: str, search: bool = False) -> str:
    """Records on the parent run the sweep table (the values that vary against each child's final
    test/acc, test/loss and training time; CSV for scripts, markdown for people), a plot of
    test/acc against each varying key, best/test/acc, best_run_id, and a description that links
    the best child; for a search also the best child's value of every searched key (`best/<key>`
    tags) and search/history.png. Returns the parent's status, which follows the children's."""
    from mlflow.entities import Metric, RunTag

    parent = client.get_run(parent_id)
    children = sweep_children(client, parent)
    keys = varying_keys(parent, children)
    rows = summary_rows(children, keys, training_seconds(client, children))
    files: dict[str, str | bytes] = {
        "sweep/summary.csv": reports.csv_table(rows),
        "sweep/summary.md": reports.markdown_table(display_rows(rows, keys)),
    }
    if any(r["test/acc"] != "" for r in rows) and keys:
        names = identity.short_keys(keys)
        files["sweep/test_acc.png"] = reports.figure_png(reports.sweep_figure(rows, keys, names))
    tags, metrics = [], []
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        metrics.append(Metric("best/test/acc", best["test/acc"], int(time.time() * 1000), 0))
        tags.append(RunTag("best_run_id", best["run_id"]))
    tags.append(RunTag(NOTE_TAG, sweep_note(parent, rows, keys, search)))
    if search:
        values = [c.data.metrics.get("test/acc") if c.info.status == "FINISHED" else None for c in children]
        files["search/history.png"] = reports.figure_png(reports.search_history_figure(values))
        if best is not None:
            chosen = next(c for c in children if c.info.run_id == best["run_id"])
            tags += [RunTag(f"best/{k}", v) for k, v in searched_values(parent, chosen).items()]
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        runs.write_files(files, Path(tmp))
        client.log_artifacts(parent_id, tmp)
    statuses = {r["status"] for r in rows}
    if not rows or "FAILED" in statuses:
        return "FAILED"
    return "FINISHED" if statuses == {"FINISHED"} else "KILLED"


def sweep_children(client: Any, parent: Any) -> list[Any]:
    """The parent's children and the runs it linked (finished in an earlier sweep), in the order
    they started."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=10000,
    )
    linked = [client.get_run(k.removeprefix("linked/")) for k in parent.data.tags if k.startswith("linked/")]
    return sorted([*linked, *children], key=lambda run: run.info.start_time)


def child_values(run: Any) -> dict[str, str]:
    """A child's values of every key: its params, overridden by its command-line overrides (which
    also name config groups, e.g. model=airbench94)."""
    values = dict(run.data.params)
    for item in json.loads(run.data.tags.get("overrides", "[]")):
        key, value = identity.split_override(item)
        values[key] = value
    return values


def varying_keys(parent: Any, children: list[Any]) -> list[str]:
    """The swept keys (the parent's sweep_params) whose values differ between the children; all
    the swept keys when none differ (a one-job sweep). A parent recorded before sweep_params held
    the command line's sweeps: the overrides that differ between the children."""
    swept = list(json.loads(parent.data.tags.get("sweep_params", "{}")))
    values = [child_values(child) for child in children]
    if not swept:
        overrides = [json.loads(c.data.tags.get("overrides", "[]")) for c in children]
        keys = [identity.split_override(item)[0] for items in overrides for item in items]
        swept = [k for k in dict.fromkeys(keys) if not k.startswith(("mlflow.", "hydra."))]
    varying = [key for key in swept if len({v.get(key, "") for v in values}) > 1]
    return varying or swept


def training_seconds(client: Any, children: list[Any]) -> dict[str, float]:
    """Each child's training time: the sum of its per-epoch time/epoch_s (evaluation excluded)."""
    return {
        c.info.run_id: sum(m.value for m in client.get_metric_history(c.info.run_id, TRAIN_TIME))
        for c in children
    }


def summary_rows(children: list[Any], keys: list[str], seconds: dict[str, float]) -> list[dict[str, Any]]:
    """One row per child, best test/acc first (children without one last, in start order):
    `keys`' values, test/acc, test/loss, train_s, status, best (the highest test/acc of a finished
    child), run_id and the run's name."""
    rows = []
    for child in children:
        values = child_values(child)
        row: dict[str, Any] = {key: values.get(key, "") for key in keys}
        for metric in METRICS:
            row[metric] = child.data.metrics.get(metric, "")
        seconds_ = seconds.get(child.info.run_id)
        row["train_s"] = round(seconds_, 3) if seconds_ else ""
        row.update(status=child.info.status, best=False, run_id=child.info.run_id, run=child.info.run_name)
        rows.append(row)

    def rank(row: dict[str, Any]) -> tuple[float, float]:  # best test/acc first, then lowest test/loss
        acc, loss = row["test/acc"], row["test/loss"]
        return (-acc if acc != "" else float("inf"), loss if loss != "" else float("inf"))

    rows.sort(key=rank)
    finished = [r for r in rows if r["status"] == "FINISHED" and r["test/acc"] != ""]
    if finished:
        finished[0]["best"] = True
    return rows


def display_rows(rows: list[dict[str, Any]], keys: list[str], mark: str = "★") -> list[dict[str, str]]:
    """The summary as a person reads it: `mark` on the best row, the varying values under short
    key names, test/acc and test/loss to 4 decimals, training seconds to 0.01, the status only when
    not all finished, and the run id's first 8 characters."""
    short = identity.short_keys(keys)
    all_finished = all(r["status"] == "FINISHED" for r in rows)
    out = []
    for r in rows:
        row = {"best": mark if r["best"] else ""}
        row.update({short[k]: identity.short_value(str(r[k])) for k in keys})
        row["test/acc"] = "" if r["test/acc"] == "" else ACC_FORMAT.format(r["test/acc"])
        row["test/loss"] = "" if r["test/loss"] == "" else LOSS_FORMAT.format(r["test/loss"])
        row["train s"] = "" if r["train_s"] == "" else f"{r['train_s']:.2f}"
        if not all_finished:
            row["status"] = r["status"]
        row["run"] = r["run_id"][:8]
        out.append(row)
    return out


def sweep_note(parent: Any, rows: list[dict[str, Any]], keys: list[str], search: bool) -> str:
    """The parent's description (markdown, shown on its run page): what it varied, the best child
    as a link, and the table (as `cifar-exp compare` prints it)."""
    link = f"#/experiments/{parent.info.experiment_id}/runs/{{}}?{store.MODEL_TRAINING_VIEW}"
    short = identity.short_keys(keys)
    statuses = [r["status"] for r in rows]
    done = "all finished" if set(statuses) == {"FINISHED"} else f"{statuses.count('FINISHED')} finished"
    what = ", ".join(short.values()) or "nothing"
    lines = [f"**{'Search' if search else 'Sweep'} over {what}**: {len(rows)} runs, {done}."]
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        values = ",".join(f"{short[k]}={identity.short_value(str(best[k]))}" for k in keys)
        lines.append(
            f"Best: [{values or best['run']}]({link.format(best['run_id'])}), test/acc "
            f"{ACC_FORMAT.format(best['test/acc'])}. The table is `sweep/summary.md`, the plot "
            "`sweep/test_acc.png` (Artifacts)."
        )
    table = reports.text_table(display_rows(rows, keys, mark="*"))  # the UI squeezes markdown tables
    return "\n\n".join([*lines, f"```\n{table}```"])


def searched_values(parent: Any, best: Any) -> dict[str, str]:
    """The best child's value of every key the search chose: hydra.sweeper.params and the sweep
    overrides of the command line (both in sweep_params; older parents: also the overrides tag)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = json.loads(parent.data.tags.get("overrides", "[]"))
    searched = list(json.loads(parent.data.tags.get("sweep_params", "{}")))
    searched += [
        o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()
    ]
    chosen = child_values(best)
    return {key: chosen[key] for key in dict.fromkeys(searched) if key in chosen}
