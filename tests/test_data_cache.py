"""Decoded datasets are cached: a second load reads the cache and gives the same tensors; any change
to the files decodes again; a damaged cache file is decoded again with a warning, never read as
data; a cache location that cannot be written costs one warning, not the run; concurrent writers
leave one whole file. The cache folder is the test's own (conftest sets CIFAR_EXP_CACHE_DIR)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_exp import data as data_module
from cifar_exp import decoded_cache, image_files
from cifar_exp.data import ImageData
from tests.test_data import load

SPLITS = ("train_images", "train_labels", "test_images", "test_labels")


@pytest.fixture
def images(png_folder, tmp_path: Path) -> Path:
    """A copy of the PNG folder that a test may change."""
    return Path(shutil.copytree(png_folder.root, tmp_path / "images"))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the images decoded from files, in order (not read from the cache)."""
    decoded: list[str] = []
    decode = image_files.decode_image

    def counting(file, name):
        decoded.append(str(name))
        return decode(file, name)

    monkeypatch.setattr(image_files, "decode_image", counting)
    return decoded


def assert_same(a: ImageData, b: ImageData) -> None:
    for name in SPLITS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.classes == b.classes and a.name == b.name


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- hits and misses
def test_second_load_reads_the_cache(images: Path, decodes: list[str], decoded_cache_dir: Path) -> None:
    first = load("imagefolder", root=images)
    n = len(first.train_images) + len(first.test_images)
    assert len(decodes) == n
    (cached,) = cache_files(decoded_cache_dir)  # in the test's folder, from $CIFAR_EXP_CACHE_DIR
    assert cached.name.startswith("imagefolder-")

    second = load("imagefolder", root=images)
    assert len(decodes) == n  # nothing decoded
    assert_same(first, second)


def _add(images: Path) -> None:
    shutil.copy(images / "train/apple/000.png", images / "train/apple/new.png")


def _remove(images: Path) -> None:
    (images / "test/zebra/001.png").unlink()


def _touch(images: Path) -> None:
    stat = (images / "train/mango/003.png").stat()
    os.utime(images / "train/mango/003.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def _rewrite(images: Path) -> None:  # new pixels, same name; a new mtime as any writer leaves
    path = images / "train/mango/003.png"
    stat = path.stat()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize("change", [_add, _remove, _touch, _rewrite], ids=lambda f: f.__name__[1:])
def test_a_changed_file_decodes_again(images: Path, decodes: list[str], change) -> None:
    load("imagefolder", root=images)
    decodes.clear()
    change(images)

    after = load("imagefolder", root=images)
    assert decodes  # decoded again, not read from the cache
    fresh = load("imagefolder", root=images, cache=False)
    assert_same(after, fresh)
    if change is _rewrite:
        mango = after.classes.index("mango")
        assert (
            after.train_images[after.train_labels == mango][3] == torch.tensor([1, 2, 3]).view(3, 1, 1)
        ).all()


def test_cifar10_pickles_are_cached(cifar_folder, skip_cifar_md5, tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    root = Path(shutil.copytree(cifar_folder.root, tmp_path / "cifar"))
    reads: list[bool] = []  # one entry per split read through torchvision
    cifar10 = torchvision.datasets.CIFAR10
    monkeypatch.setattr(
        torchvision.datasets, "CIFAR10", lambda *a, **k: reads.append(True) or cifar10(*a, **k)
    )

    first = load("cifar10", root=root, download=False)
    assert len(reads) == 2
    assert_same(first, load("cifar10", root=root, download=False))
    assert len(reads) == 2  # read from the cache

    test_batch = root / "cifar-10-batches-py" / "test_batch"
    os.utime(test_batch, ns=(0, test_batch.stat().st_mtime_ns + 1_000_000))
    assert_same(first, load("cifar10", root=root, download=False))
    assert len(reads) == 4  # a changed pickle is read again


def test_cache_off_and_cache_dir(images: Path, tmp_path: Path, decoded_cache_dir: Path) -> None:
    load("imagefolder", root=images, cache=False)
    assert not cache_files(decoded_cache_dir)

    elsewhere = tmp_path / "elsewhere"
    load("imagefolder", root=images, cache_dir=elsewhere)
    assert len(cache_files(elsewhere)) == 1 and not cache_files(decoded_cache_dir)


def test_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CIFAR_EXP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decoded_cache.cache_folder(True, None) == tmp_path / "xdg" / "cifar_exp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert decoded_cache.cache_folder(True, None) == tmp_path / "home" / ".cache" / "cifar_exp"
    assert decoded_cache.cache_folder(True, "~/x") == tmp_path / "home" / "x"
    assert decoded_cache.cache_folder(False, "~/x") is None


# ---------------------------------------------------------------- damage
def _flip_a_pixel(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the images
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 100)


def _header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x01  # inside the JSON header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage", [_flip_a_pixel, _truncate, _garbage, _header], ids=lambda f: f.__name__[1:]
)
def test_a_damaged_cache_file_is_decoded_again_with_a_warning(
    images: Path, decoded_cache_dir: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    first = load("imagefolder", root=images)
    (cached,) = cache_files(decoded_cache_dir)
    damage(cached)

    second = load("imagefolder", root=images)
    assert_same(first, second)
    (warning,) = warnings_in(caplog)
    assert str(cached) in warning and "damaged" in warning

    caplog.clear()
    assert_same(first, load("imagefolder", root=images))  # rewritten whole: a clean hit
    assert not warnings_in(caplog)


# ---------------------------------------------------------------- a cache that cannot be written
def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: fail as a read-only folder would
        monkeypatch.setattr(tempfile, "mkstemp", _raise(errno.EACCES))


def _full(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _raise(errno.ENOSPC))


def _not_a_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder.write_text("a file where the cache folder should be")


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("problem", [_read_only, _full, _not_a_folder], ids=lambda f: f.__name__[1:])
def test_an_unwritable_cache_costs_one_warning(
    images: Path, decoded_cache_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch, problem
) -> None:
    problem(decoded_cache_dir, monkeypatch)
    try:
        data = load("imagefolder", root=images)
    finally:
        if decoded_cache_dir.is_dir():
            decoded_cache_dir.chmod(0o755)
    assert_same(data, load("imagefolder", root=images, cache=False))
    (warning,) = warnings_in(caplog)
    assert str(decoded_cache_dir) in warning and "dataset.cache" in warning
    if decoded_cache_dir.is_dir():
        assert not cache_files(decoded_cache_dir)  # no temporary file left behind


# ---------------------------------------------------------------- concurrent writers
def test_concurrent_writers_leave_one_whole_file(
    images: Path, decoded_cache_dir: Path, decodes: list[str], caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """Two loads decode at once and both rename their file into place at the same moment."""
    both_written = threading.Barrier(2, timeout=30)
    replace = os.replace

    def replace_together(source, target):
        both_written.wait()  # both temporary files are complete before either is renamed
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_together)
    results: list[ImageData] = []
    keys = {"root": str(images), "mean": [0.5] * 3, "std": [0.5] * 3, "cache": True, "cache_dir": None}
    threads = [
        threading.Thread(target=lambda: results.append(data_module.load_imagefolder(**keys)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2
    assert_same(*results)

    (cached,) = cache_files(decoded_cache_dir)  # one file, no temporary ones
    decodes.clear()
    assert_same(results[0], load("imagefolder", root=images))
    assert not decodes and not warnings_in(caplog)  # a whole file, read as a hit
