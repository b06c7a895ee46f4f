"""Shared fixtures: a temporary MLflow store for every test, the CLI in a subprocess, Hydra's
compose API, and generated datasets in the formats users bring (CIFAR-10 pickles, PNG folders)."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR_PER_BATCH = 20  # images per data_batch_N and in test_batch (the real files hold 10000)


def pytest_configure(config: pytest.Config) -> None:
    # On a shared 2-core machine torch's default of one OpenMP thread per core spins against the
    # other processes and a CNN step takes ~70x longer; one thread keeps in-process tests steady.
    torch.set_num_threads(1)


# ---------------------------------------------------------------- MLflow store and the CLI
@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test (and every subprocess it starts) tracks into tmp_path, never the repo's mlruns/."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return uri


@pytest.fixture(autouse=True, scope="session")
def session_decoded_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded datasets are never cached in the user's ~/.cache/cifar_exp, not even by fixtures
    wider than one test (each test then gets its own folder, below)."""
    folder = tmp_path_factory.mktemp("decoded-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFAR_EXP_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def decoded_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every subprocess it starts) caches decoded datasets in its own tmp_path."""
    folder = tmp_path / "decoded-cache"
    monkeypatch.setenv("CIFAR_EXP_CACHE_DIR", str(folder))
    return folder


def run_cli(
    *overrides: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`python -m cifar_exp OVERRIDES...` in `cwd` (Hydra writes outputs/ and multirun/ there).
    The environment is this process's (so the test's MLFLOW_TRACKING_URI) updated with `env`."""
    inherited = {  # without sweep state, with the test's cache folder
        k: v for k, v in os.environ.items() if not k.startswith("CIFAR_EXP_") or k == "CIFAR_EXP_CACHE_DIR"
    }
    full_env = {
        **inherited,
        "OMP_NUM_THREADS": "1",  # see pytest_configure
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "cifar_exp", *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(name="run_cli", scope="session")
def run_cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


# ---------------------------------------------------------------- Hydra's compose API
def compose_config(*overrides: str, hydra_config: bool = False):
    """The config `python -m cifar_exp OVERRIDES...` would run, composed in-process."""
    from hydra import compose, initialize_config_dir

    from cifar_exp.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture(name="compose_config", scope="session")
def compose_config_fixture() -> Callable:
    return compose_config


# ---------------------------------------------------------------- CIFAR-10 in its real pickle format
class _Python2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (the opcodes cPickle used for the real CIFAR-10 files), so
    the files load like the originals: with encoding='latin1' (torchvision) keys are str,
    with encoding='bytes' (the dataset page's recipe) they are b'data', b'labels', ..."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _dump_python2(obj: object, path: Path) -> None:
    with path.open("wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


@dataclass
class CifarFolder:
    root: Path  # what dataset.root points at: it holds cifar-10-batches-py/
    train_data: np.ndarray  # N x 3072 uint8 rows as written: 1024 red, 1024 green, 1024 blue
    train_labels: list[int]
    test_data: np.ndarray
    test_labels: list[int]
    classes: list[str]


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> CifarFolder:
    """A tiny cifar-10-batches-py: data_batch_1..5 and test_batch of CIFAR_PER_BATCH images each,
    batches.meta with label_names. Pixels are random, labels cycle through all 10 classes."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[np.ndarray, list[int]]] = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, size=(CIFAR_PER_BATCH, 3072), dtype=np.uint8)
        labels = [(j + i) % 10 for j in range(CIFAR_PER_BATCH)]
        filenames = [f"{name}_{j}.png".encode() for j in range(CIFAR_PER_BATCH)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": filenames}
        _dump_python2(entry, folder / name)
        splits[name] = (data, labels)
    meta = {
        b"num_cases_per_batch": CIFAR_PER_BATCH,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    _dump_python2(meta, folder / "batches.meta")

    # The files read back the way the dataset page says they do.
    with (folder / "data_batch_1").open("rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (CIFAR_PER_BATCH, 3072)

    train = [splits[f"data_batch_{k}"] for k in range(1, 6)]
    return CifarFolder(
        root=root,
        train_data=np.concatenate([d for d, _ in train]),
        train_labels=[label for _, labels in train for label in labels],
        test_data=splits["test_batch"][0],
        test_labels=splits["test_batch"][1],
        classes=CIFAR10_CLASSES,
    )


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the real files' md5s: the data batches through CIFAR10._check_integrity,
    batches.meta through the module's check_integrity. Generated files pass both, in this process."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


# ---------------------------------------------------------------- an image folder of PNGs
# Created in this order; the loader must sort them (apple, mango, zebra).
PNG_CLASSES = {"zebra": (40, 40, 220), "apple": (220, 30, 30), "mango": (30, 200, 40)}
PNG_TRAIN_PER_CLASS = 8
PNG_TEST_PER_CLASS = 4
ODD_SIZE = (48, 40)  # height x width of the one training image that is not 32x32


@dataclass
class PngFolder:
    root: Path  # holds train/<class>/*.png and test/<class>/*.png
    classes: list[str]  # sorted, as the loader must report them
    images: dict[str, torch.Tensor]  # "train/apple/000.png" -> the uint8 3 x H x W written
    odd_image: str  # key of the non-32x32 image (a solid colour, so resizing must keep it)


@pytest.fixture(scope="session")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> PngFolder:
    from PIL import Image  # an encoder other than the one the loader decodes with

    def write_png(image: torch.Tensor, path: Path) -> None:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)

    root = tmp_path_factory.mktemp("pngs")
    gen = torch.Generator().manual_seed(0)
    images: dict[str, torch.Tensor] = {}
    for name, colour in PNG_CLASSES.items():
        base = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)
        for split, count in (("train", PNG_TRAIN_PER_CLASS), ("test", PNG_TEST_PER_CLASS)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = torch.randn(3, 32, 32, generator=gen) * 20
                image = (base + noise).round().clamp(0, 255).to(torch.uint8)
                key = f"{split}/{name}/{i:03d}.png"
                write_png(image, root / key)
                images[key] = image
    odd_image = "train/apple/odd.png"
    image = torch.tensor(PNG_CLASSES["apple"], dtype=torch.uint8).view(3, 1, 1).expand(3, *ODD_SIZE)
    write_png(image.contiguous(), root / odd_image)
    images[odd_image] = image
    return PngFolder(root=root, classes=sorted(PNG_CLASSES), images=images, odd_image=odd_image)


@pytest.fixture
def fresh_data_cache() -> Iterator[None]:
    """run.load_data caches datasets per process (for in-process sweeps); start and end empty."""
    from cifar_exp.run import load_data

    load_data.cache_clear()
    yield
    load_data.cache_clear()
