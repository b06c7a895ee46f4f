"""Prints, for the newest sweep in an MLflow store, each child's seed, training seconds (the sum
of its per-epoch `time/epoch_s`, evaluation excluded) and final test accuracy, then the mean
over the children whose seed is not --warmup-seed.

usage: python benchmarks/summarise_sweep.py [--tracking-uri URI] [--warmup-seed 100]
"""

import argparse
import os
import statistics

from mlflow.tracking import MlflowClient

parser = argparse.ArgumentParser()
parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
parser.add_argument("--experiment", default="cifar_exp")
parser.add_argument("--warmup-seed", default="100")
args = parser.parse_args()
client = MlflowClient(args.tracking_uri)
experiment = client.get_experiment_by_name(args.experiment)
parent = client.search_runs(
    [experiment.experiment_id], "tags.sweep = 'true'", order_by=["attributes.start_time DESC"], max_results=1
)[0]
children = client.search_runs(
    [experiment.experiment_id],
    f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    order_by=["attributes.start_time ASC"],
)
print(f"sweep {parent.info.run_name} ({parent.info.status})")
kept = []
for child in children:
    seconds = sum(m.value for m in client.get_metric_history(child.info.run_id, "time/epoch_s"))
    acc = child.data.metrics.get("test/acc", float("nan"))
    seed = child.data.params.get("seed")
    note = "  (warm-up, not counted)" if seed == args.warmup_seed else ""
    print(
        f"  {child.info.run_name}: seed {seed}: {seconds:6.2f} s training, "
        f"test acc {acc:.4f}, {child.info.status}{note}"
    )
    if not note:
        kept.append((seconds, acc))
if kept:
    print(
        f"mean over {len(kept)} runs: {statistics.mean(s for s, _ in kept):.2f} s training, "
        f"test acc {statistics.mean(a for _, a in kept):.4f} "
        f"(min {min(a for _, a in kept):.4f}, max {max(a for _, a in kept):.4f})"
    )
