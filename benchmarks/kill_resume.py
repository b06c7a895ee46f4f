"""Fault injection: SIGKILL training at random moments, resume it, and count what the store kept.

Each trial trains a tiny synthetic run on the CPU into a temporary SQLite store and SIGKILLs it at
a seeded random moment of one of four phases, found by watching the run's output and folder:

  step        mid-step: a random time into training, once the run has a checkpoint
  checkpoint  while checkpoint.pt is being written (its temporary file is there)
  flush       as an epoch's metrics are reported (the flush that precedes its checkpoint)
  end         while the run ends (after the report: the figures and weights, tags, its status)

A kill that lands after the store recorded the run's end (a resumed run with little left may end
before a 'step' kill) is counted as 'after-end'.

then `cifar-exp resume RUN_ID`, itself killed the same way up to --per-run times, and a last resume
left alone. Kills land only once the run has a checkpoint: before that there is nothing to resume
(`resume` says so in one line) and the same command trains it again, into a new run.

Every run is compared, point by point, with an uninterrupted reference run of the same config
(resume is bit-identical on CPU). Printed: kills landed per phase, runs recovered (FINISHED, every
resume accepted), metric points lost (in the reference, not in the run) and duplicated (a key and
step recorded twice), values that differ from the reference, and store corruptions (SQLite's
PRAGMA integrity_check after every kill, runs left RUNNING, checkpoints that do not load).
Target: all recovered, 0 lost, 0 duplicated, 0 corrupt.

Then two faults of their own: --early runs SIGKILLed before their first checkpoint (while the data
loads or in epoch 1), each followed by `cifar-exp runs`, which must end it KILLED with a reason
(an orphan: one left RUNNING); and --concurrent killed runs, each resumed by two `cifar-exp resume
RUN_ID` started together, of which exactly one may train (the other refuses in one line) and
nothing may be recorded twice.

And two of a search and a server (modules beside this one): --search-kills N kills of a
search's controller at random moments, each followed by the same command until the search
completes, then one child per trial, none RUNNING, the parent FINISHED, one best trial named by
the console, the parent and the study (kill_search.py); --server-kill, a real `mlflow server`
killed mid-run and started again after it, then `cifar-exp sync`: points lost and duplicated, and
the seconds the dead server added to the run (kill_server.py). `--kills 0 --early 0 --concurrent 0`
runs them alone.

usage: python benchmarks/kill_resume.py [--kills 24] [--per-run 3] [--early 4] [--concurrent 2]
                                        [--search-kills 0] [--server-kill] [--seed 0] [--keep DIR]
       (about 10 minutes on 2 busy cores: each kill costs a process start, ~5-10 s)
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3
TRAIN = [
    "dataset=synthetic",
    "dataset.train_size=1600",
    "dataset.test_size=200",
    "trainer.batch_size=16",  # 100 steps an epoch
    f"trainer.epochs={EPOCHS}",
    "trainer.log_every_n_steps=10",
    "device=cpu",
]
PHASES = ("step", "checkpoint", "flush", "end")
TIMED = ("time/", "throughput/")  # metrics whose values are timings: only their steps are compared
RUN_ID = re.compile(r"MLflow run ([0-9a-f]{32})")


class Attempt:
    """One `cifar-exp` process: its output lines as they come (read by a thread), its folder."""

    def __init__(self, args: list[str], folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.lines: list[str] = []
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cifar_exp", *args, f"hydra.run.dir={folder}"],
            cwd=folder.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def seen(self, pattern: str) -> int:
        return sum(bool(re.search(pattern, line)) for line in list(self.lines))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> str:
        self.proc.wait(timeout)
        self.reader.join(timeout)
        return "".join(self.lines)

    def temp_checkpoints(self) -> list[Path]:
        return list(self.folder.glob(".checkpoint.pt.*"))


def kill_at(attempt: Attempt, phase: str, rng: random.Random, resumed: bool) -> str | None:
    """Waits for a moment of `phase` in `attempt` and SIGKILLs it. Returns what was hit ('mid-write'
    for a checkpoint whose temporary file was still there), or None when the process ended first."""
    started = "resumed from" if resumed else None  # a resumed run has its checkpoint already
    checkpoint = attempt.folder / "checkpoint.pt"
    if phase == "step":
        while attempt.alive() and not (attempt.seen(started) if started else checkpoint.exists()):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
    elif phase == "checkpoint":
        skip = rng.randint(0, 1) + (not resumed)  # its first or second write (a new run's second or third)
        while attempt.alive():
            if attempt.temp_checkpoints():
                if skip == 0:
                    break
                skip -= 1
                while attempt.alive() and attempt.temp_checkpoints():
                    time.sleep(0.0005)
            time.sleep(0.0005)
    elif phase == "flush":
        first = 1 if resumed else 2  # the first epoch's flush precedes the run's first checkpoint
        target = rng.randint(first, first + 1)
        while attempt.alive() and attempt.seen(r"^epoch \d+/\d+:") < target:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.02))
    else:  # end
        while attempt.alive() and not attempt.seen("^Accuracy of the network"):
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.06))  # the figures, the weights and the run's end: ~60 ms
    if not attempt.alive():
        return None
    attempt.proc.send_signal(signal.SIGKILL)
    mid_write = bool(attempt.temp_checkpoints())
    attempt.wait()
    if attempt.proc.returncode != -signal.SIGKILL:
        return None
    return "mid-write" if phase == "checkpoint" and mid_write else phase


@dataclass
class Tally:
    kills: Counter = field(default_factory=Counter)
    runs: int = 0
    recovered: int = 0
    lost: int = 0
    duplicated: int = 0
    differ: int = 0
    corrupt: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    early: Counter = field(default_factory=Counter)  # tried, opened, closed (KILLED by `runs`), orphans
    concurrent: Counter = field(default_factory=Counter)  # tried, one trained, the other refused
    expected_killed: set[str] = field(default_factory=set)


def early_kill(work: Path, env: dict[str, str], rng: random.Random, client, tally: Tally, n: int) -> None:
    """A run SIGKILLed before its first checkpoint (one step per image: epoch 1 takes seconds),
    then `cifar-exp runs`: a run the store had opened must be KILLED with a reason, none RUNNING."""
    attempt = Attempt([*TRAIN, "trainer.batch_size=1"], work / f"early{n:02d}", env)
    if rng.random() < 0.5:  # while it imports and loads its data, its run perhaps not yet open
        time.sleep(rng.uniform(1.0, 6.0))
    else:  # in epoch 1, its run open
        while attempt.alive() and not attempt.seen(RUN_ID.pattern):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.0))
    landed = attempt.alive() and not (attempt.folder / "checkpoint.pt").exists()
    attempt.proc.send_signal(signal.SIGKILL)
    found = RUN_ID.search(attempt.wait())
    if found:  # KILLED is its right end, landed or not
        tally.expected_killed.add(found[1])
    if not landed:
        return
    tally.early["tried"] += 1
    listed = subprocess.run(
        [sys.executable, "-m", "cifar_exp", "runs"], env=env, capture_output=True, text=True
    )
    experiment = client.get_experiment_by_name("cifar_exp")
    tally.early["orphans"] += len(
        client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    )
    if found is None:  # killed before the store opened the run: nothing to close
        print(f"early {n:2d}: killed before its run was opened")
        return
    run = client.get_run(found[1])
    tally.early["opened"] += 1
    tally.early["closed"] += run.info.status == "KILLED" and found[1] in listed.stderr
    print(f"early {n:2d} {found[1][:8]}: killed before its first checkpoint; {run.info.status} after `runs`")


def concurrent_resumes(
    work: Path, env: dict[str, str], rng: random.Random, client, tally: Tally, expected: dict, n: int
) -> None:
    """A run SIGKILLed as epoch 2 or 3 reports (checkpointed, not ended), then two resumes started
    together: one trains, one refuses."""
    for again in range(3):  # until a kill lands before the run's end
        attempt = Attempt(TRAIN, work / f"concurrent{n:02d}-{again}", env)
        hit = kill_at(attempt, "flush", rng, resumed=False)  # "step" often lands after a fast run ended
        found = RUN_ID.search("".join(attempt.lines))
        if hit and found and client.get_run(run_id := found[1]).info.status != "FINISHED":
            break
    else:
        return
    both = [Attempt(["resume", run_id], attempt.folder / f"resume{i}", env) for i in range(2)]
    outputs = [a.wait() for a in both]
    codes = sorted(a.proc.returncode for a in both)
    tally.concurrent["tried"] += 1
    tally.concurrent["one trained"] += codes[0] == 0 and codes[1] != 0
    tally.concurrent["other refused"] += any("is being continued by process" in o for o in outputs)
    tally.runs += 1
    tally.recovered += client.get_run(run_id).info.status == "FINISHED"
    counts = compare(expected, history(client, run_id), tally)
    print(f"concurrent {n:2d} {run_id[:8]}: exits {codes}; {counts}", flush=True)
    if codes[0] != 0 or codes[1] == 0:
        print("".join(f"  {o.strip().splitlines()[-1]}\n" for o in outputs if o.strip()), end="")


def integrity(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        return ",".join(row[0] for row in connection.execute("PRAGMA integrity_check"))


def history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}


def compare(reference: dict, got: dict, tally: Tally) -> str:
    """Adds the run's lost, duplicated and differing points to `tally`; returns them in words."""
    lost = duplicated = differ = 0
    for key, points in reference.items():
        steps = [s for s, _ in got.get(key, [])]
        lost += len({s for s, _ in points} - set(steps))
        duplicated += len(steps) - len(set(steps))
        if not key.startswith(TIMED):
            values = dict(got.get(key, []))
            differ += sum(1 for s, v in points if s in values and values[s] != v)
    tally.lost += lost
    tally.duplicated += duplicated
    tally.differ += differ
    return f"lost {lost}, duplicated {duplicated}, differing {differ}"


