"""Datasets as in-memory uint8 tensors, and the batching, normalisation and augmentation that
work on whole tensors: no per-sample PIL transform, no worker processes."""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar_exp import decoded_cache, image_files
from cifar_exp.errors import UserError, first_line
from cifar_exp.image_files import IMAGE_SIZE

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
SAMPLE = Path(__file__).resolve().parent / "sample" / "cifar10_sample.tar.xz"  # {train,test}/<class>/*.jpg


@dataclass
class ImageData:
    """A whole dataset in memory: images are uint8 N x 3 x 32 x 32, labels int64 N."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # which data this really is: cifar10, cifar10_sample, imagefolder or synthetic
    fallback: str | None = None  # why `name` stands in for the dataset asked for (None: it is that one)
    # held out of the training images by hold_out(): empty (0 images) when there is no validation split
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    split: dict[str, str] | None = None  # how the validation split was drawn (recorded on the run)

    @property
    def has_val(self) -> bool:
        return self.val_labels is not None and len(self.val_labels) > 0

    @property
    def source(self) -> str:
        """One line for reports and records, e.g. "cifar10" or "cifar10_sample (fallback: CIFAR-10
        not found under /abs/data)"."""
        return f"{self.name} (fallback: {self.fallback})" if self.fallback else self.name


# ---------------------------------------------------------------- loaders (config `_target_`s)
# Their arguments are the keys of conf/dataset/* (their schemas are generated from these signatures).
def load_cifar10(
    *,
    root: str,
    download: bool,
    fallback: bool,
    mean: Sequence[float],
    std: Sequence[float],
    cache: bool,
    cache_dir: str | None,
) -> ImageData:
    """torchvision's CIFAR10 under `root`; its `.data` is already an N x 32 x 32 x 3 uint8 array.
    Neither there nor downloadable: with `fallback`, the bundled sample after one warning line."""
    pickles = Path(root) / "cifar-10-batches-py"
    source = decoded_cache.Source("cifar10", pickles, CIFAR10_FILES, "torchvision pickles")
    try:
        tensors, info = decoded_cache.load(
            source,
            lambda: read_torchvision("CIFAR10", root, download, lambda why: Cifar10NotFound(root, why)),
            decoded_cache.cache_folder(cache, cache_dir),
        )
    except Cifar10NotFound as e:
        if not fallback:
            raise
        log.warning(
            f"CIFAR-10 not found under {e.where} ({e.reason}): training on the CIFAR-10 sample bundled "
            f"with cifar_exp (5,000 of the 50,000 training images). For the full set go online "
            f"(dataset.download=true) or put cifar-10-python.tar.gz in {e.where}; "
            f"dataset.fallback=false makes this an error"
        )
        data = load_cifar10_sample(root=root, mean=mean, std=std, cache=cache, cache_dir=cache_dir)
        data.fallback = f"CIFAR-10 not found under {e.where}"
        return data
    return ImageData(**tensors, classes=info["classes"], mean=tuple(mean), std=tuple(std), name="cifar10")


class Cifar10NotFound(UserError):
    """CIFAR-10's files are neither under `root` nor downloadable."""

    def __init__(self, root: str, reason: str) -> None:
        self.root, self.where, self.reason = root, os.path.abspath(root), reason
        super().__init__(
            f"dataset.root={root}: CIFAR-10 not found under {self.where} ({reason}). Either go online "
            f"(dataset.download=true fetches it) or put cifar-10-python.tar.gz in {self.where}; or use "
            f"the bundled sample (dataset=cifar10_sample, or dataset.fallback=true when CIFAR-10 is "
            f"missing) or dataset=imagefolder dataset.root=DIR"
        )

    def __reduce__(self) -> tuple:  # pickled by parallel launchers: rebuilt from its two parts
        return type(self), (self.root, self.reason)


