"""Training throughput of cifar_exp against the PyTorch tutorial's own pipeline, on the same
images, in one run (absolute times on a shared machine are noisy; the ratios are the result).

  1. batch 4 (the tutorial's hyperparameters): the tutorial pipeline (ImageFolder with
     ToTensor/Normalize per image, DataLoader with 2 workers) vs cifar_exp's loop over in-memory
     tensors. Targets: >= 2x (issue 2), >= 2.5x (issue 4).
  2. batch 256: cifar_exp's images/s as a fraction of this machine's FP32 peak, the peak measured
     here by a large matrix product (target >= 50%), with and without channels_last.

usage: python benchmarks/pipeline.py [--root /tmp/cifar10-jpeg] [--images 8000]
       (root: an image folder with train/<class>/*)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Subset

from cifar_exp.config import DeviceConfig, TrainerConfig, build, register_schemas
from cifar_exp.devices import select_device
from cifar_exp.train import Loop, prepare

CONF = str(Path(__file__).resolve().parent.parent / "conf")

# Tutorial CNN, FLOPs per image: forward = 2 * multiply-adds of conv1, conv2, fc1-3; training
# (forward + backward) is about 3x forward.
FORWARD_FLOP = 2 * (28 * 28 * 6 * 75 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10)
TRAIN_FLOP = 3 * FORWARD_FLOP


def configured(*overrides: str):
    """The default config (the tutorial's) with `overrides`, as `python -m cifar_exp` composes it."""
    register_schemas()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", list(overrides))


def tutorial_cnn() -> torch.nn.Module:
    return build(configured().model, True, num_classes=10)


def tutorial_pipeline(root: str, indices: list[int], seconds: float) -> float:
    """The tutorial's training loop, verbatim in spirit: images/s over up to `seconds`."""
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = Subset(torchvision.datasets.ImageFolder(f"{root}/train", transform=transform), indices)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    net = tutorial_cnn()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    images, started = 0, None
    for i, (inputs, labels) in enumerate(loader):
        if i == 50:  # after worker start-up
            images, started = 0, time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(net(inputs), labels)
        loss.backward()
        optimizer.step()
        images += len(inputs)
        if started and time.perf_counter() - started > seconds:
            break
    return images / (time.perf_counter() - started)


def cifar_exp_loop(data, batch_size: int, epochs: int = 1, channels_last: bool = False) -> float:
    """cifar_exp's own train_epoch (what `python -m cifar_exp` runs): images/s of the last epoch."""
    device = select_device(DeviceConfig(name="cpu"), batch_size)
    tensors = prepare(data, device, channels_last)
    torch.manual_seed(0)
    net = tutorial_cnn()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    cfg = TrainerConfig(
        batch_size=batch_size,
        epochs=epochs,
        log_every_n_steps=10**9,
        channels_last=channels_last,
        checkpoint=False,
    )
    loop = Loop(
        net, optimizer, tensors, data.classes, cfg, torch.Generator().manual_seed(0), lambda m, s: None
    )
    metrics, _ = loop.fit()  # the last epoch's figures (the first warms up)
    return metrics["throughput/images_per_s"]


def fp32_peak() -> float:
    """FLOP/s of a 2048^3 float32 matrix product on all threads (best of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/cifar10-jpeg")
    parser.add_argument("--images", type=int, default=8000, help="training images used by each side")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    full = build(
        configured("dataset=imagefolder", f"dataset.root={args.root}").dataset, True, _convert_="all"
    )
    indices = torch.randperm(len(full.train_images), generator=torch.Generator().manual_seed(0))
    indices = indices[: args.images].tolist()
    data = type(full)(
        full.train_images[indices],
        full.train_labels[indices],
        full.test_images[:100],
        full.test_labels[:100],
        full.classes,
        full.mean,
        full.std,
        full.name,
    )

    print(f"{args.images} training images from {args.root}, torch {torch.__version__}, {threads} threads")
    tutorial = tutorial_pipeline(args.root, indices, seconds=15)
    ours4 = cifar_exp_loop(data, batch_size=4)
    print(f"batch 4   tutorial pipeline: {tutorial:8,.0f} images/s")
    print(f"batch 4   cifar_exp:         {ours4:8,.0f} images/s   ratio {ours4 / tutorial:.2f}x")

    torch.set_num_threads(threads)
    peak = fp32_peak()
    print(
        f"FP32 peak (2048^3 sgemm, {threads} threads): {peak / 1e9:.1f} GFLOP/s; "
        f"training costs {TRAIN_FLOP / 1e6:.2f} MFLOP per image"
    )
    for channels_last in (False, True):
        rate = cifar_exp_loop(data, batch_size=256, epochs=2, channels_last=channels_last)
        print(
            f"batch 256 cifar_exp{' channels_last' if channels_last else '':14s}: {rate:8,.0f} images/s "
            f"= {rate * TRAIN_FLOP / 1e9:.1f} GFLOP/s = {rate * TRAIN_FLOP / peak:.0%} of peak"
        )


if __name__ == "__main__":
    main()
