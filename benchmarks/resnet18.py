"""CPU training throughput of model=resnet18 (ResNet-18 adapted to 32x32) at batch 128, against
the tutorial's CNN (model=cnn) at batch 128 measured in the same run: the ratio is the result
(absolute images/s on a shared machine are noisy).

Each network is built from its config as a run builds it (config.build), then trains on random
normalised 32x32 images with SGD and cross-entropy: forward, backward, step, as the training loop
does. Warm-up steps first, then the median of `--repeats` timings of `--steps` steps.

usage: python benchmarks/resnet18.py [--steps 5] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import compose_config  # noqa: E402 - the harness's compose, as a run composes
from machine import cpu_name  # noqa: E402

from cifar_exp.config import build  # noqa: E402

BATCH = 128


def images_per_second(option: str, steps: int, repeats: int) -> float:
    cfg = compose_config(f"model={option}")
    net = build(cfg.model, cfg.trust, num_classes=10).train()
    optimizer = build(cfg.optimizer, cfg.trust)(net.parameters())
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, oneDNN kernels
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append(time.perf_counter() - start)
    return steps * BATCH / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--steps", type=int, default=5, help="steps per timing (ResNet-18: ~1 s each on 2 cores)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cnn = images_per_second("cnn", args.steps * 20, args.repeats)  # the CNN's steps are ~100x cheaper
    resnet = images_per_second("resnet18", args.steps, args.repeats)
    print(f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, batch {BATCH}")
    print(f"model=cnn (baseline)  {cnn:9.1f} images/s")
    print(
        f"model=resnet18        {resnet:9.1f} images/s  "
        f"({resnet / cnn:.4f}x the baseline: 1/{cnn / resnet:.0f})"
    )


if __name__ == "__main__":
    main()
