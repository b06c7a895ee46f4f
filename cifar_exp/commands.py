"""Subcommands that use what MLflow recorded: `ui` (ui_server.py), `compare [SWEEP]`, `runs`,
`rerun RUN_ID`, `resume RUN_ID`, `predict RUN_ID IMAGE...`; and `sync OUTPUT_DIR` (what an outage
kept from the store) or `sync --stale`. Reading the store: store_reading.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from cifar_exp import reports, run_names, sweep_summary, tables, ui_server
from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line
from cifar_exp.store_reading import asking, find_experiment, find_sweep, open_store
from cifar_exp.tracking import identity, leases, resumption, runs, store

HydraMain = Callable[[list[str], dict[str, str] | None], None]
USAGE = {
    "ui": "start the MLflow UI on the project's store, bound to 127.0.0.1, and print links to the "
    "runs and to the latest sweep's comparison",
    "compare": "print a sweep's runs as a table, best first (chosen on val/acc, test/acc beside it); with "
    "seeds swept, one row per config: n, mean, sd, 95% CI, Welch's p against the best",
    "runs": "list the most recent runs: id, name, status, val/acc, test/acc, duration",
    "rerun": "re-run a recorded run from its logged config snapshot into a new run",
    "resume": "continue an interrupted run from its last checkpoint, into the same run",
    "predict": "print the top classes of each image with a recorded run's weights",
    "sync": "record what a store outage left in a run's folder (unrecorded_metrics.jsonl, "
    "unrecorded_artifacts/) into its run; steps already recorded are skipped; with --stale, first end "
    "KILLED the runs left RUNNING by a process that died",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line (not the usage block, then the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def counting(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `least` (to `most`)."""

    def whole_number(text: str) -> int:
        with contextlib.suppress(ValueError):
            if least <= (value := int(text)) and (most is None or value <= most):
                return value
        allowed = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number, {allowed}")

    return whole_number


def parser_for(command: str) -> OneLineParser:
    parser = OneLineParser(prog=f"cifar-exp {command}", description=USAGE[command])
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else mlruns/mlflow.db; for sync, the run's)",
    )
    if command == "ui":
        parser.add_argument("--port", type=counting(1, 65535), default=5000, help="on 127.0.0.1")
    elif command == "compare":
        parser.add_argument(
            "sweep", nargs="?", default="latest", help="the parent run's id (or its start), or latest"
        )
        parser.add_argument("--csv", action="store_true", help="CSV with full keys and values, for scripts")
    elif command == "runs":
        parser.add_argument("--limit", type=counting(1), default=20, help="how many runs, newest first")
    elif command == "sync":
        parser.add_argument(
            "output_dir", type=Path, nargs="?", help="a run's Hydra output folder, or a sweep's"
        )
        parser.add_argument("--stale", action="store_true", help="end KILLED the runs whose process died")
    else:
        parser.add_argument("run_id", help="the MLflow run id (see the UI or the end of a run's log)")
    if command == "predict":
        parser.add_argument("images", nargs="+", help="image files (any size; resized to 32x32)")
        parser.add_argument("--top", type=counting(1), default=3, help="classes to show per image")
    if command in ("rerun", "resume", "predict"):
        parser.add_argument(
            "--trust",
            action="store_true",
            help="run code the recorded config names outside cifar_exp and torch.optim (your own "
            "network, say); without it such a config is refused: a store must not run code on your machine",
        )
    if command == "rerun":
        parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (off the record)")
    if command == "resume":
        parser.add_argument("overrides", nargs="*", help="e.g. trainer.epochs=10 to train longer")
    return parser


