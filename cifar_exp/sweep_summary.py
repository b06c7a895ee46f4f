"""A sweep's summary, read back from its children in MLflow: the table (what varies against each
child's final metrics and training time), the plot, the best child, the parent's description, and
for a search the trials finished and pruned and the epochs pruning saved. Written onto the parent
when the sweep ends (sweeps.SweepCallback), and again when a child changes after that
(sweep_refresh.py); `cifar-exp compare` prints the same table."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from cifar_exp import replicates, run_names, sweep_plots, tables
from cifar_exp.evaluation import chosen_metric
from cifar_exp.search.outcome import PRUNED, history, search_story, searched_values
from cifar_exp.search.study import stored_best
from cifar_exp.tracking import identity, records, store

METRICS = ("val/acc", "test/acc", "test/loss")  # the summary's columns, besides the swept values and time
PLOT_ARTIFACT = "sweep/accuracy.png"  # the accuracies against what the sweep varies
TRAIN_TIME = "time/epoch_s"  # a child's training time is the sum of this metric's history, s
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI, markdown
# a search parent's tags: its Optuna study (a re-run of the search reopens it) and where it is stored
STUDY, STORAGE = "search/study", "search/storage"
ACC_FORMAT = "{:.4f}"  # how tables show accuracies (fractions) and losses


def summarise(client: Any, parent_id: str, search: bool = False, completed: bool = False) -> tuple[str, str]:
    """Records on the parent run the sweep table (Summary; CSV for scripts, markdown for people),
    its plot, the best (chosen on val/acc or a search's metric, never on test/acc): best/<metric>,
    best/test/acc, best_run_id, and a description that links it (sweep_note); for a search also
    the best child's searched values (`best/<key>` tags), search_story's `search/*` metrics and
    search/history.png. Returns the parent's status, which follows the children's (a search that
    `completed`, every trial told to its study, is never KILLED: a child an earlier, killed
    controller left behind does not make it so), and the summary as `cifar-exp compare` prints it."""
    from mlflow.entities import Metric, RunTag

    parent = client.get_run(parent_id)
    table, children, epochs = read_summary(client, parent)
    rows, keys, metric, maximize = table.rows, table.keys, table.metric, table.maximize
    footer = "\n\n".join(table.footer())
    files: dict[str, str | bytes] = {"sweep/summary.csv": tables.csv_table(table.csv_rows())}
    files["sweep/summary.md"] = f"{tables.markdown_table(table.display())}\n{footer}\n"
    if table.groups is not None:
        files["sweep/runs.csv"] = tables.csv_table(rows)
    if any(r[metric] != "" for r in rows) and keys:
        files[PLOT_ARTIFACT] = sweep_plots.figure_png(table.figure())
    now = int(time.time() * 1000)
    tags, metrics = [], []
    best = table.best()
    if best is not None:
        metrics += [Metric(f"best/{name}", value, now, 0) for name, value in best["metrics"].items()]
        tags += [RunTag("best_run_id", best["run_id"]), RunTag("best/chosen_on", metric)]
        trial = next(r.get("trial", "") for r in rows if r["run_id"] == best["run_id"])
        tags += [RunTag("best_trial", trial)] if trial != "" else []
    story = search_story(children, rows, epochs) if search else {}
    metrics += [Metric(f"search/{key}", value, now, 0) for key, value in story.items()]
    tags.append(RunTag(NOTE_TAG, sweep_note(parent, table, search, story)))
    if search:
        values, pruned = history(rows, metric)
        figure = sweep_plots.search_history_figure(values, metric, pruned, maximize)
        files["search/history.png"] = sweep_plots.figure_png(figure)
        if best is not None:
            chosen = child_values(next(c for c in children if c.info.run_id == best["run_id"]))
            tags += [RunTag(f"best/{k}", v) for k, v in searched_values(parent, chosen).items()]
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        records.write_files(files, Path(tmp))
        client.log_artifacts(parent_id, tmp)
    status = parent_status([r["status"] for r in rows], search)
    status = "FINISHED" if search and completed and status == "KILLED" else status
    return status, table.text(status)


def parent_status(statuses: list[str], search: bool) -> str:
    """FINISHED when every child finished (or, in a search, was pruned or diverged: outcomes of a
    search); FAILED when one failed (in a search: when none finished); else KILLED (stopped)."""
    if not statuses or ("FINISHED" not in statuses if search else "FAILED" in statuses):
        return "FAILED"
    ended = {"FINISHED", PRUNED, "FAILED"} if search else {"FINISHED"}
    return "FINISHED" if set(statuses) <= ended else "KILLED"


def objective(parent: Any, children: list[Any]) -> tuple[str, bool]:
    """(metric, maximize): what chooses the best. A search's metric (its parent's tags); for a
    sweep val/acc, higher is better. Children without a validation split (dataset.val_size=0)
    choose on its test/ twin (evaluation.chosen_metric), and the summary says so."""
    tags = parent.data.tags
    metric = chosen_metric(tags.get("search/metric", "val/acc"), [c.data.metrics for c in children])
    return metric, tags.get("search/direction", "maximize") == "maximize"


def sweep_children(client: Any, parent: Any) -> list[Any]:
    """The parent's children and the runs it linked (finished in an earlier sweep), in the order
    they started."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=10000,
    )
    linked = [
        client.get_run(k.removeprefix(identity.LINK_PREFIX))
        for k in parent.data.tags
        if k.startswith(identity.LINK_PREFIX)
    ]
    return sorted([*linked, *children], key=lambda run: run.info.start_time)


