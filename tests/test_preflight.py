"""Everything a command can check is checked before anything is written or started: the run
folder, the UI's port, the subcommands' numeric flags. Each refusal is one line and a non-zero
exit, and the store stays as it was. And `cifar-exp ui` says it is ready only when the server
answers, starts lean, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cli_env, free_port, start_cli, wait_until
from omegaconf import OmegaConf

from cifar_exp import commands, ui_server
from cifar_exp.errors import UserError
from cifar_exp.output_folder import OutputFolderCheck, check_output_folder


# ---------------------------------------------------------------- the run folder
def test_a_run_folder_under_a_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("a file where a folder would go")
    for folder in (tmp_path / "notes", tmp_path / "notes/run/deep"):
        with pytest.raises(UserError) as refused:
            check_output_folder("hydra.run.dir", str(folder))
        assert str(refused.value).startswith(f"hydra.run.dir={folder}: cannot make the run folder")
        assert f"{tmp_path / 'notes'} is a file" in str(refused.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for folder in (locked, locked / "run"):
        with pytest.raises(UserError, match="Permission denied"):
            check_output_folder("hydra.run.dir", str(folder))


def test_a_sweep_folder_is_checked_before_the_sweep_opens_its_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], compose_config
) -> None:
    """The check comes first among Hydra's callbacks: the sweep callback, which opens the MLflow
    parent run, never starts."""
    (tmp_path / "file").write_text("")
    cfg = compose_config(f"hydra.sweep.dir={tmp_path}/file/sweep", hydra_config=True)
    assert list(cfg.hydra.callbacks)[0] == "output_folder"
    with pytest.raises(SystemExit) as exited:
        OutputFolderCheck().on_multirun_start(OmegaConf.create(OmegaConf.to_container(cfg)))
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"hydra.sweep.dir={tmp_path}/file/sweep: cannot make the run folder ({tmp_path}/file is a file); "
        "choose a folder you can write, e.g. hydra.sweep.dir=outputs/my_run"
    ]


def test_a_run_into_a_folder_it_cannot_make_is_one_line_and_records_nothing(
    main_in_process, tmp_path: Path
) -> None:
    """In this process (the exit status a shell gets: test_errors.py's real command)."""
    (tmp_path / "file").write_text("")
    store = tmp_path / "store" / "mlflow.db"
    result = main_in_process(
        "dataset=synthetic", f"hydra.run.dir={tmp_path}/file/run", f"mlflow.tracking_uri=sqlite:///{store}"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"hydra.run.dir={tmp_path}/file/run: cannot make the run folder ({tmp_path}/file is a file); "
        "choose a folder you can write, e.g. hydra.run.dir=outputs/my_run"
    ]
    assert not store.parent.exists()


# ---------------------------------------------------------------- the subcommands' flags
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["predict", "RUN", "x.png", "--top", "-1"],
            "argument --top: '-1': must be a whole number, at least 1",
        ),
        (["predict", "RUN", "x.png", "--top", "0"], "argument --top: '0'"),
        (["predict", "RUN", "x.png", "--top", "two"], "argument --top: 'two'"),
        (["runs", "--limit", "0"], "argument --limit: '0': must be a whole number, at least 1"),
        (["runs", "--limit", "1.5"], "argument --limit: '1.5'"),
        (["ui", "--port", "0"], "argument --port: '0': must be a whole number, from 1 to 65535"),
        (["ui", "--port", "70000"], "argument --port: '70000'"),
        (["compare", "--csv=yes"], "argument --csv: ignored explicit argument 'yes'"),
    ],
)
def test_a_bad_flag_is_one_line(argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        commands.dispatch(argv[0], argv[1:], lambda *a: None)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"cifar-exp {argv[0]}: {said}") and line.endswith(
        f"(see cifar-exp {argv[0]} --help)"
    )


def test_predict_names_a_missing_image_before_reading_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "nothing.db"  # no store at all: the image is said first
    argv = ["0" * 32, "gone.png", "also_gone.png", "--tracking-uri", f"sqlite:///{store}"]
    assert commands.dispatch("predict", argv, lambda *a: None) == 2
    assert capsys.readouterr().err.strip() == "error: no image file gone.png (and 1 more)"


# ---------------------------------------------------------------- the UI
def test_ui_on_a_taken_port_is_one_line_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = tmp_path / "new" / "mlflow.db"
        assert (
            commands.dispatch("ui", ["--port", str(port), "--tracking-uri", f"sqlite:///{store}"], None) == 2
        )
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"--port {port}: 127.0.0.1:{port} is taken" in err and f"--port {port + 1}" in err
    assert not store.parent.exists()


def living(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie, ended but not yet reaped by init, is not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


FAKE_SERVER = """
import http.server, os, signal, subprocess, sys
# A child that ignores Ctrl-C, as a worker busy in C code may: it must be stopped all the same.
deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"
child = subprocess.Popen([sys.executable, "-c", deaf])
open(sys.argv[2], "w").write(f"{os.getpid()} {child.pid}")
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""

DRIVER = """
import sys
from cifar_exp import signals, ui_server
signals.install()  # as cifar-exp does: SIGTERM raised like Ctrl-C
ui_server.STOP_GRACE_S = 0.2  # the deaf child outwaits any grace: only a wait
port, pids, fake = sys.argv[1:]
command = [sys.executable, fake, port, pids]
sys.exit(ui_server.serve(command, f"http://127.0.0.1:{port}", lambda s: print("ready", flush=True)))
"""


@pytest.mark.parametrize(("sent", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_stops_the_server_and_its_children(tmp_path: Path, sent: signal.Signals, status: int) -> None:
    """Ctrl-C from a terminal reaches its foreground process group: here, the driver's."""
    (tmp_path / "fake.py").write_text(FAKE_SERVER)
    pids, port = tmp_path / "pids", free_port()
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(port), str(pids), str(tmp_path / "fake.py")],
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert driver.stdout.readline() == "ready\n"  # only once /health answered
        server, child = map(int, pids.read_text().split())
        assert living([server, child]) == [server, child]
        os.killpg(driver.pid, sent)
        assert driver.wait(30) == status
        assert living([server, child]) == []
    finally:
        driver.kill()


@pytest.mark.slow
def test_the_real_ui_is_lean_says_ready_when_it_answers_and_stops_whole(tmp_path: Path) -> None:
    port = free_port()
    ui = start_cli("ui", "--port", str(port), cwd=tmp_path, env={"PYTHONUNBUFFERED": "1"})
    try:
        ready = r"^MLflow UI ready on http://127.0.0.1:\d+ after \d+ s.*\n  \(nothing recorded yet"
        ui.wait_for(ready, timeout=240)  # the links (here: no store yet) once it answers
        assert ui_server.answers(f"http://127.0.0.1:{port}")
        started = descendants(ui.proc.pid)
        assert len(started) <= 2, started  # `mlflow ui` and one uvicorn worker: no job runner
        ui.proc.send_signal(signal.SIGINT)
        assert ui.proc.wait(60) == 130
        wait_until(lambda: not living(started), 10, "the UI's processes to end")
    finally:
        ui.stop()
    assert "Address already in use" not in ui.output()
