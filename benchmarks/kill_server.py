"""kill_resume.py --server-kill: a real `mlflow server` (a SQLite store in a temporary folder, a
free port) killed mid-run and started again after the run ended, then `cifar-exp sync` when the
run says so. Counts the metric points lost and duplicated (against a run of the same config with
the server up, in the same invocation), the run's status, Python tracebacks, the lines the run
printed about the store, and the seconds the dead server added to the run (its wall time against
the run with the server up: on a busy machine, a few seconds of noise)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

RUN_ID = re.compile(r"^MLflow run ([0-9a-f]{32}) ", re.M)


class Server:
    """`mlflow server` on 127.0.0.1, the same port across restarts, in its own process group."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.uri = root, f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> Server:
        argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host=127.0.0.1"]
        argv += [
            f"--port={self.port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{self.root / 'server.db'}",
        ]
        argv += [f"--artifacts-destination={self.root / 'artifacts'}"]
        with (self.root / "server.log").open("a") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.root,
                env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI job workers
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not answer on {self.uri}: see {self.root / 'server.log'}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def timed_run(
    train: list[str], folder: Path, env: dict[str, str], on_training: Callable[[], None] | None
) -> tuple[float, int, str]:
    """One run to its end: (wall seconds, exit code, output); `on_training` is called once, at its
    first loss line (the run open, training under way)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "run.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cifar_exp", *train, f"hydra.run.dir={folder / 'out'}"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    while on_training and proc.poll() is None:
        text = log.read_text()
        if RUN_ID.search(text) and re.search(r"^\[1,", text, re.M):
            on_training()
            on_training = None
        time.sleep(0.01)
    code = proc.wait(600)
    return time.monotonic() - started, code, log.read_text()


def server_kill(
    work: Path, env: dict[str, str], train: list[str], compare: Callable[[dict, dict], str]
) -> tuple[list[str], bool]:
    """The two runs, the restart and the sync; the lines to print, and whether a target missed.
    `compare(expected, got)` counts lost and duplicated points (kill_resume.compare)."""
    from mlflow.tracking import MlflowClient

    root = work / "server"
    root.mkdir(parents=True, exist_ok=True)
    server = Server(root).start(env)
    env = {**env, "MLFLOW_TRACKING_URI": server.uri}
    lines: list[str] = []
    try:
        up_s, code, output = timed_run(train, root / "up", env, None)
        assert code == 0, output
        client = MlflowClient(server.uri)
        expected = history(client, RUN_ID.search(output)[1])
        dead_s, code, output = timed_run(train, root / "dead", env, server.kill)
        server.start(env)  # back, after the run ended
        run_id = RUN_ID.search(output)[1]
        synced = "cifar-exp sync" in output
        if synced:
            sync = [
                sys.executable,
                "-m",
                "cifar_exp",
                "sync",
                "--tracking-uri",
                server.uri,
                str(root / "dead" / "out"),
            ]
            done = subprocess.run(sync, cwd=root, env=env, capture_output=True, text=True, timeout=300)
            output += done.stdout + done.stderr
        status = client.get_run(run_id).info.status
        counts = compare(expected, history(client, run_id))
    finally:
        server.kill()
    said = [line for line in output.splitlines() if line.startswith("MLflow") or "cifar-exp sync" in line]
    tracebacks = output.count("Traceback (most recent call last)")
    lines.append(
        f"server killed mid-run: exit {code}, {status} after {'sync' if synced else 'the run'}; {counts}; "
        f"{len(said)} lines about the store; tracebacks {tracebacks}"
    )
    lines.append(
        f"  run with the server up {up_s:.1f} s, with it dead {dead_s:.1f} s: the dead server added "
        f"{dead_s - up_s:+.1f} s"
    )
    lines += [f"  said: {line[:160]}" for line in said]
    failed = code != 0 or status != "FINISHED" or tracebacks or not counts.startswith("lost 0, duplicated 0")
    return lines, bool(failed)


def history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
