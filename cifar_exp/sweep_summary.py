"""A sweep's summary, read back from its children in MLflow: the table (what varies against each
child's final metrics and training time), the plot, the best child, the parent's description, and
for a search the trials finished and pruned and the epochs pruning saved. Written onto the parent
when the sweep ends (sweeps.SweepCallback); `cifar-exp compare` prints the same table."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from cifar_exp import reports
from cifar_exp.tracking import identity, runs, store

METRICS = ("test/acc", "test/loss")  # the summary's columns, besides the swept values and time
PRUNED = "PRUNED"  # the summary's status of a run a search's pruner stopped (MLflow: KILLED)
TRAIN_TIME = "time/epoch_s"  # a child's training time is the sum of this metric's history, s
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI, markdown
ACC_FORMAT, LOSS_FORMAT = "{:.4f}", "{:.4f}"  # how tables show test/acc (a fraction) and test/loss


def summarise(client: Any, parent_id: str, search: bool = False) -> str:
    """Records on the parent run the sweep table (the values that vary against each child's final
    test/acc, test/loss and training time; CSV for scripts, markdown for people), a plot of
    test/acc against each varying key, best/test/acc, best_run_id, and a description that links
    the best child; for a search also the best child's value of every searched key (`best/<key>`
    tags), the trials finished, pruned and failed, the epochs trained against the epochs the same
    trials would have trained unpruned (`search/*` metrics), and search/history.png. Returns the
    parent's status, which follows the children's."""
    from mlflow.entities import Metric, RunTag

    parent = client.get_run(parent_id)
    children = sweep_children(client, parent)
    keys = varying_keys(parent, children)
    metric, maximize = objective(parent)
    epochs = epoch_seconds(client, children)
    rows = summary_rows(children, keys, {k: sum(v) for k, v in epochs.items()}, metric, maximize)
    files: dict[str, str | bytes] = {
        "sweep/summary.csv": reports.csv_table(rows),
        "sweep/summary.md": reports.markdown_table(display_rows(rows, keys)),
    }
    if any(r["test/acc"] != "" for r in rows) and keys:
        names = identity.short_keys(keys)
        files["sweep/test_acc.png"] = reports.figure_png(reports.sweep_figure(rows, keys, names))
    now = int(time.time() * 1000)
    tags, metrics = [], []
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        metrics.append(Metric(f"best/{metric}", best[metric], now, 0))
        tags.append(RunTag("best_run_id", best["run_id"]))
    story = search_story(children, rows, epochs) if search else {}
    metrics += [Metric(f"search/{key}", value, now, 0) for key, value in story.items()]
    tags.append(RunTag(NOTE_TAG, sweep_note(parent, rows, keys, search, story)))
    if search:
        order = sorted(rows, key=lambda r: r["started"])
        values = [
            r[metric] if r["status"] in ("FINISHED", PRUNED) and r[metric] != "" else None for r in order
        ]
        pruned = [r["status"] == PRUNED for r in order]
        figure = reports.search_history_figure(values, metric, pruned, maximize)
        files["search/history.png"] = reports.figure_png(figure)
        if best is not None:
            chosen = next(c for c in children if c.info.run_id == best["run_id"])
            tags += [RunTag(f"best/{k}", v) for k, v in searched_values(parent, chosen).items()]
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        runs.write_files(files, Path(tmp))
        client.log_artifacts(parent_id, tmp)
    return parent_status([r["status"] for r in rows], search)


def parent_status(statuses: list[str], search: bool) -> str:
    """FINISHED when every child finished (or, in a search, was pruned or diverged: outcomes of a
    search); FAILED when one failed (in a search: when none finished); else KILLED (stopped)."""
    if not statuses:
        return "FAILED"
    if search:
        if "FINISHED" not in statuses:
            return "FAILED"
        return "FINISHED" if set(statuses) <= {"FINISHED", PRUNED, "FAILED"} else "KILLED"
    if "FAILED" in statuses:
        return "FAILED"
    return "FINISHED" if set(statuses) == {"FINISHED"} else "KILLED"


def objective(parent: Any) -> tuple[str, bool]:
    """(metric, maximize): what a search optimised (its parent's tags); test/acc, higher is better,
    for a sweep."""
    tags = parent.data.tags
    return tags.get("search/metric", "test/acc"), tags.get("search/direction", "maximize") == "maximize"


def search_story(
    children: list[Any], rows: list[dict[str, Any]], epochs: dict[str, list[float]]
) -> dict[str, float]:
    """Trials finished, pruned and failed; epochs trained, and what the same trials would have
    trained without pruning (each child's trainer.epochs, rounded up as the loop counts them)."""
    statuses = [r["status"] for r in rows]
    planned = sum(math.ceil(float(c.data.params.get("trainer.epochs", 0) or 0)) for c in children)
    return {
        "trials_finished": statuses.count("FINISHED"),
        "trials_pruned": statuses.count(PRUNED),
        "trials_failed": statuses.count("FAILED"),
        "epochs_trained": sum(len(v) for v in epochs.values()),
        "epochs_unpruned": planned,
    }


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


def epoch_seconds(client: Any, children: list[Any]) -> dict[str, list[float]]:
    """Each child's training time per epoch (time/epoch_s; evaluation excluded): its sum is the
    child's training time, its length the epochs it trained."""
    return {
        c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, TRAIN_TIME)]
        for c in children
    }


