"""Which file format the decoded-data cache (cifar_exp/decoded_cache.py) should read: a CIFAR-10-
sized dataset (60,000 uint8 images of 3 x 32 x 32, 184 MB, and their int64 labels) written once in
each format, then loaded again and again from the page cache (a warm load: what every run after
the first one does). Each load is timed twice: the format's own load, and the load plus a CRC-32 of
every tensor (which the cache checks on each read, and which also touches every byte of a
memory-mapped file). The first format is the cache's own until issue #21 (a JSON header and raw
tensor bytes), kept here so the figures can be measured again; the ratios are against it.

usage: python benchmarks/cache_format.py [--loads 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py: a script's folder is on sys.path

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------- the cache's own format until #21
MAGIC, PREFIX, ALIGN = b"cifar_exp/cache1", struct.Struct("<16sQI"), 64
DTYPES = {"uint8": torch.uint8, "int64": torch.int64}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_own(tensors: Tensors, path: Path) -> None:
    arrays = {name: t.contiguous().numpy() for name, t in tensors.items()}
    entries, offset = {}, 0
    for name, array in arrays.items():
        data = memoryview(array).cast("B")
        entries[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "offset": offset}
        entries[name] |= {"nbytes": data.nbytes, "crc32": zlib.crc32(data)}
        offset = _aligned(offset + data.nbytes)
    header = json.dumps({"format": 1, "key": "k", "info": {}, "tensors": entries}).encode()
    with open(path, "wb") as f:
        f.write(PREFIX.pack(MAGIC, len(header), zlib.crc32(header)) + header)
        f.write(bytes(_aligned(f.tell()) - f.tell()))
        for array in arrays.values():
            f.write(memoryview(array).cast("B"))
            f.write(bytes(_aligned(f.tell()) - f.tell()))


def read_own(path: Path) -> Tensors:
    """The old reader: the whole file into one buffer, each tensor's CRC-32 checked, no copy."""
    with open(path, "rb") as f:
        buffer = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buffer)
    _, header_size, header_crc = PREFIX.unpack_from(buffer)
    header_bytes = bytes(buffer[PREFIX.size : PREFIX.size + header_size])
    assert zlib.crc32(header_bytes) == header_crc
    start, view, tensors = _aligned(PREFIX.size + header_size), memoryview(buffer), {}
    for name, entry in json.loads(header_bytes)["tensors"].items():
        dtype, begin, nbytes = DTYPES[entry["dtype"]], start + entry["offset"], entry["nbytes"]
        assert nbytes == math.prod(entry["shape"]) * dtype.itemsize
        assert zlib.crc32(view[begin : begin + nbytes]) == entry["crc32"]
        flat = torch.frombuffer(buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=begin)
        tensors[name] = flat.view(entry["shape"])
    return tensors


# ---------------------------------------------------------------- standard formats
def crc32s(tensors: Tensors) -> dict[str, int]:
    return {name: zlib.crc32(memoryview(t.contiguous().numpy()).cast("B")) for name, t in tensors.items()}


def safetensors_load(backend: str) -> Callable[[Path], Tensors]:
    from safetensors.torch import load_file

    return lambda path: load_file(path, backend=backend)


def safetensors_save(tensors: Tensors, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)


def torch_load(mmap: bool) -> Callable[[Path], Tensors]:
    return lambda path: torch.load(path, mmap=mmap, weights_only=True)


def torch_save(tensors: Tensors, path: Path) -> None:
    torch.save(tensors, path)


FORMATS: dict[str, tuple[Callable[[Tensors, Path], None], Callable[[Path], Tensors]]] = {
    "own format (until #21), read whole": (write_own, read_own),
    "safetensors load_file (mmap)": (safetensors_save, safetensors_load("mmap")),
    "safetensors load_file (pread)": (safetensors_save, safetensors_load("pread")),
    "torch.load(mmap=True, weights_only)": (torch_save, torch_load(mmap=True)),
    "torch.load(weights_only)": (torch_save, torch_load(mmap=False)),
}


def timed(load: Callable[[], object], loads: int) -> list[float]:
    times = []
    for _ in range(loads):
        started = time.perf_counter()
        load()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loads", type=int, default=7, help="loads of each file (the median is shown)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "train_images": torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=generator),
        "train_labels": torch.randint(0, 10, (50_000,), generator=generator),
        "test_images": torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=generator),
        "test_labels": torch.randint(0, 10, (10_000,), generator=generator),
    }
    expected = crc32s(tensors)
    cores = len(os.sched_getaffinity(0))
    print(f"60,000 images 3x32x32 uint8 + int64 labels; CPU: {cpu_name()}, {cores} cores")
    print(f"torch {torch.__version__}; median of {args.loads} warm loads (file in the page cache)")
    print(f"{'format':38} {'MB':>5} {'load':>8} {'+CRC-32':>8} {'ratio':>6}")
    baseline = None
    with tempfile.TemporaryDirectory(prefix="cifar_exp-format-bench-") as folder:
        for n, (name, (write, read)) in enumerate(FORMATS.items()):
            path = Path(folder) / f"{n}.bin"
            write(tensors, path)
            loaded = read(path)
            assert all(torch.equal(loaded[key], tensors[key]) for key in tensors), name
            del loaded
            load_s = statistics.median(timed(lambda r=read, p=path: r(p), args.loads))
            if read is read_own:  # it checks its CRC-32s itself
                checked_s = baseline = load_s
            else:
                checked = timed(lambda r=read, p=path: crc32s(r(p)) == expected, args.loads)
                checked_s = statistics.median(checked)
            size = path.stat().st_size / 1e6
            print(f"{name:38} {size:5.0f} {load_s:7.3f}s {checked_s:7.3f}s {checked_s / baseline:5.2f}x")
    print("ratio: load + CRC-32 against the own format's load (which checks its CRC-32s); lower is faster")


if __name__ == "__main__":
    main()
