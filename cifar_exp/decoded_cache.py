"""Decoded datasets kept on disk as tensors, so image files and CIFAR-10's pickles are decoded once,
not once per run.

One safetensors file per dataset location, `<cache dir>/<kind>-<hash of the absolute root>.safetensors`,
used only while its key matches: a SHA-256 of the loader kind, the absolute root, the decode rule and
every input file's relative path, size and mtime_ns. Adding, removing or changing a file therefore
decodes again and replaces the file. The file's metadata holds the key, the caller's info and a
CRC-32 of every tensor, beside a CRC-32 of that metadata; all are checked on each read: a damaged
file is decoded again with a warning, never read as data. Tensors are memory-mapped from the file,
which is only ever replaced whole (atomic_write.replacing), never rewritten in place, so processes
filling the same cache at once leave one whole file and a mapped file stays valid. A cache location
that cannot be written costs only the speed-up: one warning, and the data stays in memory.
(A warm load of CIFAR-10, checks included, takes about a quarter of the time the format this
replaced took, as does torch.load(mmap=True): benchmarks/cache_format.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar_exp.atomic_write import replacing
from cifar_exp.errors import first_line

log = logging.getLogger(__name__)

ENV_DIR = "CIFAR_EXP_CACHE_DIR"  # the default location, before $XDG_CACHE_HOME/cifar_exp
FORMAT = 2  # bump when the layout or the meaning of a key changes
HEADER = "cifar_exp"  # the safetensors metadata entry: JSON of format, key, info and each tensor's CRC-32
HEADER_CRC = "cifar_exp.crc32"  # the metadata entry holding the CRC-32 of HEADER's value

Decoded = tuple[dict[str, torch.Tensor], dict[str, Any]]  # named tensors, JSON-able info


class DamagedCache(Exception):
    """The cache file exists but cannot be trusted."""


@dataclass(frozen=True)
class Source:
    """What a decoded dataset is made from: everything that changes the decoded tensors."""

    kind: str  # the loader: cifar10, imagefolder, cifar10_sample
    root: Path  # the dataset's folder; its absolute path is part of the key
    files: Sequence[str]  # every input file, as a path relative to root
    rule: str  # how files become tensors: decoder and version, image size, resize rule, classes

    def key(self) -> str | None:
        """SHA-256 over kind, absolute root, rule and each file's relative path, size and
        mtime_ns; None while a file is missing. About 5 us a file (one stat each)."""
        root = os.path.abspath(self.root)
        parts = [json.dumps([FORMAT, self.kind, root, self.rule])]
        for relative in self.files:
            try:
                stat = os.stat(f"{root}/{relative}")
            except FileNotFoundError:
                return None
            parts.append(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}")
        joined = "\0".join(parts).encode("utf-8", "surrogateescape")  # any file name
        return hashlib.sha256(joined).hexdigest()

    def filename(self) -> str:
        root = hashlib.sha256(os.path.abspath(self.root).encode()).hexdigest()[:16]
        return f"{self.kind}-{root}.safetensors"


def cache_folder(cache: bool, cache_dir: str | None) -> Path | None:
    """Where decoded tensors are kept: `cache_dir`, else $CIFAR_EXP_CACHE_DIR, else
    $XDG_CACHE_HOME/cifar_exp, else ~/.cache/cifar_exp; None with caching off."""
    if not cache:
        return None
    if chosen := cache_dir or os.environ.get(ENV_DIR):
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cifar_exp"


def load(source: Source, decode: Callable[[], Decoded], folder: Path | None) -> Decoded:
    """`decode()`'s result for `source`, from `folder` when a valid file there has its key;
    otherwise decoded and written there (no folder: decoded only)."""
    if folder is None:
        return decode()
    path = folder / source.filename()
    key = source.key()  # before decoding: a file changed meanwhile makes the next run decode again
    if key is not None and (found := _read_reporting(path, key, source.kind)) is not None:
        return found
    started = time.perf_counter()
    tensors, info = decode()
    key = key or source.key()  # files a loader fetched or unpacked exist now
    if key is not None and _write(path, key, tensors, info):
        log.info(f"decoded {source.kind} in {time.perf_counter() - started:.1f} s; cached as {path}")
    return tensors, info


# ---------------------------------------------------------------- reading
def _read_reporting(path: Path, key: str, kind: str) -> Decoded | None:
    try:
        return read(path, key)
    except (FileNotFoundError, NotADirectoryError):  # not cached yet; a folder that is not one: on writing
        return None
    except DamagedCache as e:
        log.warning(f"cache file {path} is damaged ({e}): decoding {kind} again")
    except OSError as e:
        log.warning(f"cannot read cache file {path} ({first_line(e)}): decoding {kind} again")
    return None


def read(path: Path, key: str) -> Decoded | None:
    """The tensors (memory-mapped) and info in `path` if it was written for `key`; None if for
    another key. Raises DamagedCache when any part fails its checks."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            header = metadata.get(HEADER, "")
            if metadata.get(HEADER_CRC) != str(zlib.crc32(header.encode())):
                raise DamagedCache("header checksum mismatch")
            header = json.loads(header)
            if header["format"] != FORMAT or header["key"] != key:
                return None  # written for other files, or by another version: out of date
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:  # a truncated file, an unreadable header, a size that does not fit
        raise DamagedCache(first_line(e)) from None
    if set(tensors) != set(header["crc32"]):
        raise DamagedCache(f"holds {sorted(tensors)}, its header {sorted(header['crc32'])}")
    for name, tensor in tensors.items():
        if crc32(tensor) != header["crc32"][name]:
            raise DamagedCache(f"{name}: checksum mismatch")
    return tensors, header["info"]


def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a contiguous tensor's bytes (about 0.03 s for CIFAR-10's 184 MB)."""
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------- writing
def _write(path: Path, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> bool:
    """Writes `path` whole or not at all (atomic_write.replacing); where it cannot, False after
    one warning."""
    from safetensors.torch import save

    # each its own copy: safetensors refuses tensors that share memory (a loader may return views)
    tensors = {
        name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in tensors.items()
    }
    crcs = {name: crc32(t) for name, t in tensors.items()}
    header = json.dumps({"format": FORMAT, "key": key, "info": info, "crc32": crcs})
    data = save(tensors, metadata={HEADER: header, HEADER_CRC: str(zlib.crc32(header.encode()))})
    try:
        with replacing(path) as f:
            f.write(data)
    except OSError as e:  # read-only, full, not a folder, no permission
        log.warning(
            f"cannot write the decoded-data cache in {path.parent} ({first_line(e)}): decoding on every "
            f"run; dataset.cache_dir=DIR picks another place, dataset.cache=false turns it off"
        )
        return False
    return True
