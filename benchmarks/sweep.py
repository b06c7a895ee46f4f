"""Per-job overhead of an in-process sweep (Hydra's basic launcher), tracking on: everything a job
costs beyond training and evaluation — MLflow run start, params, figures, weights, checkpoints,
Hydra's job set-up — measured from the recorded runs of one real sweep. The dataset is loaded and
prepared by the first job only; later jobs should pay no data cost (target: < 1 s per job).

Per job k (after the first): overhead = (start of job k+1 - start of job k) - time/epoch_s - time/eval_s,
the last job measured to its end time. Ratio printed against the job's own training time.

usage: python benchmarks/sweep.py [--root /tmp/cifar10-jpeg] [--jobs 4]
       (without the folder, generated data of the same size)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/cifar10-jpeg")
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()
    if Path(args.root, "train").is_dir():
        data = ["dataset=imagefolder", f"dataset.root={args.root}"]
    else:
        data = ["dataset=synthetic", "dataset.train_size=40000", "dataset.test_size=10000"]
    seeds = ",".join(str(i) for i in range(args.jobs))
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cifar_exp",
                "experiment=tutorial_fast",
                *data,
                "trainer.epochs=1",
                f"seed={seeds}",
                "-m",
            ],
            cwd=tmp,
            env=env,
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - started
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("cifar_exp")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        runs = [r for r in runs if r.data.tags.get("sweep") != "true"]  # the children
        rows = []
        for i, run in enumerate(runs):
            end = runs[i + 1].info.start_time if i + 1 < len(runs) else run.info.end_time
            span = (end - run.info.start_time) / 1000
            train = sum(m.value for m in client.get_metric_history(run.info.run_id, "time/epoch_s"))
            evaluate = sum(m.value for m in client.get_metric_history(run.info.run_id, "time/eval_s"))
            rows.append((span - train - evaluate, train, evaluate))
    print(f"{args.jobs} jobs of tutorial_fast (1 epoch each), {' '.join(data)}; sweep wall {wall:.1f} s")
    for i, (overhead, train, evaluate) in enumerate(rows):
        print(
            f"  job {i}: training {train:5.2f} s, evaluation {evaluate:4.2f} s, overhead {overhead:4.2f} s "
            f"({overhead / train:.0%} of training)"
            + ("  [its data loading came before its run started]" if i == 0 else "")
        )
    later = [o for o, _, _ in rows[1:]]
    if later:
        print(
            f"median overhead of jobs after the first: {statistics.median(later):.2f} s per job "
            f"(target < 1 s: {'met' if statistics.median(later) < 1 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
