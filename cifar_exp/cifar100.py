"""CIFAR-100 (dataset=cifar100): torchvision's cifar-100-python under `root`, its 100 fine classes,
decoded once into the cache like CIFAR-10. A dataset is this module and conf/dataset/cifar100.yaml:
its schema comes from load_cifar100's signature (cifar_exp/config.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cifar_exp import decoded_cache
from cifar_exp.data import ImageData, read_torchvision
from cifar_exp.errors import UserError

FILES = ["train", "test", "meta"]  # in root/cifar-100-python/


def load_cifar100(
    *,
    root: str,
    mean: Sequence[float],
    std: Sequence[float],
    cache: bool,
    cache_dir: str | None,
    download: bool = True,  # fetch cifar-100-python.tar.gz (161 MB) when its files are not in root
) -> ImageData:
    """torchvision's CIFAR100 under `root`: 50,000 training and 10,000 test images, 100 classes."""
    source = decoded_cache.Source("cifar100", Path(root) / "cifar-100-python", FILES, "torchvision pickles")

    def not_found(reason: str) -> UserError:
        return UserError(
            f"dataset.root={root}: CIFAR-100 not found under {os.path.abspath(root)} ({reason}); "
            "go online (dataset.download=true) or put cifar-100-python.tar.gz there"
        )

    folder = decoded_cache.cache_folder(cache, cache_dir)
    tensors, info = decoded_cache.load(
        source, lambda: read_torchvision("CIFAR100", root, download, not_found), folder
    )
    return ImageData(**tensors, classes=info["classes"], mean=tuple(mean), std=tuple(std), name="cifar100")
