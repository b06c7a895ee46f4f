"""Makes cifar10_sample.tar.xz beside this file from ARCHIVE, CIFAR-10's training images as JPEGs:
500 training and 100 test images per CIFAR-10 class, the source's JPEG files byte for byte.

Training images are files 0000-0499 of each class, test images files 4000-4099: inside the
held-out part of benchmarks/unpack_cifar_jpeg.py's split (files 4000-4999), so the sample's test images
are never training images there either. The output is the same bytes on every run.

usage: python cifar_exp/sample/make_sample.py ARCHIVE
"""

from __future__ import annotations

import io
import lzma
import sys
import tarfile
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "cifar10_sample.tar.xz"
SPLITS = {"train": range(0, 500), "test": range(4000, 4100)}  # file numbers, per class


def split_of(number: int) -> str | None:
    return next((split for split, numbers in SPLITS.items() if number in numbers), None)


def main(source: Path) -> None:
    members: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(source) as tar:  # cifar10-train/<class>/NNNN.jpg
        for member in tar:
            path = Path(member.name)
            if not member.isfile() or path.suffix != ".jpg" or split_of(int(path.stem)) is None:
                continue
            name = f"{split_of(int(path.stem))}/{path.parent.name}/{path.name}"
            members[name] = (member, tar.extractfile(member).read())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for name in sorted(members):  # sorted, owner-free: the same bytes every time
            member, data = members[name]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), member.mtime, 0o644
            out.addfile(info, io.BytesIO(data))
    OUTPUT.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    counts = {s: sum(n.startswith(f"{s}/") for n in members) for s in SPLITS}
    print(f"{OUTPUT}: {counts} images, {OUTPUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