def summary_rows(
    children: list[Any],
    keys: list[str],
    seconds: dict[str, float],
    metric: str = "test/acc",
    maximize: bool = True,
) -> list[dict[str, Any]]:
    """One row per child, best first (by `metric`, then the lowest test/loss; children without
    it last, in start order): `keys`' values, test/acc, test/loss (and `metric`), train_s,
    status (PRUNED for a trial a search's pruner stopped), best (the best finished child), run_id,
    the run's name and when it started."""
    rows = []
    for child in children:
        values = child_values(child)
        row: dict[str, Any] = {key: values.get(key, "") for key in keys}
        for name in dict.fromkeys([*METRICS, metric]):
            row[name] = child.data.metrics.get(name, "")
        seconds_ = seconds.get(child.info.run_id)
        row["train_s"] = round(seconds_, 3) if seconds_ else ""
        status = PRUNED if identity.PRUNED_TAG in child.data.tags else child.info.status
        row.update(status=status, best=False, run_id=child.info.run_id, run=child.info.run_name)
        row["started"] = child.info.start_time
        rows.append(row)
    sign = -1 if maximize else 1

    def rank(row: dict[str, Any]) -> tuple[float, float]:
        value, loss = row[metric], row["test/loss"]
        return (sign * value if value != "" else float("inf"), loss if loss != "" else float("inf"))

    rows.sort(key=rank)
    finished = [r for r in rows if r["status"] == "FINISHED" and r[metric] != ""]
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


def sweep_note(
    parent: Any,
    rows: list[dict[str, Any]],
    keys: list[str],
    search: bool,
    story: dict[str, float] | None = None,
) -> str:
    """The parent's description (markdown, shown on its run page): what it varied, the best child
    as a link, for a search the trials and epochs pruning saved, and the table (as `cifar-exp
    compare` prints it)."""
    link = f"#/experiments/{parent.info.experiment_id}/runs/{{}}?{store.MODEL_TRAINING_VIEW}"
    metric, _ = objective(parent)
    short = identity.short_keys(keys)
    statuses = [r["status"] for r in rows]
    done = "all finished" if set(statuses) == {"FINISHED"} else f"{statuses.count('FINISHED')} finished"
    if statuses.count(PRUNED):
        done += f", {statuses.count(PRUNED)} pruned"
    what = ", ".join(short.values()) or "nothing"
    lines = [f"**{'Search' if search else 'Sweep'} over {what}**: {len(rows)} runs, {done}."]
    best = next((r for r in rows if r["best"]), None)
    if best is not None:
        values = ",".join(f"{short[k]}={identity.short_value(str(best[k]))}" for k in keys)
        lines.append(
            f"Best: [{values or best['run']}]({link.format(best['run_id'])}), {metric} "
            f"{ACC_FORMAT.format(best[metric])}. The table is `sweep/summary.md`, the plot "
            "`sweep/test_acc.png` (Artifacts)."
        )
    if story and story["epochs_unpruned"]:
        trained, unpruned = int(story["epochs_trained"]), int(story["epochs_unpruned"])
        lines.append(
            f"Epochs trained: {trained} of the {unpruned} these trials would have trained unpruned "
            f"({100 * trained / unpruned:.0f}%). History: `search/history.png`."
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