def child_values(run: Any) -> dict[str, str]:
    """A child's values of every key: its params, overridden by its command-line overrides (which
    also name config groups, e.g. model=airbench94)."""
    values = dict(run.data.params)
    for item in json.loads(run.data.tags.get("overrides", "[]")):
        key, value = run_names.split_override(item)
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
        keys = [run_names.split_override(item)[0] for items in overrides for item in items]
        swept = [k for k in dict.fromkeys(keys) if not k.startswith(("mlflow.", "hydra."))]
    varying = [key for key in swept if len({v.get(key, "") for v in values}) > 1]
    return varying or swept


def summary_rows(
    children: list[Any],
    keys: list[str],
    epochs: dict[str, list[float]],
    metric: str = "val/acc",
    maximize: bool = True,
    best_trial: int | None = None,
) -> list[dict[str, Any]]:
    """One row per child, best first (by `metric`, then the lowest loss of its split; children
    without it last, in start order): `keys`' values, val/acc, test/acc, test/loss (and `metric`),
    train_s (the sum of `epochs`, the child's seconds per epoch), epochs (how many it trained),
    status (PRUNED for a trial a search's pruner stopped), best (the best finished child: in a
    search, the child of the study's `best_trial`), run_id, the run's name, when it started and
    its search trial's number (trial; '' outside a search)."""
    rows = []
    loss = metric.split("/")[0] + "/loss"
    for child in children:
        values = child_values(child)
        row: dict[str, Any] = {key: values.get(key, "") for key in keys}
        for name in dict.fromkeys([*METRICS, metric, loss]):
            row[name] = child.data.metrics.get(name, "")
        seconds = epochs.get(child.info.run_id, [])
        row["train_s"] = round(sum(seconds), 3) if seconds else ""
        row["epochs"] = len(seconds)
        status = PRUNED if identity.PRUNED_TAG in child.data.tags else child.info.status
        row.update(status=status, best=False, run_id=child.info.run_id, run=child.info.run_name)
        row["started"] = child.info.start_time
        row["trial"] = child.data.tags.get(identity.TRIAL_TAG, "")
        rows.append(row)
    sign = -1 if maximize else 1

    def rank(row: dict[str, Any]) -> tuple[float, float]:
        value, tie = row[metric], row[loss]
        return (sign * value if value != "" else float("inf"), tie if tie != "" else float("inf"))

    rows.sort(key=rank)
    finished = [r for r in rows if r["status"] == "FINISHED" and r[metric] != ""]
    # a search's best is its study's (one source with the console); ranked only if none matches
    chosen = [r for r in finished if best_trial is not None and r["trial"] == str(best_trial)]
    if chosen or finished:
        (chosen or finished)[0]["best"] = True
    if chosen:  # among equal values, the study's best is first
        rows.insert(0, rows.pop(rows.index(chosen[0])))
    return rows


def _fraction(value: Any) -> str:
    return "" if value == "" else ACC_FORMAT.format(value)


def read_summary(client: Any, parent: Any) -> tuple[Summary, list[Any], dict[str, list[float]]]:
    """A sweep's summary read back from the store, with its children and each child's seconds per
    epoch (TRAIN_TIME's history, evaluation excluded; for a search's story)."""
    children = sweep_children(client, parent)
    keys = varying_keys(parent, children)
    metric, maximize = objective(parent, children)
    epochs = {
        c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, TRAIN_TIME)]
        for c in children
    }
    tags = parent.data.tags
    best_trial = stored_best(tags[STUDY], tags.get(STORAGE, "")) if STUDY in tags else None
    rows = summary_rows(children, keys, epochs, metric, maximize, best_trial)
    return Summary(parent, rows, keys, metric, maximize), children, epochs


