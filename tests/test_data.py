"""Datasets become uint8 N x 3 x 32 x 32 tensors with the right labels and classes; batching,
normalisation and augmentation work on whole tensors."""

from __future__ import annotations

import io
import logging
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_exp.config import build
from cifar_exp.data import (
    CIFAR10_CLASSES,
    SAMPLE,
    BatchOrder,
    ImageData,
    augment,
    batches,
    normalise,
)
from cifar_exp.errors import UserError
from tests.conftest import compose_config


def load(dataset: str, **keys: object) -> ImageData:
    """conf/dataset/<dataset>.yaml with `keys` changed, built as a run builds it."""
    values = {k: str(v).lower() if isinstance(v, bool) else v for k, v in keys.items()}
    cfg = compose_config(f"dataset={dataset}", *(f"dataset.{k}={v}" for k, v in values.items()))
    return build(cfg.dataset, True, _convert_="all")


# ---------------------------------------------------------------- CIFAR-10 pickles
@pytest.mark.parametrize("download", [False, True], ids=["download=false", "download=true"])
def test_cifar10_reads_the_pickles(cifar_folder, skip_cifar_md5, download: bool) -> None:
    # download=true must use the files already there, not fetch (there is no network here).
    data = load("cifar10", root=cifar_folder.root, download=download)

    n_train, n_test = len(cifar_folder.train_labels), len(cifar_folder.test_labels)
    assert data.train_images.dtype == torch.uint8 and data.test_images.dtype == torch.uint8
    assert data.train_images.shape == (n_train, 3, 32, 32)
    assert data.test_images.shape == (n_test, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == cifar_folder.train_labels
    assert data.test_labels.tolist() == cifar_folder.test_labels
    assert data.classes == cifar_folder.classes
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
    assert data.source == "cifar10" and data.fallback is None  # the real thing, no stand-in


def test_cifar10_pixels_keep_channel_and_row_order(cifar_folder, skip_cifar_md5) -> None:
    """A row of the pickle is 1024 red, 1024 green, 1024 blue values, each 32 rows of 32."""
    data = load("cifar10", root=cifar_folder.root, download=False)

    expected_train = torch.from_numpy(cifar_folder.train_data).view(-1, 3, 32, 32)
    assert torch.equal(data.train_images, expected_train)
    assert torch.equal(data.test_images, torch.from_numpy(cifar_folder.test_data).view(-1, 3, 32, 32))
    # One pixel spelled out: image 7, green channel, row 2, column 5.
    row = cifar_folder.train_data[7]
    assert data.train_images[7, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]
    assert data.train_images[7, 2, 31, 0].item() == row[2048 + 31 * 32]


def test_cifar10_missing_files_with_fallback_off_name_path_and_remedies(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(UserError) as excinfo:
        load("cifar10", root=root, download=False, fallback=False)
    message = str(excinfo.value)
    assert str(root) in message
    assert "dataset.download=true" in message  # remedy 1: go online
    assert "cifar-10-python.tar.gz" in message  # remedy 2: put the archive there


# ---------------------------------------------------------------- the bundled sample, the fallback
def test_sample_is_balanced_real_cifar10() -> None:
    data = load("cifar10_sample")

    assert data.source == "cifar10_sample"
    assert data.classes == CIFAR10_CLASSES  # CIFAR-10's names in CIFAR-10's label order
    assert data.train_images.dtype == data.test_images.dtype == torch.uint8
    assert data.train_images.shape == (5000, 3, 32, 32) and data.test_images.shape == (1000, 3, 32, 32)
    assert data.train_labels.bincount(minlength=10).tolist() == [500] * 10
    assert data.test_labels.bincount(minlength=10).tolist() == [100] * 10
    # The pixels are the archive's JPEGs as PIL decodes them, file by file in name order.
    with tarfile.open(SAMPLE) as tar:
        names = sorted(m.name for m in tar if m.isfile())
        for split, images, labels in (
            ("train", data.train_images, data.train_labels),
            ("test", data.test_images, data.test_labels),
        ):
            mine = [n for n in names if n.startswith(f"{split}/")]
            for i in (0, 777, len(mine) - 1):
                with Image.open(io.BytesIO(tar.extractfile(mine[i]).read())) as image:
                    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
                assert torch.equal(images[i], pixels), mine[i]
                assert data.classes[labels[i]] == mine[i].split("/")[1]


def test_sample_is_small_and_its_splits_disjoint() -> None:
    files = [SAMPLE, SAMPLE.parent / "README.md"]
    assert sum(f.stat().st_size for f in files) <= 3_000_000
    with tarfile.open(SAMPLE) as tar:
        names = [m.name for m in tar if m.isfile()]
    split_of = {}  # class/file -> split; a file in both splits would be overwritten
    for name in names:
        split, cls, file = name.split("/")
        split_of[f"{cls}/{file}"] = split
    assert len(split_of) == len(names) == 6000


def test_cifar10_offline_falls_back_to_the_sample_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`make run` on a fresh offline clone: no data/, download=true, no network."""
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    root = tmp_path / "data"
    data = load("cifar10", root=root)

    assert data.name == "cifar10_sample" and len(data.train_images) == 5000
    assert data.fallback == f"CIFAR-10 not found under {root}"
    assert data.source == f"cifar10_sample (fallback: CIFAR-10 not found under {root})"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "\n" not in warning
    remedies = ("dataset.download=true", "cifar-10-python.tar.gz", "dataset.fallback=false")
    for text in (f"CIFAR-10 not found under {root}", "sample", *remedies):
        assert text in warning


# ---------------------------------------------------------------- image folders
def test_imagefolder_decodes_pngs_with_sorted_classes(png_folder) -> None:
    data = load("imagefolder", root=png_folder.root)

    assert data.classes == png_folder.classes == ["apple", "mango", "zebra"]
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        keys = sorted(k for k in png_folder.images if k.startswith(f"{split}/"))
        assert images.dtype == torch.uint8
        assert images.shape == (len(keys), 3, 32, 32)
        # Files are read class by class in sorted order; the label is the folder's index.
        expected_labels = [data.classes.index(k.split("/")[1]) for k in keys]
        assert labels.tolist() == expected_labels
        for i, key in enumerate(keys):
            if key != png_folder.odd_image:
                assert torch.equal(images[i], png_folder.images[key]), key


def test_imagefolder_resizes_other_sizes_to_32x32(png_folder) -> None:
    data = load("imagefolder", root=png_folder.root)

    keys = sorted(k for k in png_folder.images if k.startswith("train/"))
    odd = data.train_images[keys.index(png_folder.odd_image)]
    assert png_folder.images[png_folder.odd_image].shape[1:] != (32, 32)
    assert odd.shape == (3, 32, 32)
    # A solid colour stays that colour when resized.
    expected = png_folder.images[png_folder.odd_image][:, :1, :1].expand(3, 32, 32)
    assert torch.equal(odd, expected)


def test_imagefolder_undecodable_file_is_a_user_error(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot decode image .*broken.png"):
        load("imagefolder", root=tmp_path)


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_per_seed() -> None:
    a = load("synthetic", train_size=50, test_size=20, seed=3)
    b = load("synthetic", train_size=50, test_size=20, seed=3)
    c = load("synthetic", train_size=50, test_size=20, seed=4)

    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.train_images, c.train_images)
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape == (50, 3, 32, 32)
    assert a.test_images.shape == (20, 3, 32, 32)
    assert a.classes == [f"class_{i}" for i in range(10)]


def test_synthetic_is_balanced() -> None:
    data = load("synthetic", train_size=100, test_size=30, seed=0)
    assert data.train_labels.bincount(minlength=10).tolist() == [10] * 10
    assert data.test_labels.bincount(minlength=10).tolist() == [3] * 10
    assert not torch.equal(data.train_labels, torch.arange(100) % 10)  # shuffled, not cycled


def test_synthetic_needs_an_image_per_class() -> None:
    with pytest.raises(UserError, match="dataset.train_size=5"):
        load("synthetic", train_size=5, test_size=20)


# ---------------------------------------------------------------- tensors in, batches out
def test_normalise_maps_the_pixel_range_to_minus_one_one() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    x = normalise(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), torch.float32)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2, 2)
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)


def test_normalise_is_per_channel() -> None:
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    x = normalise(images, (0.0, 0.5, 1.0), (1.0, 0.5, 0.25), torch.float32)
    assert x[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0]


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel is their index, so image and label can be matched up."""
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    return images, torch.arange(n)


def test_shuffled_batches_cover_every_sample_once() -> None:
    images, labels = _indexed(103)
    gen = torch.Generator().manual_seed(0)
    seen: list[list[int]] = []
    for _ in range(2):  # two epochs
        got = list(batches(images, labels, 10, gen))
        assert [len(y) for _, y in got] == [10] * 10 + [3]
        order = torch.cat([y for _, y in got])
        for x, y in got:
            assert torch.equal(x[:, 0, 0, 0], y)  # image and label stay together
        assert sorted(order.tolist()) == list(range(103))
        assert order.tolist() != list(range(103))
        seen.append(order.tolist())
    assert seen[0] != seen[1]  # a new order each epoch


def test_batches_without_generator_keep_order() -> None:
    images, labels = _indexed(25)
    order = torch.cat([y for _, y in batches(images, labels, 10)])
    assert order.tolist() == list(range(25))


def test_a_resumed_epoch_replays_its_order_from_the_saved_state() -> None:
    images, labels = _indexed(53)
    order = BatchOrder(batch_size=10, drop_last=True)
    gen = torch.Generator().manual_seed(0)
    epoch_rng = gen.get_state()
    whole = [y.tolist() for _, y in order.epoch(images, labels, gen, epoch_rng)]
    assert len(whole) == order.steps(53) == 5  # drop_last: the last 3 are left out
    later = torch.Generator().manual_seed(1)  # the generator as a checkpoint mid-epoch left it
    state = later.get_state()
    resumed = [y.tolist() for _, y in order.epoch(images, labels, later, epoch_rng, skip=2)]
    assert resumed == whole[2:]
    assert torch.equal(later.get_state(), state)  # augmentation draws go on from where they were


def test_ddp_processes_split_every_global_batch() -> None:
    images, labels = _indexed(50)
    epoch_rng = torch.Generator().manual_seed(0).get_state()

    def labels_of(order: BatchOrder) -> list[list[int]]:
        return [y.tolist() for _, y in order.epoch(images, labels, torch.Generator(), epoch_rng)]

    whole = labels_of(BatchOrder(16))
    rank0, rank1 = (labels_of(BatchOrder(16, rank=rank, world=2)) for rank in range(2))
    assert [len(b) for b in rank0] == [len(b) for b in rank1] == [8, 8, 8, 1]  # 50 = 3 x 16 + 2
    for batch, mine, theirs in zip(whole, rank0, rank1, strict=True):
        assert not set(mine) & set(theirs)
        assert mine + theirs == batch


def test_augment_keeps_shape_and_content() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())
    gen = torch.Generator().manual_seed(0)

    flipped = augment(images, flip=True, translate=0, generator=gen)
    assert flipped.shape == images.shape and flipped.dtype == images.dtype
    is_same = [torch.equal(a, b) for a, b in zip(flipped, images, strict=True)]
    is_mirror = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images, strict=True)]
    assert all(s or m for s, m in zip(is_same, is_mirror, strict=True))
    assert any(is_mirror) and any(is_same)

    shifted = augment(images, flip=True, translate=4, generator=gen)
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    assert not torch.equal(shifted, images)

    assert torch.equal(augment(images, flip=False, translate=0, generator=gen), images)


