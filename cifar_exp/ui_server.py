"""`cifar-exp ui`: the MLflow UI's server process, started lean and stopped whole (the port is
checked before anything starts, "ready" is said only once the server answers, and Ctrl-C stops
every process it started), and the links it prints to the runs and the latest sweep.

Lean: one uvicorn worker (MLflow's default is 4) and no job runner (MLflow 3 starts a job runner
and about seven huey consumers for its GenAI jobs, which the model-training view never uses).
Measured on a contended 2-core AMD EPYC: the server is 2 processes and about 0.5 GB resident,
answering after 12-19 s, against 15 processes, 2.1 GB and 30-35 s with MLflow's defaults
(`cifar-exp ui` as a whole: 3 processes and 1.0-1.2 GB, was 16 and 2.3 GB).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_exp import sweep_summary
from cifar_exp.errors import UserError
from cifar_exp.signals import Terminated
from cifar_exp.store_reading import find_experiment, find_sweep, open_store
from cifar_exp.tracking import store

LEAN = ["--workers", "1"]  # one browser, one user: more workers only add processes and memory
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner, no huey consumers
POLL_S = 0.2
STOP_GRACE_S = 5  # after Ctrl-C, the seconds the server has to stop before it is killed


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Refuses a port another program holds, before anything starts or is printed. Binds as
    uvicorn does (SO_REUSEADDR), so a port left in TIME_WAIT by the last UI is not refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(
                f"--port {port}: {host}:{port} is taken ({e.strerror or e}; another MLflow UI?); "
                f"open that one, or choose another port: cifar-exp ui --port {port + 1}"
            ) from None


def answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # URLError is one
        return False


def serve(command: list[str], base: str, on_ready: Callable[[float], None]) -> int:
    """Runs the server `command` in its own process group until it ends or Ctrl-C; calls
    on_ready(seconds) once `base` answers. Returns the exit status: 130 after Ctrl-C, 143 after
    SIGTERM (all of the server's processes stopped), the server's own if it stopped by itself."""
    start = time.monotonic()
    # Its own session: the terminal's Ctrl-C reaches only this process, which then stops the
    # server's whole group (its uvicorn child too), instead of leaving it serving.
    server = subprocess.Popen(command, env={**os.environ, **LEAN_ENV}, start_new_session=True)
    try:
        while server.poll() is None and not answers(base):
            time.sleep(POLL_S)
        if server.poll() is None:
            on_ready(time.monotonic() - start)
        return server.wait()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (signals.Terminated)
        print("stopping the MLflow UI", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        stop_group(server)


def stop_group(server: subprocess.Popen) -> None:
    """SIGINT to the server's process group, then SIGKILL to what is left after STOP_GRACE_S."""
    for sent in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(server.pid, sent)
        except ProcessLookupError:  # the group is gone: every process ended
            return
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and _group_alive(server):
            time.sleep(0.1)
        if not _group_alive(server):  # gone: no SIGKILL to a group id that may be reused
            return


def _group_alive(server: subprocess.Popen) -> bool:
    server.poll()  # reaps the leader once it ends, so only live members count
    try:
        os.killpg(server.pid, 0)
    except ProcessLookupError:
        return False
    return True


def ui(uri: str, port: int) -> int:
    """`mlflow ui` on the store, bound to 127.0.0.1, lean (cifar_exp/ui_server.py); a SQLite
    store's new artifacts go beside it. Once the server answers, says so with the links that land
    on the runs (model-training view) and the latest sweep's compare view: MLflow 3 opens an
    experiment in its GenAI view (traces) unless told otherwise. Ctrl-C stops all of it."""
    from concurrent.futures import ThreadPoolExecutor

    check_port(port)  # before anything is made, started or printed
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, *LEAN]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if (artifacts := store.artifact_root(uri)) is not None:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        command += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    print(f"starting the MLflow UI on {base} for {uri} ...", flush=True)
    # A SQLite file the server is about to create is not read meanwhile (its tables half made).
    recorded = not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()

    def links() -> list[str]:
        try:
            if not recorded:
                raise UserError(f"nothing recorded yet: no MLflow store at {uri.removeprefix('sqlite:///')}")
            client = open_store(uri)
            if store.local_store_folder(uri) is not None:
                store.hide_default_experiment(client)  # a store made before the project hid it
            return [f"  {what:<22} {url}" for what, url in ui_links(client, base).items()]
        except UserError as e:
            return [f"  ({e})"]

    def ready(seconds: float) -> None:
        print(f"MLflow UI ready on {base} after {seconds:.0f} s (Ctrl-C stops it)")
        print("\n".join(reading.result()), flush=True)

    with ThreadPoolExecutor(max_workers=1) as pool:  # the store is read while the server starts
        reading = pool.submit(links)
        return serve(command, base, ready)


def ui_links(client: Any, base: str) -> dict[str, str]:
    """{what: URL}: the experiment's runs in the model-training view, and for the latest sweep its
    parent run and the compare view of its children."""
    eid = find_experiment(client).experiment_id
    view = store.MODEL_TRAINING_VIEW
    # An empty searchFilter: the UI keeps the last search per experiment, and would show only that.
    links = {"runs:": f"{base}/#/experiments/{eid}/runs?{view}&searchFilter="}
    try:
        parent = find_sweep(client, eid, "latest")
    except UserError:
        return links
    children = sweep_summary.sweep_children(client, parent)
    # Written as the UI writes it: JSON lists, with only their quotes escaped.
    ids = json.dumps([c.info.run_id for c in children], separators=(",", ":"))
    experiments = json.dumps(sorted({c.info.experiment_id for c in children} or {eid}), separators=(",", ":"))
    query = f"{ids}&experiments={experiments}".replace('"', "%22")
    children_first = urllib.parse.urlencode(
        {
            "searchFilter": f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            "orderByKey": "metrics.`val/acc`",  # what chooses
        }
    )
    links["latest sweep:"] = f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}?{view}"
    links["its runs, best first:"] = (
        f"{base}/#/experiments/{eid}/runs?{view}&{children_first}&orderByAsc=false"
    )
    links["its runs compared:"] = f"{base}/#/compare-runs?runs={query}&{view}"
    return links