def read_torchvision(
    dataset: str, root: str, download: bool, not_found: Callable[[str], Exception]
) -> decoded_cache.Decoded:
    """torchvision.datasets.`dataset` (CIFAR10, CIFAR100; imported only to decode): its two splits
    under `root` as uint8 N x 3 x 32 x 32 tensors and int64 labels (its `.data` is N x 32 x 32 x 3);
    `not_found(reason)` is raised when a split cannot be read (offline download, bad archive, no
    files and download=false)."""
    from torchvision import datasets

    splits = []
    for train in (True, False):
        try:
            splits.append(getattr(datasets, dataset)(root, train=train, download=download))
        except Exception as e:
            raise not_found(first_line(e)) from None
    tensors = {}
    for name, split in zip(("train", "test"), splits, strict=True):
        tensors[f"{name}_images"] = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
        tensors[f"{name}_labels"] = torch.tensor(split.targets, dtype=torch.int64)
    return tensors, {"classes": list(splits[0].classes)}


def load_cifar10_sample(
    *, root: str, mean: Sequence[float], std: Sequence[float], cache: bool, cache_dir: str | None
) -> ImageData:
    """Real CIFAR-10 bundled with the package (cifar_exp/sample/README.md): 5,000 training and
    1,000 test images, balanced over the 10 classes. `root` is unused (every dataset config has one)."""
    if not SAMPLE.is_file():
        raise UserError(f"the CIFAR-10 sample is missing from this installation: no {SAMPLE}")
    source = decoded_cache.Source(
        "cifar10_sample", SAMPLE.parent, [SAMPLE.name], _decode_rule(CIFAR10_CLASSES)
    )
    tensors, info = decoded_cache.load(source, _read_sample, decoded_cache.cache_folder(cache, cache_dir))
    return ImageData(
        **tensors, classes=info["classes"], mean=tuple(mean), std=tuple(std), name="cifar10_sample"
    )