def test_augment_translation_shifts_whole_images() -> None:
    # One bright pixel in the middle: a shift of up to 2 pixels moves it, it does not vanish.
    images = torch.zeros(8, 1, 9, 9)
    images[:, :, 4, 4] = 1
    shifted = augment(images, flip=False, translate=2, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape
    for image in shifted:
        (ys, xs) = torch.nonzero(image[0], as_tuple=True)
        assert len(ys) == 1 and abs(ys.item() - 4) <= 2 and abs(xs.item() - 4) <= 2


# ---------------------------------------------------------------- the validation split
def split_of(dataset: str, request: pytest.FixtureRequest, **keys: object) -> tuple[ImageData, ImageData]:
    """(the dataset as loaded, the dataset as a run gets it: its validation split held out)."""
    from omegaconf import OmegaConf

    from cifar_exp.run import load_data

    roots = {"cifar10": "cifar_folder", "imagefolder": "png_folder"}
    if dataset in roots:
        keys["root"] = request.getfixturevalue(roots[dataset]).root
    if dataset == "cifar10":
        request.getfixturevalue("skip_cifar_md5")
        keys["download"] = False
    values = {k: str(v).lower() if isinstance(v, bool) else v for k, v in keys.items()}
    cfg = compose_config(f"dataset={dataset}", *(f"dataset.{k}={v}" for k, v in values.items()))
    load_data.cache_clear()
    return build(cfg.dataset, True, _convert_="all"), load_data(OmegaConf.to_yaml(cfg.dataset), True)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar10_sample", "imagefolder", "synthetic"])
def test_every_dataset_holds_out_a_stratified_validation_split(
    request: pytest.FixtureRequest, dataset: str
) -> None:
    whole, data = split_of(dataset, request, val_size=0.25)
    n = len(whole.train_labels)
    assert len(data.val_labels) == round(0.25 * n) and len(data.train_labels) == n - round(0.25 * n)
    # stratified: each class gives its share of the held-out images
    per_class = torch.bincount(whole.train_labels, minlength=len(whole.classes))
    held = torch.bincount(data.val_labels, minlength=len(whole.classes))
    assert ((held - 0.25 * per_class).abs() <= 1).all(), (held, per_class)

    # every training image is in exactly one of the two splits, with its own label
    def pairs(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[bytes, int]]:
        return [(bytes(x.numpy()), int(y)) for x, y in zip(images, labels, strict=True)]

    split = pairs(data.train_images, data.train_labels) + pairs(data.val_images, data.val_labels)
    assert sorted(split) == sorted(pairs(whole.train_images, whole.train_labels))
    assert torch.equal(data.test_images, whole.test_images)  # the test split is untouched
    assert data.split["val_images"] == str(len(data.val_labels)) and data.split["split_seed"] == "0"
    assert len(data.split["val_index_sha256"]) == 16


def test_the_split_depends_on_split_seed_only(request: pytest.FixtureRequest) -> None:
    _, first = split_of("synthetic", request, train_size=1000, val_size=100)
    _, again = split_of("synthetic", request, train_size=1000, val_size=100)
    _, other = split_of("synthetic", request, train_size=1000, val_size=100, split_seed=1)
    assert len(first.val_labels) == 100
    assert torch.equal(first.val_images, again.val_images) and first.split == again.split
    assert first.split["val_index_sha256"] != other.split["val_index_sha256"]
    torch.manual_seed(123)  # the run's `seed` seeds torch's global generator: the split ignores it
    _, reseeded = split_of("synthetic", request, train_size=1000, val_size=100)
    assert reseeded.split == first.split


def test_no_validation_split_leaves_the_training_set_as_it_is(request: pytest.FixtureRequest) -> None:
    whole, data = split_of("synthetic", request, val_size=0)
    assert not data.has_val and data.split is None
    assert torch.equal(data.train_images, whole.train_images)  # the tutorial's data use, bit for bit


@pytest.mark.parametrize(
    ("val_size", "said"),
    [
        (5000, "holds out 5000 of the 5000 training images, leaving none to train on"),
        (2.5, "a fraction below 1 (0.1: a tenth of the training images) or a whole number of images"),
    ],
)
def test_a_validation_split_that_cannot_be_is_one_line(
    request: pytest.FixtureRequest, val_size: float, said: str
) -> None:
    with pytest.raises(UserError, match=f"^dataset.val_size={val_size:g}") as excinfo:
        split_of("synthetic", request, val_size=val_size)
    assert said in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_a_split_that_would_empty_a_class_names_it() -> None:
    from cifar_exp.holdout import hold_out

    labels = torch.tensor([0] * 9 + [1])  # class b has one image: it cannot give one and keep one
    data = ImageData(
        torch.zeros(10, 3, 32, 32, dtype=torch.uint8), labels, torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        torch.tensor([0, 1]), ["a", "b"], (0.5,) * 3, (0.5,) * 3, "synthetic",
    )  # fmt: skip
    with pytest.raises(UserError, match="holds out every training image of class b"):
        hold_out(data, 9, 0)  # class b's share: 0.9 of an image, rounded up
