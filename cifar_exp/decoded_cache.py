"""Decoded datasets kept on disk as tensors, so image files and CIFAR-10's pickles are decoded once,
not once per run.

One file per dataset location, `<cache dir>/<kind>-<hash of the absolute root>.tensors`, used only
while its key matches: a SHA-256 of the loader kind, the absolute root, the decode rule and every
input file's relative path, size and mtime_ns. Adding, removing or changing a file therefore
decodes again and replaces the file. Every tensor carries a CRC-32 that is checked on each read: a
damaged file is decoded again with a warning, never read as data. A file is written as a temporary
file in the same folder, fsynced, then renamed over the old one, so processes filling the same
cache at once leave one whole file. A cache location that cannot be written costs only the
speed-up: one warning, and the data stays in memory.

File layout: PREFIX (magic, header length, header CRC-32), a JSON header (format, key, the
caller's info, and per tensor its dtype, shape, offset, size and CRC-32), then the raw tensor
bytes, each starting on a 64-byte boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar_exp.errors import first_line

log = logging.getLogger(__name__)

ENV_DIR = "CIFAR_EXP_CACHE_DIR"  # the default location, before $XDG_CACHE_HOME/cifar_exp
FORMAT = 1  # bump when the layout or the meaning of a key changes
MAGIC = b"cifar_exp/cache1"
PREFIX = struct.Struct("<16sQI")  # magic, header length in bytes, CRC-32 of the header
ALIGN = 64  # bytes; tensors start on this boundary
DTYPES = {"uint8": torch.uint8, "int64": torch.int64}
STALE_TEMP_S = 3600  # temporary files older than this are left over from a killed writer

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
        return hashlib.sha256(
            "\0".join(parts).encode("utf-8", "surrogateescape")
        ).hexdigest()  # any file name

    def filename(self) -> str:
        return f"{self.kind}-{hashlib.sha256(os.path.abspath(self.root).encode()).hexdigest()[:16]}.tensors"


def cache_folder(cache: bool, cache_dir: str | None) -> Path | None:
    """Where decoded tensors are kept: `cache_dir`, else $CIFAR_EXP_CACHE_DIR, else
    $XDG_CACHE_HOME/cifar_exp, else ~/.cache/cifar_exp; None with caching off."""
    if not cache:
        return None
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cifar_exp"


def load(source: Source, decode: Callable[[], Decoded], folder: Path | None) -> Decoded:
    """`decode()`'s result for `source`, from `folder` when a valid file there has its key;
    otherwise decoded and written there (no folder: decoded only)."""
    if folder is None:
        return decode()
    path = folder / source.filename()
    key = source.key()  # before decoding: a file changed meanwhile makes the next run decode again
    if key is not None:
        found = _read_reporting(path, key, source.kind)
        if found is not None:
            return found
    started = time.perf_counter()
    tensors, info = decode()
    key = key or source.key()  # files a loader fetched or unpacked exist now
    if key is not None and _write_reporting(folder, path, key, tensors, info):
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
    """The tensors and info in `path` if it was written for `key`; None if for another key.
    Raises DamagedCache when any part fails its checks."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        if f.readinto(buffer) != size:
            raise DamagedCache("shorter than its size")
    if size < PREFIX.size:
        raise DamagedCache("truncated")
    magic, header_size, header_crc = PREFIX.unpack_from(buffer)
    header_bytes = bytes(buffer[PREFIX.size : PREFIX.size + header_size])
    if magic != MAGIC:
        raise DamagedCache("not a cifar_exp cache file")
    if len(header_bytes) != header_size or zlib.crc32(header_bytes) != header_crc:
        raise DamagedCache("header checksum mismatch")
    header = json.loads(header_bytes)
    if header.get("format") != FORMAT or header.get("key") != key:
        return None  # written for other files, or by another version: out of date
    start = _aligned(PREFIX.size + header_size)
    view = memoryview(buffer)
    tensors = {}
    for name, entry in header["tensors"].items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise DamagedCache(f"{name}: unknown dtype {entry['dtype']!r}")
        begin, nbytes = start + entry["offset"], entry["nbytes"]
        if nbytes != math.prod(entry["shape"]) * dtype.itemsize or begin + nbytes > size:
            raise DamagedCache(f"{name}: size does not match its shape")
        if zlib.crc32(view[begin : begin + nbytes]) != entry["crc32"]:
            raise DamagedCache(f"{name}: checksum mismatch")
        if nbytes == 0:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
        else:  # no copy: the tensor shares `buffer`
            flat = torch.frombuffer(buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=begin)
            tensors[name] = flat.view(entry["shape"])
    return tensors, header["info"]


# ---------------------------------------------------------------- writing
def _write_reporting(
    folder: Path, path: Path, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]
) -> bool:
    try:
        write(folder, path, key, tensors, info)
        return True
    except OSError as e:  # read-only, full, not a folder, no permission
        log.warning(
            f"cannot write the decoded-data cache in {folder} ({first_line(e)}): decoding on every "
            f"run; dataset.cache_dir=DIR picks another place, dataset.cache=false turns it off"
        )
        return False


def write(folder: Path, path: Path, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Writes `path` whole or not at all: a temporary file in the same folder, fsynced, renamed."""
    arrays = {name: t.detach().cpu().contiguous().numpy() for name, t in tensors.items()}
    entries, offset = {}, 0
    for name, array in arrays.items():
        data = memoryview(array).cast("B")
        entries[name] = {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "offset": offset,
            "nbytes": data.nbytes,
            "crc32": zlib.crc32(data),
        }
        offset = _aligned(offset + data.nbytes)
    header = json.dumps({"format": FORMAT, "key": key, "info": info, "tensors": entries}).encode()
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder, path.name)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(PREFIX.pack(MAGIC, len(header), zlib.crc32(header)))
            f.write(header)
            f.write(bytes(_aligned(f.tell()) - f.tell()))
            for array in arrays.values():
                f.write(memoryview(array).cast("B"))
                f.write(bytes(_aligned(f.tell()) - f.tell()))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0o600 would hide a shared cache_dir from the team
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    for leftover in folder.glob(f".{name}.*.tmp"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_TEMP_S:
                leftover.unlink()
        except OSError:
            pass  # another process removed or renamed it


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
