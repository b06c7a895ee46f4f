"""kill_resume.py --search-kills N: SIGKILL a search's controller (its whole process group, as a
closed terminal or an OOM killer would) at random moments, run the same command again after each
kill until the search completes, and count what MLflow and the Optuna study hold then:

  trials in the study against the parent's children, children per trial number (duplicates),
  trials without a child, children left RUNNING (orphans), children whose status disagrees with
  their trial's state, metric points recorded twice in a child, the parent's status, whether the
  console's "best trial N", the parent's best_trial and the study's best trial agree, and Python
  tracebacks in any output (killed attempts included).

Each kill lands at a moment drawn from PHASES: any moment (imports, a trial, the summary), as a
trial's run has just opened (before its first checkpoint), or just after a trial's first epoch
(checkpointed: resumed). Each search is a study of its own (a few tiny trials on generated data,
pruned by the median pruner), killed up to PER_SEARCH times, then left to complete; searches
follow until N kills landed. Target: 0 duplicated, 0 missing, 0 orphans, 0 disagreeing, parent
FINISHED, best agreed, 0 tracebacks."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SEARCH = [
    "experiment=search",
    "dataset=synthetic",
    "dataset.train_size=3300",
    "dataset.val_size=100",  # the search chooses on val/acc
    "dataset.test_size=100",
    "trainer.batch_size=16",  # 200 steps an epoch: a trial takes seconds, so kills land inside them
    "trainer.epochs=2",
    "trainer.log_every_n_steps=20",
    "device=cpu",
    "hydra.sweeper.n_trials=5",
    "hydra.sweeper.reports_per_epoch=2",
    "hydra.sweeper.sampler.name=random",
    "hydra.sweeper.pruner.name=median",  # half the trials learn nothing (lr 1e-7): pruned
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=2",
    "optimizer.lr=choice(0.05, 0.0000001)",
]
PER_SEARCH = 3  # kills of one search before it is left to complete
KILL_WITHIN_S = (1.0, 12.0)  # a kill's moment after the command starts: imports, trials, the end
# (a whole search takes ~20 s on 2 busy cores; a re-run, with fewer trials left, less)
BEST = re.compile(r"best trial (\d+): ")
# when a kill lands: any moment (imports, a trial, the summary); a trial's run just opened (its
# first epoch under way, no checkpoint); a trial's first epoch just ended (checkpointed)
PHASES = ("any-moment", "before-checkpoint", "after-checkpoint")
OPENED = re.compile(r"^MLflow run [0-9a-f]{32} ", re.M)
EPOCH_1 = re.compile(r"^epoch 1/", re.M)


def attempt(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The command in a process group of its own (its workers, if any, die with it)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cifar_exp", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_at(proc: subprocess.Popen, log: Path, phase: str, rng: random.Random) -> None:
    """SIGKILLs the command's process group at a moment of `phase` (PHASES), unless it ends first."""
    deadline = time.monotonic() + rng.uniform(*KILL_WITHIN_S)
    pattern = {"before-checkpoint": OPENED, "after-checkpoint": EPOCH_1}.get(phase)
    nth = rng.randint(1, 3)  # the first, second or third trial this command runs
    while proc.poll() is None:
        if pattern is None and time.monotonic() > deadline:
            break
        if pattern is not None and len(pattern.findall(log.read_text())) >= nth:
            time.sleep(rng.uniform(0.0, 0.05) if phase == "after-checkpoint" else 0.0)
            break
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def one_search(
    work: Path, env: dict[str, str], rng: random.Random, n: int, kills: int
) -> tuple[int, str, Counter]:
    """Search number `n`, killed up to `kills` times then run to its end; returns the kills that
    landed, the outputs of every attempt, and the counts (count())."""
    folder = work / f"search{n:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    args = [
        *SEARCH,
        f"hydra.sweeper.study_name=killsearch-{n}",
        f"hydra.sweep.dir={folder / 'multirun'}",
        "-m",
    ]
    landed, outputs, code, phases = 0, [], None, Counter()
    for tries in range(kills + 1):
        log = folder / f"attempt{tries}.log"
        proc = attempt(args, folder, env, log)
        phase = rng.choice(PHASES) if tries < kills else None
        if phase:
            kill_at(proc, log, phase, rng)
        code = proc.wait(600)
        outputs.append(log.read_text())
        if code == -signal.SIGKILL:
            landed += 1
            phases[phase] += 1
            continue
        break  # it completed (or failed: counted below) before a kill landed
    counts = count(env["MLFLOW_TRACKING_URI"], f"killsearch-{n}", outputs[-1])
    counts["completed"] = code == 0
    counts.update({f"killed {phase}": k for phase, k in phases.items()})
    counts["tracebacks"] = sum(o.count("Traceback (most recent call last)") for o in outputs)
    return landed, "".join(outputs), counts


