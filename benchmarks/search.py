"""Does pruning pay? The same search on real CIFAR-10 images (train/ and test/ class folders:
40,000 train, of which dataset.val_size's tenth is held out for validation, and 10,000 test):
`experiment=search_fast` (tutorial_fast's recipe; TPE over lr (log scale), momentum, weight decay
(log scale) and both conv widths), each trial reporting val/acc `--reports` times an epoch, with
and without pruning, for each of `--seeds` sampler seeds, each search in a fresh process and a
fresh MLflow store, sharing the decode cache (filled before the first search starts). Prints each
search's best val/acc (what chooses), that trial's test/acc (reported, never chosen on), trials
finished and pruned, epochs trained (a trial pruned within an epoch counts the part it trained)
and wall time; then, per pruner, the means over the seeds and the ratios to the unpruned
searches (the baseline, measured in the same invocation).
Target (issue 18): the pruned searches' mean best val/acc >= the unpruned mean - 1 point, with
<= 40% of their epochs. --pruners adds other pruners (e.g. hyperband,successive_halving,none).
The defaults shrink search_fast (16 trials x 5 epochs) to 8 trials x 4 epochs, so that 3 seeds
with and without pruning take about 13 minutes on 2 cores.

usage: python benchmarks/search.py [--root /tmp/cifar10-jpeg] [--seeds 0,1,2] [--trials 8]
       [--epochs 4] [--reports 4] [--pruners ...] [OVERRIDE ...]   (overrides: for every search)
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

from machine import cpu_name  # benchmarks/machine.py: a script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent


def search(
    root: str, pruner: str, args: argparse.Namespace, seed: int, cache: str, folder: Path
) -> dict[str, float]:
    """One search in a fresh process and store; what its MLflow parent run recorded, and wall time."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "CIFAR_EXP_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
    args = [
        "experiment=search_fast",
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"trainer.epochs={args.epochs}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.reports_per_epoch={args.reports}",
        f"hydra.sweeper.sampler.seed={seed}",
        f"hydra.sweeper.pruner.name={pruner}",
        f"hydra.sweep.dir={folder / 'out'}",
        *args.overrides,
        "-m",
    ]
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "cifar_exp", *args], cwd=folder, env=env, capture_output=True, text=True
    )
    wall = time.time() - started
    (folder / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"search ({pruner}) failed ({result.returncode}):\n{result.stderr[-3000:]}")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cifar_exp")
    [parent] = client.search_runs([experiment.experiment_id], "tags.sweep = 'true'")
    metrics = parent.data.metrics
    return {
        "best": metrics["best/val/acc"],
        "test": metrics["best/test/acc"],
        "finished": metrics["search/trials_finished"],
        "pruned": metrics["search/trials_pruned"],
        "epochs": metrics["search/epochs_trained"],
        "unpruned": metrics["search/epochs_unpruned"],
        "wall": wall,
    }


def warm_cache(root: str, cache: str) -> None:
    """Decodes the images into the cache first, so that no search pays for it."""
    load = f"load_imagefolder(root={root!r}, mean=[0.5] * 3, std=[0.5] * 3, cache=True, cache_dir={cache!r})"
    code = f"from cifar_exp.data import load_imagefolder; {load}"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/cifar10-jpeg", help="train/ and test/ image folders")
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds: one search per seed and pruner")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--reports", type=int, default=4, help="val/acc reports per epoch")
    parser.add_argument(
        "--pruners",
        default="successive_halving,none",
        help="searches to run, in order; `none` is the baseline (search_fast prunes by successive_halving)",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every search")
    args = parser.parse_args()
    pruners, seeds = args.pruners.split(","), [int(s) for s in args.seeds.split(",")]
    if "none" not in pruners:
        parser.error("--pruners must include none: the unpruned baseline")
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs; {args.trials} trials x {args.epochs} epochs, "
        f"{args.reports} reports an epoch; sampler seeds {args.seeds}; data {args.root}; "
        f"overrides: {' '.join(args.overrides) or 'none'}"
    )
    results: dict[str, list[dict[str, float]]] = {p: [] for p in pruners}
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        warm_cache(args.root, cache)
        for seed in seeds:
            for pruner in pruners:
                folder = Path(tmp) / f"{pruner}-{seed}"
                folder.mkdir()
                r = search(args.root, pruner, args, seed, cache, folder)
                results[pruner].append(r)
                print(
                    f"seed {seed} {pruner:>18}: best val/acc {r['best']:.4f} (its test/acc {r['test']:.4f}), "
                    f"{r['finished']:.0f} finished, {r['pruned']:.0f} pruned, "
                    f"{r['epochs']:.4g} of {r['unpruned']:.0f} epochs, {r['wall']:.0f} s",
                    flush=True,
                )
    mean = {p: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]} for p, rs in results.items()}
    for pruner in pruners:
        m = mean[pruner]
        print(
            f"mean over {len(seeds)} seeds, {pruner:>18}: best val/acc {m['best']:.4f}, its test/acc "
            f"{m['test']:.4f}, {m['epochs']:.4g} epochs, {m['wall']:.0f} s"
        )
    full = mean["none"]
    for pruner in (p for p in pruners if p != "none"):
        pruned = mean[pruner]
        points = 100 * (pruned["best"] - full["best"])
        share = pruned["epochs"] / full["epochs"]
        met = "met" if points >= -1 and share <= 0.4 else "NOT met"
        print(
            f"{pruner} vs none (means): best val/acc {points:+.2f} points (target >= -1), test/acc "
            f"{100 * (pruned['test'] - full['test']):+.2f} points, epochs {share:.0%} (target <= 40%), "
            f"wall {pruned['wall'] / full['wall']:.2f}x: target {met}"
        )


if __name__ == "__main__":
    main()