def dispatch(command: str, argv: list[str], hydra_main: HydraMain) -> int:
    """Runs one subcommand; `hydra_main(argv, tags)` is the training command line."""
    args = parser_for(command).parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if command in ("ui", "compare", "runs"):  # reading: a server that does not answer is said at once
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = store.tracking_uri(TrackingConfig(tracking_uri=args.tracking_uri))
    try:
        if command in ("compare", "runs", "rerun", "resume") or getattr(args, "stale", False):
            leases.close_stale_in(uri)  # runs a dead process left RUNNING: KILLED, one line each
        if command == "ui":
            return ui_server.ui(uri, args.port)
        if command == "compare":
            return compare(uri, args.sweep, args.csv)
        if command == "runs":
            return list_runs(uri, args.limit)
        if command == "sync":
            from cifar_exp.tracking import sync

            if args.output_dir is None and not args.stale:
                raise UserError("sync: name a run's output folder, or --stale")
            if args.output_dir is not None:
                sync.sync(args.tracking_uri, args.output_dir)
            return 0
        if command in ("rerun", "resume"):
            return rerun(uri, args.run_id, args.overrides, hydra_main, command == "resume", args.trust)
        return predict(uri, args.run_id, args.images, args.top, args.trust)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def compare(uri: str, ref: str, as_csv: bool) -> int:
    """A sweep's table, best first: what varies, final val/acc (what chooses; a search's metric)
    and test/acc (reported, never choosing), training time, and status when not all finished
    (PRUNED: stopped by a search's pruner); with seeds swept, one row per config with n, mean,
    sd, 95% CI and Welch's p against the best. The lines under it say what chose and whether
    the best can be told apart from the runner-up."""
    client = open_store(uri)
    parent = find_sweep(client, find_experiment(client).experiment_id, ref)
    summary, _, _ = asking(client, lambda: sweep_summary.read_summary(client, parent))
    sys.stdout.write(tables.csv_table(summary.csv_rows()) if as_csv else summary.text())
    return 0


def list_runs(uri: str, limit: int) -> int:
    """The newest runs of the experiment, sweeps' parents included: id, name, status, final
    val/acc and test/acc (a sweep: its best's), duration."""
    client = open_store(uri)
    eid = find_experiment(client).experiment_id
    newest = ["attributes.start_time DESC"]
    found = asking(client, lambda: client.search_runs([eid], order_by=newest, max_results=limit))
    rows = []
    for run in found:
        metrics = run.data.metrics
        val, acc = (metrics.get(k, metrics.get(f"best/{k}")) for k in ("val/acc", "test/acc"))
        end = run.info.end_time or time.time() * 1000
        name = run.info.run_name or ""
        rows.append(
            {
                "run id": run.info.run_id,
                "name": name if len(name) <= 48 else f"{name[:16]}…{name[-31:]}",  # keep the end: what varied
                "status": run.info.status,
                "val/acc": "" if val is None else sweep_summary.ACC_FORMAT.format(val),
                "test/acc": "" if acc is None else sweep_summary.ACC_FORMAT.format(acc),
                "duration": _duration((end - run.info.start_time) / 1000),
            }
        )
    sys.stdout.write(tables.text_table(rows) or f"no runs in {uri} yet\n")
    return 0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _download(uri: str, run_id: str, artifact: str, dest: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=dest, tracking_uri=uri
            )
        )
    except (MlflowException, OSError) as e:
        raise UserError(f"run {run_id}: cannot read {artifact} from {uri} ({first_line(e)})") from None