def fault_modes(
    args: argparse.Namespace, work: Path, env: dict[str, str], rng: random.Random
) -> tuple[list[str], bool]:
    """--search-kills and --server-kill (kill_search.py, kill_server.py): their lines, and whether
    a target was missed."""
    from kill_search import search_kills
    from kill_server import server_kill

    lines, missed = [], False
    if args.search_kills:
        said, failed = search_kills(work, env, rng, args.search_kills)
        lines, missed = lines + said, missed or failed
    if args.server_kill:
        said, failed = server_kill(work, env, TRAIN, lambda expected, got: compare(expected, got, Tally()))
        lines, missed = lines + said, missed or failed
    return lines, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs that land, in all")
    parser.add_argument("--per-run", type=int, default=3, help="most kills of one run before it may finish")
    parser.add_argument("--early", type=int, default=4, help="runs killed before their first checkpoint")
    parser.add_argument("--concurrent", type=int, default=2, help="killed runs resumed twice at once")
    parser.add_argument("--search-kills", type=int, default=0, help="kills of a search's controller")
    parser.add_argument("--server-kill", action="store_true", help="kill a real mlflow server mid-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    database = work / "store" / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CIFAR_EXP_", "HYDRA_"))}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{database}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    expected: dict = {}
    if args.kills or args.concurrent:  # what they are compared with
        reference = Attempt(TRAIN, work / "reference", env)
        output = reference.wait()
        assert reference.proc.returncode == 0, output
        expected = history(client, RUN_ID.search(output)[1])
        print(f"reference run: {sum(map(len, expected.values()))} metric points, {EPOCHS} epochs", flush=True)

    tally = Tally()
    while sum(tally.kills.values()) < args.kills:
        tally.runs += 1
        trial, run_id, resumed, said = work / f"run{tally.runs:02d}", None, False, []
        for attempt_no in range(args.per_run + 1):
            last = attempt_no == args.per_run or sum(tally.kills.values()) >= args.kills
            command = ["resume", run_id] if resumed else TRAIN
            attempt = Attempt(command, trial / f"attempt{attempt_no}", env)
            phase = None if last else rng.choice(PHASES)
            hit = kill_at(attempt, phase, rng, resumed) if phase else None
            output = attempt.wait()
            run_id = run_id or (RUN_ID.search(output) or [None, None])[1]
            if hit and client.get_run(run_id).info.status == "FINISHED":
                hit = "after-end"  # whatever was aimed at, the store had recorded the run's end
            if hit:
                tally.kills[hit] += 1
                said.append(hit)
                if (check := integrity(database)) != "ok":
                    tally.corrupt.append(f"run {run_id}: integrity_check {check}")
                resumed = True
                continue
            # ran to its end (the last resume, or a kill that did not land), or was refused:
            # "already FINISHED" when the kill came after the run's end was recorded
            if attempt.proc.returncode == 0:
                said.append("finished")
            elif "already FINISHED" in output:
                said.append("already finished")
            else:
                said.append("refused")
                tally.refused.append(f"run {run_id}: {' / '.join(output.strip().splitlines()[-3:])}")
            break
        run = client.get_run(run_id)
        ok = run.info.status == "FINISHED" and not any(r.startswith(f"run {run_id}") for r in tally.refused)
        tally.recovered += ok
        counts = compare(expected, history(client, run_id), tally)
        story = " -> ".join(said)
        print(f"run {tally.runs:2d} {run_id[:8]}: {story}; {run.info.status}; {counts}", flush=True)
        for stale in trial.rglob(".checkpoint.pt.*"):  # a kill mid-write leaves its temporary file
            stale.unlink()

    for n in range(1, args.early + 1):
        early_kill(work, env, rng, client, tally, n)
    for n in range(1, args.concurrent + 1):
        concurrent_resumes(work, env, rng, client, tally, expected, n)
    said, missed = fault_modes(args, work, env, rng)
    experiment = client.get_experiment_by_name("cifar_exp")
    for run in client.search_runs([experiment.experiment_id] if experiment else [], max_results=1000):
        searched = "mlflow.parentRunId" in run.data.tags or "sweep" in run.data.tags  # kill_search's
        if run.info.status != "FINISHED" and run.info.run_id not in tally.expected_killed and not searched:
            tally.corrupt.append(f"run {run.info.run_id} left {run.info.status}")
    if (check := integrity(database)) != "ok":
        tally.corrupt.append(f"integrity_check at the end: {check}")
    minutes = (time.monotonic() - started) / 60
    landed = sum(tally.kills.values())
    phases = ", ".join(f"{k} {v}" for k, v in sorted(tally.kills.items()))
    print(f"\nkills landed: {landed} ({phases}; mid-write: the temporary checkpoint file was there)")
    print(f"runs recovered: {tally.recovered}/{tally.runs}")
    print(f"metric points lost: {tally.lost}, duplicated: {tally.duplicated}, differing: {tally.differ}")
    print(
        "killed before the first checkpoint: "
        + ", ".join(f"{k} {tally.early[k]}" for k in ("tried", "opened", "closed", "orphans"))
    )
    print(
        "resumed twice at once: "
        + ", ".join(f"{k} {tally.concurrent[k]}" for k in ("tried", "one trained", "other refused"))
    )
    print(f"store corruptions: {len(tally.corrupt)}" + "".join(f"\n  {c}" for c in tally.corrupt))
    print("".join(f"{line}\n" for line in said), end="")
    for refusal in tally.refused:
        print(f"  resume refused: {refusal}")
    print(f"({minutes:.1f} minutes; store and logs in {work})" if args.keep else f"({minutes:.1f} minutes)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = tally.recovered < tally.runs or tally.lost or tally.duplicated or tally.corrupt
    failed = failed or tally.early["orphans"] or tally.early["opened"] != tally.early["closed"]
    failed = failed or tally.concurrent["tried"] != tally.concurrent["one trained"]
    failed = failed or missed
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
