"""`cifar-exp sync OUTPUT_DIR`: what the store did not take during a run (an outage), recorded into
the run afterwards. A run's folder may hold unrecorded_metrics.jsonl (metrics, params, tags, the
run's end and a note of the files kept, each line naming its run) and unrecorded_artifacts/.

Metric points the store already holds (same key and step) are skipped, so a sync run twice, or
cut short and run again, records nothing twice. A run that was never opened is created, with the
params from the file and the config from the folder's .hydra snapshot, and found again by its
`synced_from` tag. What was synced is renamed *.synced; the run loses its `unrecorded` tag and
gets `synced`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import UserError, first_line
from cifar_exp.run_names import run_name
from cifar_exp.tracking import leases
from cifar_exp.tracking.identity import HASH_TAG, config_hash
from cifar_exp.tracking.records import UNRECORDED_ARTIFACTS, UNRECORDED_METRICS, batches, write_files
from cifar_exp.tracking.store import ensure_experiment, tracking_uri

log = logging.getLogger(__name__)

SYNCED = ".synced"  # suffix of what was synced
SYNCING = ".syncing"  # the spill file set aside while it is synced (new lines go to a new file)
SYNCED_FROM_TAG = "synced_from"  # on a run that sync created: the folder it came from
NOT_REPLAYED = ("unrecorded",)  # tags that described the outage itself


@dataclass
class Synced:
    """What one run got."""

    run_id: str
    metrics: int = 0  # points recorded
    skipped: int = 0  # points the store held already
    params: int = 0
    files: int = 0
    status: str | None = None  # the end recorded, when the store had not been told
    created: bool = False

    def __str__(self) -> str:
        said = f"run {self.run_id}{' (created)' if self.created else ''}: {self.metrics} metric points"
        said += f" ({self.skipped} already recorded), {self.params} params, {self.files} files"
        return said + (f", ended {self.status}" if self.status else "")


def sync(uri_flag: str | None, output_dir: Path) -> list[Synced]:
    """Syncs every run folder under `output_dir` (a run's folder, or a sweep's); prints one line a
    run. `uri_flag` (--tracking-uri) wins over each folder's mlflow.tracking_uri and the default."""
    if not output_dir.is_dir():
        raise UserError(f"sync: no folder {output_dir}")
    found = {p.parent for p in output_dir.rglob(f"{UNRECORDED_METRICS}*") if not p.name.endswith(SYNCED)}
    found |= {p.parent for p in output_dir.rglob(UNRECORDED_ARTIFACTS) if p.is_dir()}
    if not found:
        print(f"nothing to sync under {output_dir}")
        return []
    done = []
    for folder in sorted(found):
        uri = tracking_uri(TrackingConfig(tracking_uri=uri_flag or _recorded(folder).get("tracking_uri")))
        try:
            synced = sync_folder(folder, uri)
        except Exception as e:  # noqa: BLE001 - a store that does not answer: nothing is marked synced
            if isinstance(e, UserError):
                raise
            raise UserError(
                f"sync {folder}: the store {uri} failed ({first_line(e)}); run it again"
            ) from None
        for one in synced:
            print(f"{folder}: {one}")
        done += synced
    return done


