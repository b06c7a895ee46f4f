""" "Which widths are best?" answered soundly, timed: `experiment=width_seeds -m` (tutorial_fast,
conv1_out x conv2_out = 4 configs, seeds 0,1,2: 12 runs, chosen on the validation split, a 95% CI
per config) on real CIFAR-10 images, from the command to the printed answer. Baseline, in the same
invocation: the same 12 runs with dataset.val_size=0 (every epoch evaluated on the test split, as
before the validation split existed), so the ratio is what choosing soundly costs in wall time.
The decode cache is warmed first, so neither sweep pays for decoding JPEGs.

usage: python benchmarks/width_seeds.py [--root /tmp/cifar10-jpeg] [--skip-baseline] [OVERRIDE ...]
       (the folder holds train/<class>/ and test/<class>/ images)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

REPO = Path(__file__).resolve().parent.parent


def sweep(overrides: list[str], store: str, cwd: str) -> tuple[float, str]:
    """Runs `cifar-exp experiment=width_seeds -m` with `overrides`; (wall seconds, its stdout)."""
    command = [sys.executable, "-m", "cifar_exp", "experiment=width_seeds", *overrides]
    command += [f"mlflow.tracking_uri=sqlite:///{store}", "-m"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"sweep failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    return wall, result.stdout


def answer(stdout: str) -> str:
    """What the sweep printed when it ended: its summary, from the parent's name on."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("sweep "))
    return "\n".join(lines[start:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/cifar10-jpeg")
    parser.add_argument("--skip-baseline", action="store_true", help="time the sound sweep only")
    args, overrides = parser.parse_known_args()
    if not Path(args.root, "train").is_dir():
        sys.exit(f"no {args.root}/train: lay out CIFAR-10 images as train/<class>/ and test/<class>/")
    data = ["dataset=imagefolder", f"dataset.root={Path(args.root).resolve()}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        warm = [sys.executable, "-m", "cifar_exp", *data, "trainer.epochs=0.01", "mlflow.enabled=false"]
        subprocess.run(warm, cwd=tmp, capture_output=True, check=True)  # decodes once into the cache
        wall, stdout = sweep(data, f"{tmp}/sound.db", tmp)
        print(f"CPU: {cpu_name()}")
        print(f"\nexperiment=width_seeds -m (12 runs, chosen on val/acc): {wall:.1f} s wall, printed:\n")
        print(answer(stdout))
        if not args.skip_baseline:
            base, base_out = sweep([*data, "dataset.val_size=0"], f"{tmp}/test.db", tmp)
            print(f"\nbaseline, dataset.val_size=0 (chosen on the test split): {base:.1f} s wall")
            print(f"ratio: {wall / base:.2f}x the baseline's wall time\n")
            print(answer(base_out))


if __name__ == "__main__":
    main()