def _read_sample() -> decoded_cache.Decoded:
    import tarfile

    files: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(SAMPLE) as tar:
        for member in tar:
            if member.isfile():  # {train,test}/<class>/<file>
                files[member.name.split("/")[0]].append((member.name, tar.extractfile(member).read()))
    tensors = {}
    for split, named in files.items():
        named.sort()
        labels = [CIFAR10_CLASSES.index(name.split("/")[1]) for name, _ in named]
        tensors[f"{split}_images"] = image_files.decode_all(
            [io.BytesIO(data) for _, data in named], [n for n, _ in named]
        )
        tensors[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return tensors, {"classes": CIFAR10_CLASSES}


def _decode_rule(classes: list[str]) -> str:
    """How files become tensors and labels, for the cache key."""
    return f"{image_files.decode_rule()}; {classes}"


def load_imagefolder(
    *, root: str, mean: Sequence[float], std: Sequence[float], cache: bool, cache_dir: str | None
) -> ImageData:
    """root/train/<class>/** and root/test/<class>/**, classes in sorted folder order, decoded once.
    What a folder may hold, and what is skipped: cifar_exp/image_files.py."""
    base = Path(root)
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise UserError(
                f"dataset.root={root}: no folder {os.path.abspath(base / split)}; imagefolder needs "
                f"{root}/train/<class>/ and {root}/test/<class>/"
            )
    splits = image_files.list_splits(base)  # links checked across both splits
    listed = image_files.listed_classes(root, splits)
    classes = sorted(listed["train"])

    def decode() -> decoded_cache.Decoded:
        tensors = {}
        for split, per_class in listed.items():
            files = [file for name in classes for file in per_class[name]]
            paths = [f"{base}/{file}" for file in files]
            tensors[f"{split}_images"] = image_files.decode_all(paths, paths)
            labels = [label for label, name in enumerate(classes) for _ in per_class[name]]
            tensors[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
        return tensors, {"classes": classes}

    # Only the images listed are in the key: a README added or removed does not decode again.
    every_file = [file for split in listed.values() for name in classes for file in split[name]]
    source = decoded_cache.Source("imagefolder", base, every_file, _decode_rule(classes))
    tensors, _ = decoded_cache.load(source, decode, decoded_cache.cache_folder(cache, cache_dir))
    return ImageData(**tensors, classes=classes, mean=tuple(mean), std=tuple(std), name="imagefolder")


def load_synthetic(
    *,
    train_size: int,
    test_size: int,
    noise: float,
    seed: int,
    root: str,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int = 10,
) -> ImageData:
    """Learnable generated data: each class is a smooth random colour pattern; every image is its
    class's pattern, randomly brightened, plus per-pixel Gaussian noise. `root` is unused (every
    dataset config has one)."""
    for key, value in (("train_size", train_size), ("test_size", test_size)):
        if value < num_classes:
            raise UserError(f"dataset.{key}={value}: need at least one image per class ({num_classes})")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=gen)
    patterns = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        scale = 0.75 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
        pixels = patterns[labels] * scale + noise * torch.randn(n, 3, 32, 32, generator=gen)
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_images, train_labels = make(train_size)
    test_images, test_labels = make(test_size)
    classes = [f"class_{i}" for i in range(num_classes)]
    return ImageData(
        train_images, train_labels, test_images, test_labels, classes, tuple(mean), tuple(std), "synthetic"
    )


# ---------------------------------------------------------------- tensors in, batches out
def normalise(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype
) -> torch.Tensor:
    """uint8 N x 3 x H x W -> (pixel / 255 - mean) / std, in `dtype`, on the images' device, in
    the images' memory format. One float32 buffer, computed in place: 50,000 images are 600 MB as
    float32, and each temporary of that size cost ~0.3 s on 2 cores."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    x = images.to(torch.float32)  # keeps the memory format
    return x.div_(255).sub_(mean_t).div_(std_t).to(dtype)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    mask = torch.rand(len(images), generator=generator, device=generator.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


def alternating_flip(images: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flip for epoch `epoch` (1-based) of a training set that random_flip
    mirrored once before training: odd epochs see that set, even epochs all of it mirrored, so
    every image is seen both ways round every two epochs (random flips repeat some orientations)."""
    return images if epoch % 2 else images.flip(-1)


def augment(images: torch.Tensor, flip: bool, translate: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random shifts of up to `translate` pixels (reflect-padded),
    on a whole batch at once."""
    n = len(images)
    if flip:
        images = random_flip(images, generator)
    if translate:
        t = translate
        padded = F.pad(images, (t, t, t, t), mode="reflect")
        h, w = images.shape[-2:]
        dev = generator.device
        dy, dx = torch.randint(0, 2 * t + 1, (2, n, 1), generator=generator, device=dev)
        rows = (dy + torch.arange(h, device=dev)).to(images.device)  # n x h
        cols = (dx + torch.arange(w, device=dev)).to(images.device)  # n x w
        index = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[index, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    return images


def shuffle(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random permutation of the whole set, drawn from `generator` (so it can be replayed)."""
    order = torch.randperm(len(images), generator=generator, device=generator.device).to(images.device)
    return images[order], labels[order]


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    skip: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slices of (images, labels); shuffled first when a generator is given; with drop_last, a
    final batch smaller than batch_size is skipped; the first `skip` batches are left out."""
    if generator is not None:
        images, labels = shuffle(images, labels, generator)
    end = len(images) - len(images) % batch_size if drop_last and len(images) >= batch_size else len(images)
    for start in range(skip * batch_size, end, batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


@dataclass(frozen=True)
class BatchOrder:
    """How training cuts an epoch into batches: `batch_size` is the global batch (over all DDP
    processes); with drop_last a final smaller batch is left out; under DDP, process `rank` of
    `world` trains on its 1/world slice of every global batch."""

    batch_size: int
    drop_last: bool = False
    rank: int = 0
    world: int = 1

    def steps(self, n: int) -> int:
        """Batches in an epoch of `n` samples."""
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def epoch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        epoch_rng: torch.Tensor,
        skip: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of one epoch. The order is shuffled from `generator` set to
        `epoch_rng` (its state before this epoch's shuffle), so a resumed epoch replays the order
        it started with; the first `skip` global batches (those already trained on) are left out.
        The shuffle happens on the call, not at the first batch."""
        current = generator.get_state()
        generator.set_state(epoch_rng)
        images, labels = shuffle(images, labels, generator)
        if skip:  # resuming mid-epoch: later draws (augmentation) continue from where they stopped
            generator.set_state(current)
        global_batches = batches(images, labels, self.batch_size, None, self.drop_last, skip)
        return self._shards(global_batches) if self.world > 1 else global_batches

    def _shards(
        self, global_batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in global_batches:
            share = len(x) // self.world
            mine = slice(self.rank * share, (self.rank + 1) * share)
            yield x[mine], y[mine]