class Summary:
    """A sweep's answer as people and scripts read it: its rows, grouped by config when the sweep
    varies the seed (replicates.group_rows), the table, the lines under it, the plot."""

    def __init__(self, parent: Any, rows: list[dict[str, Any]], keys: list[str], metric: str, maximize: bool):
        self.parent, self.rows, self.keys, self.metric, self.maximize = parent, rows, keys, metric, maximize
        seeded = replicates.REPLICATE_KEY in keys
        self.groups = replicates.group_rows(rows, keys, metric, maximize) if seeded else None
        self.config_keys = [k for k in keys if k != replicates.REPLICATE_KEY] if seeded else keys

    def best(self) -> dict[str, Any] | None:
        """The chosen run and the metrics the parent records for the choice: best/<metric> and
        best/test/acc (a group's means over its seeds, and best/n)."""
        names = dict.fromkeys([self.metric, "test/acc"])
        if self.groups is not None:
            if not (self.groups and self.groups[0]["best"]):
                return None
            group = self.groups[0]
            values = {name: group[f"{name}_mean"] for name in names if group[f"{name}_mean"] != ""}
            return {"run_id": group["best_run_id"], "metrics": {**values, "n": group["n"]}}
        row = next((r for r in self.rows if r["best"]), None)
        if row is None:
            return None
        return {"run_id": row["run_id"], "metrics": {name: row[name] for name in names if row[name] != ""}}

    def csv_rows(self) -> list[dict[str, Any]]:
        """Full precision: one row per config (with seeds swept) or per run."""
        return self.groups if self.groups is not None else self.rows

    def display(self, mark: str = "★") -> list[dict[str, str]]:
        if self.groups is None:
            return display_rows(self.rows, self.keys, mark, self.metric)
        short = run_names.short_keys(self.config_keys)
        epochs = {r["run_id"]: r["epochs"] for r in self.rows if r["status"] == "FINISHED"}
        out = []
        for g in self.groups:
            row = {"best": mark if g["best"] else ""}
            row.update({short[k]: run_names.short_value(str(g[k])) for k in self.config_keys})
            row["n"] = str(g["n"])
            if len(set(epochs.values())) > 1:  # its finished seeds' epochs: "2", or "2-4" when they differ
                trained = sorted({epochs[i] for i in g["run_ids"].split() if i in epochs}) or [""]
                row["epochs"] = "-".join(str(e) for e in dict.fromkeys([trained[0], trained[-1]]))
            for name in dict.fromkeys([self.metric, "test/acc"]):
                row[name] = _fraction(g[f"{name}_mean"])
                if name == self.metric:
                    row["sd"] = _fraction(g[f"{name}_sd"])
                low, high = g[f"{name}_ci_low"], g[f"{name}_ci_high"]
                row[f"{name.split('/')[0]} 95% CI"] = "" if low == "" else f"{low:.4f}-{high:.4f}"
            row["p vs best"] = "" if g["p_vs_best"] == "" else f"{g['p_vs_best']:.3g}"
            out.append(row)
        return out

    def footer(self) -> list[str]:
        """What the table means: what chose, and how much to trust the differences (nothing
        without runs; a search's trials differ by design, so it gets no advice on seeds)."""
        if not self.rows:
            return []
        if self.metric.startswith("test/"):
            chosen = (
                f"chosen on the test split ({self.metric}): no validation split (dataset.val_size=0), "
                "so the best's test score is optimistic; hold one out with dataset.val_size=0.1"
            )
        else:
            chosen = f"chosen on {self.metric} (the validation split); test/acc shown, never used to choose"
        lines = [chosen]
        if self.groups is not None:
            lines.append(replicates.verdict(self.groups, self.keys, self.metric))
        elif len(self.rows) > 1 and "search/metric" not in self.parent.data.tags:
            lines.append(
                "one seed per config: these differences carry no error bars; to tell configs apart, "
                "run each with several seeds (add seed=0,1,2 to the sweep)"
            )
        if len({r["epochs"] for r in self.rows if r["status"] == "FINISHED"}) > 1:
            lines.append("the runs trained for different numbers of epochs (column epochs)")
        best = next((r for r in self.rows if r["best"]), None)
        if best is not None and best.get("trial", "") != "":  # as the search's console line names it
            value = ACC_FORMAT.format(best[self.metric])
            lines.append(f"best trial {best['trial']}: {self.metric} {value} (run {best['run_id'][:8]})")
        return lines

    def text(self, status: str | None = None) -> str:
        """As `cifar-exp compare` prints it: the sweep (with `status`, else the parent's), the
        table, the lines under it."""
        p = self.parent
        status = (status or p.info.status).lower()
        head = f"{p.info.run_name}  ({p.info.run_id}, {status}, {len(self.rows)} runs)"
        table = tables.text_table(self.display(mark="*")) or "(no runs)\n"
        return f"{head}\n{table}" + "".join(f"{line}\n" for line in self.footer())

    def figure(self) -> Any:
        names = run_names.short_keys(self.keys)
        if self.groups is not None:
            return sweep_plots.group_figure(self.groups, self.config_keys, names, self.metric)
        return sweep_plots.sweep_figure(self.rows, self.keys, names, self.metric)


