"""Lays out an archive of CIFAR-10's training images as JPEGs (<class>/NNNN.jpg, 5,000 a class) as
DEST/train and DEST/test: files 0000-3999 of each class train, 4000-4999 test (40,000 / 10,000),
without a process per file.

usage: python benchmarks/unpack_cifar_jpeg.py ARCHIVE DEST
"""

import sys
import tarfile
from pathlib import Path

archive, dest = sys.argv[1], Path(sys.argv[2])
if not (dest / "test" / "truck").is_dir():
    with tarfile.open(archive) as tar:
        for member in tar:
            path = Path(member.name)
            if not member.isfile() or path.suffix != ".jpg":
                continue
            split = "train" if int(path.stem) < 4000 else "test"
            target = dest / split / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
print(dest)
