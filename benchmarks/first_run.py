"""A run as a user lives it: `experiment=tutorial_fast` on an image folder, twice, as separate
processes with the same MLflow store and the same decode cache (both fresh at the start), timed
from outside. For each run: wall time over training time (the sum of every epoch's
`time/epoch_s`, as recorded; evaluation counts as overhead), and where the rest goes: process start to the
first training step, and the last epoch's end to the process's exit. Targets (issue 9), second
run: start to first step <= 4 s, wall / training <= 1.5x.

With --baseline REPO (a checkout of an earlier commit, e.g. `git worktree add /tmp/base fe455f4`)
the same two runs of that checkout go first, in the same invocation, as the baseline.

usage: python benchmarks/first_run.py [--root /tmp/cifar10-jpeg] [--baseline /tmp/base]
       (root: CIFAR-10 images as train/<class>/ and test/<class>/)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: a script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent


def timed_run(repo: Path, root: str, store: str, cache: str, cwd: Path) -> dict[str, float]:
    """One run in a fresh process; its wall time and, from the store, its training and epochs."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "CIFAR_EXP_CACHE_DIR": cache, "PYTHONPATH": str(repo)}
    args = ["experiment=tutorial_fast", "dataset=imagefolder", f"dataset.root={root}"]
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "cifar_exp", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    ended = time.time()
    if result.returncode:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cifar_exp")
    [run] = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    epochs = client.get_metric_history(run.info.run_id, "time/epoch_s")
    evals = client.get_metric_history(run.info.run_id, "time/eval_s")
    training = sum(m.value for m in epochs)  # the optimisation steps only: evaluation is overhead here
    first = min(epochs, key=lambda m: m.step)
    first_step = first.timestamp / 1000 - first.value - min(evals, key=lambda m: m.step).value
    last = max(m.timestamp for m in epochs) / 1000
    return {
        "wall": ended - started,
        "training": training,
        "eval": sum(m.value for m in evals),
        "to_first_step": first_step - started,
        "after_last_epoch": ended - last,
        "acc": run.data.metrics["test/acc"],
    }


def measure(repo: Path, root: str, label: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store, cache = f"sqlite:///{tmp}/mlflow.db", f"{tmp}/cache"
        for n in (1, 2):
            r = timed_run(repo, root, store, cache, Path(tmp))
            print(
                f"{label} run {n}: wall {r['wall']:5.1f} s, training {r['training']:5.1f} s, "
                f"wall/training {r['wall'] / r['training']:.2f}x; evaluation {r['eval']:.1f} s, "
                f"start -> first step "
                f"{r['to_first_step']:4.1f} s, last epoch -> exit {r['after_last_epoch']:4.1f} s; "
                f"test/acc {r['acc']:.3f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/cifar10-jpeg")
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier checkout, run first")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; data: {args.root}")
    if args.baseline:
        measure(args.baseline, args.root, "baseline")
    measure(REPO, args.root, "cifar_exp")


if __name__ == "__main__":
    main()