def sync_folder(folder: Path, uri: str) -> list[Synced]:
    """Replays one run folder's spill file and kept files into the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    lines = _set_aside(folder)
    by_run: dict[str | None, list[dict]] = {}
    for line in lines:
        by_run.setdefault(line.get("run_id"), []).append(line)
    kept = folder / UNRECORDED_ARTIFACTS
    if kept.is_dir() and not any("artifacts" in line for line in lines):  # no note: the folder's run
        run_id = next(iter(by_run), None) or _run_of_folder(client, folder)
        by_run.setdefault(run_id, []).append({"artifacts": UNRECORDED_ARTIFACTS})
    done = []
    for run_id, run_lines in by_run.items():
        created = run_id is None
        if created:  # started when its first metric was taken, not when it is synced
            start = min((line["timestamp"] for line in run_lines if "timestamp" in line), default=None)
            run_id = _open_never_opened(client, folder, uri, start)
        done.append(_replay(client, run_id, run_lines, folder, created))
    _mark_synced(folder)
    return done


def _set_aside(folder: Path) -> list[dict]:
    """Moves the spill file to *.syncing (a running process appends to a new one), joining what an
    interrupted sync left there; returns its lines (a line cut short by a kill is skipped)."""
    spill, syncing = folder / UNRECORDED_METRICS, folder / (UNRECORDED_METRICS + SYNCING)
    if spill.exists():
        if syncing.exists():
            with syncing.open("a") as f:
                f.write(spill.read_text())
            spill.unlink()
        else:
            os.replace(spill, syncing)
    lines = []
    for text in syncing.read_text().splitlines() if syncing.exists() else []:
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            log.warning(f"sync: skipped a line cut short in {syncing}: {text[:80]}")
    return lines


def _replay(client: Any, run_id: str, lines: list[dict], folder: Path, created: bool) -> Synced:
    from mlflow.entities import Metric, Param, RunTag

    run = client.get_run(run_id)
    synced = Synced(run_id, created=created)
    params = {line["param"]: str(line["value"]) for line in lines if "param" in line}
    new_params = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    for key in [k for k in params if k in run.data.params and run.data.params[k] != params[k]]:
        log.warning(f"sync: run {run_id} holds param {key}={run.data.params[key]}, not {params[key]}; kept")
    metrics = [line for line in lines if "metric" in line]
    have = {(k, m.step) for k in {m["metric"] for m in metrics} for m in client.get_metric_history(run_id, k)}
    new_metrics = []
    for m in metrics:
        if (m["metric"], m["step"]) in have:
            synced.skipped += 1
            continue
        have.add((m["metric"], m["step"]))
        new_metrics.append(Metric(m["metric"], float(m["value"]), int(m["timestamp"]), int(m["step"])))
    tags = [RunTag(line["tag"], line["value"]) for line in lines if "tag" in line]
    tags = [t for t in tags if t.key not in NOT_REPLAYED]
    for batch in batches(new_metrics, new_params, tags):
        client.log_batch(run_id, *batch)
    synced.metrics, synced.params = len(new_metrics), len(new_params)
    if any("artifacts" in line for line in lines) and (folder / UNRECORDED_ARTIFACTS).is_dir():
        client.log_artifacts(run_id, str(folder / UNRECORDED_ARTIFACTS))
        synced.files = sum(p.is_file() for p in (folder / UNRECORDED_ARTIFACTS).rglob("*"))
    now = client.get_run(run_id)
    for key in {line["untag"] for line in lines if "untag" in line} & set(now.data.tags):
        client.delete_tag(run_id, key)
    ends = [line for line in lines if "status" in line]
    # the process ended it, the store was not told (and may have closed it as stale meanwhile)
    if ends and (now.info.status == "RUNNING" or leases.closed_as_stale(now)):
        synced.status = ends[-1]["status"]
        client.set_terminated(run_id, synced.status, ends[-1].get("end_time"))
        if synced.status == "FINISHED" and leases.closed_as_stale(now):
            client.delete_tag(run_id, "error")
    if "unrecorded" in now.data.tags:
        client.delete_tag(run_id, "unrecorded")
    client.set_tag(
        run_id,
        "synced",
        f"{synced.metrics} metric points, {synced.params} params, {synced.files} files from {folder}",
    )
    return synced


def _mark_synced(folder: Path) -> None:
    """*.syncing -> *.synced (appended to an earlier one), unrecorded_artifacts/ -> *.synced/."""
    syncing, synced = folder / (UNRECORDED_METRICS + SYNCING), folder / (UNRECORDED_METRICS + SYNCED)
    if syncing.exists():
        with synced.open("a") as f:
            f.write(syncing.read_text())
        syncing.unlink()
    kept = folder / UNRECORDED_ARTIFACTS
    if kept.is_dir():
        shutil.copytree(kept, folder / (UNRECORDED_ARTIFACTS + SYNCED), dirs_exist_ok=True)
        shutil.rmtree(kept)


def _recorded(folder: Path) -> dict[str, Any]:
    """The folder's mlflow settings from its .hydra/config.yaml ({} without one)."""
    import yaml

    try:
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return config.get("mlflow") or {}


def _run_of_folder(client: Any, folder: Path) -> str | None:
    """The run whose hydra_output_dir tag names `folder` (the most recent), None if none does."""
    for experiment in client.search_experiments():
        runs = client.search_runs(
            [experiment.experiment_id],
            f"tags.hydra_output_dir = '{folder.resolve()}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0].info.run_id
    return None


def _open_never_opened(client: Any, folder: Path, uri: str, start: int | None) -> str:
    """Creates the run that the store never opened (or finds the one an earlier sync created),
    tagged and named as the run would have been, with the .hydra snapshot as its config."""
    from omegaconf import OmegaConf

    from cifar_exp.tracking.runs import CONFIG_ARTIFACT, snapshot_files

    recorded = _recorded(folder)
    experiment_id = ensure_experiment(
        TrackingConfig(tracking_uri=uri, experiment_name=recorded.get("experiment_name") or "cifar_exp")
    )
    where = str(folder.resolve())
    snapshot = folder / ".hydra"
    overrides = []
    if (snapshot / "overrides.yaml").is_file():
        overrides = [str(o) for o in OmegaConf.load(snapshot / "overrides.yaml")]
    tags = {SYNCED_FROM_TAG: where, "hydra_output_dir": where, "overrides": json.dumps(overrides)}
    files = snapshot_files(folder)
    if (snapshot / "config.yaml").is_file():
        config = OmegaConf.load(snapshot / "config.yaml")
        try:
            files[CONFIG_ARTIFACT] = OmegaConf.to_yaml(config, resolve=True).encode()
            tags[HASH_TAG] = config_hash(config)
        except Exception:  # noqa: BLE001 - an interpolation only Hydra resolves: keep it as written
            files[CONFIG_ARTIFACT] = (snapshot / "config.yaml").read_bytes()
    found = client.search_runs([experiment_id], f"tags.{SYNCED_FROM_TAG} = '{where}'", max_results=1)
    run_id = found[0].info.run_id if found else None
    if run_id is None:
        run_id = client.create_run(experiment_id, start, tags, run_name(overrides)).info.run_id
    with tempfile.TemporaryDirectory() as tmp:  # again when found: a sync cut short may have missed them
        write_files(files, Path(tmp))
        client.log_artifacts(run_id, tmp)
    return run_id
