"""Subcommands that use what MLflow recorded: `ui`, `rerun RUN_ID`, `resume RUN_ID`,
`predict RUN_ID IMAGE...`; and `sync OUTPUT_DIR`, what it could not record during an outage."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from cifar_exp import reports
from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line
from cifar_exp.tracking import resumption, runs, store

HydraMain = Callable[[list[str], dict[str, str] | None], None]
USAGE = {
    "ui": "start the MLflow UI on the project's store, bound to 127.0.0.1",
    "rerun": "re-run a recorded run from its logged config snapshot into a new run",
    "resume": "continue an interrupted run from its last checkpoint, into the same run",
    "predict": "print the top classes of each image with a recorded run's weights",
    "sync": "record what a store outage left in a run's folder (unrecorded_metrics.jsonl, "
    "unrecorded_artifacts/) into its run; steps already recorded are skipped",
}


def dispatch(command: str, argv: list[str], hydra_main: HydraMain) -> int:
    """Runs one subcommand; `hydra_main(argv, tags)` is the training command line."""
    parser = argparse.ArgumentParser(prog=f"cifar-exp {command}", description=USAGE[command])
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else mlruns/mlflow.db; for sync, the run's)",
    )
    if command == "ui":
        parser.add_argument("--port", type=int, default=5000)
    elif command == "sync":
        parser.add_argument("output_dir", type=Path, help="a run's Hydra output folder, or a sweep's")
    else:
        parser.add_argument("run_id", help="the MLflow run id (see the UI or the end of a run's log)")
    if command == "predict":
        parser.add_argument("images", nargs="+", help="image files (any size; resized to 32x32)")
        parser.add_argument("--top", type=int, default=3, help="classes to show per image")
    if command == "rerun":
        parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (off the record)")
    if command == "resume":
        parser.add_argument("overrides", nargs="*", help="e.g. trainer.epochs=10 to train longer")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = store.tracking_uri(TrackingConfig(tracking_uri=args.tracking_uri))
    try:
        if command == "ui":
            return ui(uri, args.port)
        if command == "sync":
            from cifar_exp.tracking import sync

            sync.sync(args.tracking_uri, args.output_dir)
            return 0
        if command in ("rerun", "resume"):
            return rerun(uri, args.run_id, args.overrides, hydra_main, resume=command == "resume")
        return predict(uri, args.run_id, args.images, args.top)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def ui(uri: str, port: int) -> int:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if uri == store.default_store_uri():
        store.STORE_DIR.mkdir(parents=True, exist_ok=True)
        command += ["--default-artifact-root", (store.STORE_DIR / "artifacts").as_uri()]
    print(f"MLflow UI on http://127.0.0.1:{port} for {uri} (Ctrl-C stops it)", flush=True)
    return subprocess.call(command)


def _download(uri: str, run_id: str, artifact: str, dest: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=dest, tracking_uri=uri
            )
        )
    except MlflowException as e:
        message = first_line(e)
        raise UserError(f"run {run_id}: cannot read {artifact} from {uri} ({message})") from None
    except OSError as e:
        raise UserError(f"run {run_id}: cannot read {artifact} from {uri} ({e})") from None


def rerun(uri: str, run_id: str, overrides: list[str], hydra_main: HydraMain, resume: bool = False) -> int:
    """Composes the run's logged resolved config (under the typed schema, with this project's
    Hydra settings) and trains it into a new run tagged rerun_of=RUN_ID, or with `resume`
    continues RUN_ID itself from its last checkpoint."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        snapshot = yaml.safe_load(_download(uri, run_id, runs.CONFIG_ARTIFACT, tmp).read_text())
        if snapshot["mlflow"].get("tracking_uri") or uri != store.tracking_uri(TrackingConfig()):
            snapshot["mlflow"]["tracking_uri"] = uri  # the new run goes where the original was read
        snapshot["resume"] = run_id if resume else None
        if resume and (epochs := resumption.recorded_epochs(uri, run_id)):  # trained further since
            snapshot["trainer"]["epochs"] = epochs
        if "norm_bias_lr_scale" in snapshot.get("trainer", {}):  # recorded before it moved (#13)
            snapshot["optimizer"]["norm_bias_lr_scale"] = snapshot["trainer"].pop("norm_bias_lr_scale")
        hydra_settings = yaml.safe_load(Path(store.PROJECT_ROOT, "conf/config.yaml").read_text())
        primary = {
            "defaults": ["config_schema", "_self_"],
            **snapshot,
            "hydra": hydra_settings.get("hydra", {}),
        }
        Path(tmp, "rerun.yaml").write_text(yaml.safe_dump(primary, sort_keys=False))
        tags = None
        if not resume:
            original = MlflowClient(uri).get_run(run_id)
            tags = {"rerun_of": run_id, "mlflow.runName": f"rerun:{original.info.run_name}"}
        hydra_main(["--config-dir", tmp, "--config-name", "rerun", *overrides], tags)
    return 0


def predict(uri: str, run_id: str, images: list[str], top: int) -> int:
    from omegaconf import OmegaConf

    from cifar_exp.config import build
    from cifar_exp.data import normalise, read_image

    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(yaml.safe_load(_download(uri, run_id, runs.CONFIG_ARTIFACT, tmp).read_text()))
        classes = json.loads(_download(uri, run_id, reports.CLASSES_ARTIFACT, tmp).read_text())
        weights = _download(uri, run_id, reports.WEIGHTS_ARTIFACT, tmp)
        model = build(cfg.model, num_classes=len(classes["classes"]))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    for path in images:
        if not Path(path).is_file():
            raise UserError(f"no image file {path}")
        x = normalise(
            read_image(Path(path))[None],
            tuple(cfg.dataset.mean),
            tuple(cfg.dataset.std),
            torch.float32,
        )
        with torch.no_grad():
            probs = torch.softmax(model(x), 1)[0]
        values, indices = probs.topk(min(top, len(probs)))
        ranked = ", ".join(
            f"{classes['classes'][i]} {p:.1%}" for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        )
        print(f"{path}: {ranked}")
    return 0
