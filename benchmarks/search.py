"""Does pruning pay? The same search on real CIFAR-10 (40,000 train / 10,000 held out, from
../shared/data/unpack.sh): `experiment=search_fast` (tutorial_fast's recipe, 5 epochs a trial, 16
trials, TPE with sampler seed 0 over lr (log scale), momentum, weight decay (log scale) and both
conv widths), first with Hyperband pruning, then with pruning off, each in a fresh process and a
fresh MLflow store, sharing the decode cache (filled before the first search starts). Prints
each search's best test/acc, trials finished and pruned, epochs trained and wall time, and the
pruned search's ratios to the unpruned one (the baseline, measured in the same invocation).
Target (issue 11): pruned best >= unpruned best - 1 point, with <= 40% of the epochs. --pruners
adds other pruners to compare (e.g. hyperband,successive_halving,none).

usage: python benchmarks/search.py [--root /tmp/cifar10-jpeg] [--trials 16] [--epochs 5] [--pruners ...]
       [OVERRIDE ...]    (e.g. trainer.lr_schedule=constant, for every search)
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


def search(
    root: str, pruner: str, trials: int, epochs: int, cache: str, folder: Path, extra: list[str]
) -> dict[str, float]:
    """One search in a fresh process and store; what its MLflow parent run recorded, and wall time."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "CIFAR_EXP_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
    args = [
        "experiment=search_fast",
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"trainer.epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.pruner.name={pruner}",
        f"hydra.sweep.dir={folder / 'out'}",
        *extra,
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
        "best": metrics["best/test/acc"],
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
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--pruners", default="hyperband,none", help="searches to run, in order; `none` is the baseline"
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every search")
    args = parser.parse_args()
    pruners = args.pruners.split(",")
    if "none" not in pruners:
        parser.error("--pruners must include none: the unpruned baseline")
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs; {args.trials} trials x {args.epochs} epochs; "
        f"data {args.root}; overrides: {' '.join(args.overrides) or 'none'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        warm_cache(args.root, cache)
        results = {}
        for pruner in pruners:
            folder = Path(tmp) / pruner
            folder.mkdir()
            results[pruner] = r = search(
                args.root, pruner, args.trials, args.epochs, cache, folder, args.overrides
            )
            print(
                f"{pruner:>9}: best test/acc {r['best']:.4f}, {r['finished']:.0f} finished, "
                f"{r['pruned']:.0f} "
                f"pruned, {r['epochs']:.0f} of {r['unpruned']:.0f} epochs, {r['wall']:.0f} s",
                flush=True,
            )
    full = results["none"]
    for pruner in (p for p in pruners if p != "none"):
        pruned = results[pruner]
        points = 100 * (pruned["best"] - full["best"])
        share = pruned["epochs"] / full["epochs"]
        met = "met" if points >= -1 and share <= 0.4 else "NOT met"
        print(
            f"{pruner} vs none: best {points:+.2f} points (target >= -1), "
            f"epochs {share:.0%} (target <= 40%), "
            f"wall {pruned['wall'] / full['wall']:.2f}x: target {met}"
        )


if __name__ == "__main__":
    main()