def count(uri: str, name: str, final_output: str) -> Counter:
    """What the store and the study hold once the search completed."""
    import optuna
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from cifar_exp.search.study import open_storage

    client = MlflowClient(uri)
    found = client.get_experiment_by_name("cifar_exp")
    experiment = found.experiment_id if found else None
    parents = client.search_runs([experiment], f"tags.`search/study` = '{name}'") if found else []
    counts: Counter = Counter(parents=len(parents))
    if not parents:  # the command failed before it wrote anything: its output says why
        return counts
    parent = parents[0]
    tags = parent.data.tags
    study = optuna.load_study(study_name=name, storage=open_storage(tags["search/storage"]))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    per_trial = Counter(c.data.tags.get("search/trial", "?") for c in children)
    counts.update(trials=len(trials), children=len(children), untagged=per_trial.pop("?", 0))
    counts["duplicated"] = sum(k - 1 for k in per_trial.values())
    counts["missing"] = sum(str(number) not in per_trial for number in trials)
    counts["orphans"] = sum(c.info.status == "RUNNING" for c in children)
    for child in children:
        trial = trials.get(int(child.data.tags.get("search/trial", -1)))
        expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}.get(
            trial.state.name if trial else ""
        )
        counts["disagreeing"] += child.info.status != expected
        for key in child.data.metrics:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            counts["points duplicated"] += len(steps) - len(set(steps))
    where = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    counts["replaced"] = len(client.search_runs([experiment], where, run_view_type=ViewType.DELETED_ONLY))
    counts["resumed"] = sum("resumed_with_overrides" in c.data.tags for c in children)  # from a checkpoint
    counts["parent FINISHED"] = parent.info.status == "FINISHED"
    best = study.best_trial.number if any(t.state.name == "COMPLETE" for t in trials.values()) else None
    said = {int(m) for m in BEST.findall(final_output)}  # the console's line and the summary's
    counts["best agreed"] = said == {best} and tags.get("best_trial") == str(best)
    return counts


def search_kills(work: Path, env: dict[str, str], rng: random.Random, kills: int) -> tuple[list[str], bool]:
    """Searches killed until `kills` kills landed, each said as it ends; the summary line, and
    whether a target was missed."""
    total, landed, n = Counter(), 0, 0
    while landed < kills and n < kills * 3:  # a search that completes before its kill lands is one more
        n += 1
        hit, output, counts = one_search(work, env, rng, n, min(PER_SEARCH, kills - landed))
        landed += hit
        total.update(counts)
        total["searches"] += 1
        shown = ", ".join(f"{k} {int(v)}" for k, v in counts.items())
        print(f"search {n}: {hit} kill(s) landed; {shown}", flush=True)
        if counts["tracebacks"]:
            tail = output[output.index("Traceback (most recent call last)") :].splitlines()[:12]
            print("".join(f"  {line}\n" for line in tail), end="", flush=True)
    phases = ", ".join(f"{p} {total[f'killed {p}']}" for p in PHASES)
    keys = ("duplicated", "missing", "untagged", "orphans", "disagreeing", "points duplicated", "tracebacks")
    line = (
        f"search controller killed: {landed} kills landed ({phases}) in {total['searches']} searches; "
        f"completed {total['completed']}, parent FINISHED {total['parent FINISHED']}, "
        f"best agreed {total['best agreed']}; trials {total['trials']}, children {total['children']} "
        f"(replaced {total['replaced']}, resumed {total['resumed']}); "
        + ", ".join(f"{k} {total[k]}" for k in keys)
    )
    searches = total["searches"]
    failed = any(total[k] for k in keys) or total["trials"] != total["children"]
    failed = failed or not searches or total["completed"] != searches or total["best agreed"] != searches
    return [line], failed or total["parent FINISHED"] != searches