def rerun(
    uri: str, run_id: str, overrides: list[str], hydra_main: HydraMain, resume: bool, trust: bool
) -> int:
    """Composes the run's logged resolved config (under the typed schema, with this project's
    Hydra settings) and trains it into a new run tagged rerun_of=RUN_ID, or with `resume`
    continues RUN_ID itself from its last checkpoint. The record is not the user's own file: it
    may name code outside this package only with `trust` (config.locate decides, as it builds)."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        snapshot = yaml.safe_load(_download(uri, run_id, runs.CONFIG_ARTIFACT, tmp).read_text())
        if snapshot["mlflow"].get("tracking_uri") or uri != store.tracking_uri(TrackingConfig()):
            snapshot["mlflow"]["tracking_uri"] = uri  # the new run goes where the original was read
        snapshot["resume"] = run_id if resume else None
        snapshot["trust"] = trust  # whatever the record says: the one who reruns it decides
        for key in ("defaults", "hydra"):  # a record chooses no config files and no Hydra settings
            snapshot.pop(key, None)
        if resume and (epochs := resumption.recorded_epochs(uri, run_id)):  # trained further since
            snapshot["trainer"]["epochs"] = epochs
        if "norm_bias_lr_scale" in snapshot.get("trainer", {}):  # recorded before it moved (#13)
            snapshot["optimizer"]["norm_bias_lr_scale"] = snapshot["trainer"].pop("norm_bias_lr_scale")
        project = yaml.safe_load(Path(store.PROJECT_ROOT, "conf/config.yaml").read_text())
        primary = {"defaults": ["config_schema", "_self_"], **snapshot, "hydra": project.get("hydra", {})}
        Path(tmp, "rerun.yaml").write_text(yaml.safe_dump(primary, sort_keys=False))
        original = MlflowClient(uri).get_run(run_id)
        check_code(uri, original, tmp)
        tags = None
        if not resume:
            recorded = json.loads(original.data.tags.get("overrides", "[]"))  # named by its own values
            tags = {"rerun_of": run_id, "mlflow.runName": run_names.rerun_name(recorded, overrides)}
        hydra_main(["--config-dir", tmp, "--config-name", "rerun", *overrides], tags)
    return 0


def check_code(uri: str, run: Any, tmp: str) -> None:
    """Warns on stderr when this checkout does not run the code `run` ran (its commit plus its
    uncommitted diff), with the commands that restore it (the diff saved to a file to apply);
    silent outside git or for a run recorded outside git."""
    recorded, run_id = run.data.tags.get("git_commit", "unknown"), run.info.run_id
    commit, dirty = identity.git_state()
    if "unknown" in (recorded, commit):
        return
    diff: str | None = ""
    if run.data.tags.get("git_dirty") == "True":
        try:
            diff = _download(uri, run_id, identity.DIFF_ARTIFACT, tmp).read_text()
        except UserError:
            diff = None  # recorded before the diff was kept
    if commit == recorded and diff == (identity.uncommitted_diff() if dirty else ""):
        return
    restore = f"git checkout {recorded[:12]}"
    if diff:
        saved = Path(tempfile.gettempdir()) / f"cifar_exp-{run_id[:8]}.diff"
        saved.write_text(diff)
        restore += f" && git apply {saved}"
    changes = {"": "", None: " with uncommitted changes it did not record"}.get(
        diff, " plus its uncommitted diff"
    )
    print(
        f"warning: this code is not what run {run_id} ran (commit {recorded[:12]}{changes}); "
        f"to run that code, from a clean checkout: {restore}",
        file=sys.stderr,
        flush=True,
    )


def predict(uri: str, run_id: str, images: list[str], top: int, trust: bool) -> int:
    from omegaconf import OmegaConf

    from cifar_exp.config import build
    from cifar_exp.data import normalise
    from cifar_exp.image_files import decode_image

    missing = [path for path in images if not Path(path).is_file()]
    if missing:  # before the run's files are fetched
        more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
        raise UserError(f"no image file {missing[0]}{more}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(yaml.safe_load(_download(uri, run_id, runs.CONFIG_ARTIFACT, tmp).read_text()))
        classes = json.loads(_download(uri, run_id, reports.CLASSES_ARTIFACT, tmp).read_text())
        weights = _download(uri, run_id, reports.WEIGHTS_ARTIFACT, tmp)
        model = build(cfg.model, trust, num_classes=len(classes["classes"]))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    mean, std = tuple(cfg.dataset.mean), tuple(cfg.dataset.std)
    for path in images:
        x = normalise(decode_image(Path(path), path)[None], mean, std, torch.float32)
        with torch.no_grad():
            probs = torch.softmax(model(x), 1)[0]
        values, indices = probs.topk(min(top, len(probs)))
        ranked = ", ".join(
            f"{classes['classes'][i]} {p:.1%}" for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        )
        print(f"{path}: {ranked}")
    return 0