def display_rows(
    rows: list[dict[str, Any]], keys: list[str], mark: str = "★", metric: str = "val/acc"
) -> list[dict[str, str]]:
    """The summary as a person reads it: `mark` on the best row, the varying values under short
    key names, `metric` and test/acc (choosing on the test split: test/acc and test/loss) to 4
    decimals, training seconds to 0.01, the epochs and the status only when not all the same,
    and the run id's first 8 characters."""
    short = run_names.short_keys(keys)
    all_finished = all(r["status"] == "FINISHED" for r in rows)
    same_epochs = len({r["epochs"] for r in rows if r["status"] == "FINISHED"}) <= 1
    columns = [metric, "test/acc"] if not metric.startswith("test/") else [metric, "test/acc", "test/loss"]
    out = []
    for r in rows:
        row = {"best": mark if r["best"] else ""}
        row.update({short[k]: run_names.short_value(str(r[k])) for k in keys})
        row.update({name: _fraction(r[name]) for name in dict.fromkeys(columns)})
        row["train s"] = "" if r["train_s"] == "" else f"{r['train_s']:.2f}"
        if not same_epochs:
            row["epochs"] = str(r["epochs"])
        if not all_finished:
            row["status"] = r["status"]
        row["run"] = r["run_id"][:8]
        out.append(row)
    return out


def sweep_note(parent: Any, table: Summary, search: bool, story: dict[str, float] | None = None) -> str:
    """The parent's description (markdown, shown on its run page): what it varied, the best as a
    link with what chose it, for a search the trials and epochs pruning saved, and the table with
    the lines under it (as `cifar-exp compare` prints them)."""
    link = f"#/experiments/{parent.info.experiment_id}/runs/{{}}?{store.MODEL_TRAINING_VIEW}"
    rows, metric = table.rows, table.metric
    short = run_names.short_keys(table.keys)
    statuses = [r["status"] for r in rows]
    done = "all finished" if set(statuses) == {"FINISHED"} else f"{statuses.count('FINISHED')} finished"
    if statuses.count(PRUNED):
        done += f", {statuses.count(PRUNED)} pruned"
    what = ", ".join(short.values()) or "nothing"
    lines = [f"**{'Search' if search else 'Sweep'} over {what}**: {len(rows)} runs, {done}."]
    best = table.best()
    if best is not None:
        row = next(r for r in rows if r["run_id"] == best["run_id"])
        keys = table.config_keys
        values = ",".join(f"{short[k]}={run_names.short_value(str(row[k]))}" for k in keys)
        scores = ", ".join(
            f"{name} {ACC_FORMAT.format(v)}" for name, v in best["metrics"].items() if name != "n"
        )
        over = f" (means over {best['metrics']['n']} seeds)" if "n" in best["metrics"] else ""
        lines.append(
            f"Best: [{values or row['run']}]({link.format(best['run_id'])}), {scores}{over}, chosen on "
            f"{metric}. The table is `sweep/summary.md`, the plot `{PLOT_ARTIFACT}` (Artifacts)."
        )
    if story and story["epochs_unpruned"]:
        trained, unpruned = story["epochs_trained"], int(story["epochs_unpruned"])
        lines.append(
            f"Epochs trained: {trained:.4g} of the {unpruned} these trials would have trained unpruned "
            f"({100 * trained / unpruned:.0f}%). History: `search/history.png`."
        )
    text = tables.text_table(table.display(mark="*"))  # the UI squeezes markdown tables
    return "\n\n".join([*lines, f"```\n{text}```", *table.footer()])
