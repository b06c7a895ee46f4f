"""Image files as users have them -> uint8 3 x 32 x 32 tensors: which files in a folder are
images, and decoding any image mode and size.

A class folder may hold anything. Hidden files and folders (.DS_Store, ._photo.jpg,
.ipynb_checkpoints) and what operating systems leave behind (Thumbs.db, desktop.ini, __MACOSX) are
skipped silently; other files without an image extension (README.txt, labels.csv) are skipped
with one warning line. Nested folders belong to the class folder they are in; symbolic links are
followed where they lead outside the dataset folder and outside each other's targets, and a link
that loops back or reaches another class's images stops the load (Links). Every mode becomes 8-bit
RGB: 16-bit greys are scaled, not clipped; transparent pixels are composited onto black; the EXIF
orientation is applied. Every size is resized to 32x32. A file with an image extension that cannot
be decoded (truncated, empty, not an image) or a broken link stops the load with one line naming
it: it was meant as data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from cifar_exp.errors import UserError, first_line

IMAGE_SIZE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # any case
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}  # left by Windows and macOS: skipped silently
SIXTEEN_BIT_GREYS = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I": how Pillow may open a 16-bit PNG
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
EXAMPLES = 3  # files named in a one-line message; the rest are counted

log = logging.getLogger(__name__)


class UndecodableImage(UserError):
    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"cannot decode image {printable(name)}: {reason}")

    def __reduce__(self) -> tuple:  # pickled by parallel launchers: rebuilt from its two parts
        return type(self), (self.name, self.reason)


# ---------------------------------------------------------------- which files are images
def ignored(name: str) -> bool:
    """Hidden files and folders and the operating systems' own files: skipped without a word."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


@dataclass
class Listing:
    """One split of an image folder: split/<class>/... -> image files (paths relative to the
    dataset root, sorted), with what was left out."""

    classes: dict[str, list[str]] = field(default_factory=dict)  # every class folder, even empty
    strays: list[str] = field(default_factory=list)  # not images, or not inside a class folder
    broken: list[str] = field(default_factory=list)  # symbolic links whose target is gone


class Links:
    """The real folders and files a listing has claimed: the dataset folder itself, its splits, and
    each link's target. A link is followed only when its target overlaps none of them, so no image
    is read twice and none under another class's label: a link back up the tree (`cat/loop -> ..`),
    into the dataset folder (`cat/x -> ../dog`), or onto another link's target stops the load with
    one line naming it. A link to an image or a folder elsewhere is followed."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.claimed: dict[str, str] = {os.path.realpath(root): "the dataset folder"}
        for split in ("train", "test"):  # a split may itself be a link to a folder elsewhere
            self.claimed.setdefault(os.path.realpath(root / split), f"the {split}/ folder")

    def follow(self, path: str, link: str) -> None:
        """Claims the target of `link` (a listed path), or refuses it in one line."""
        target = os.path.realpath(path)
        for real, owner in self.claimed.items():
            if _within(target, real) or _within(real, target):
                raise UserError(
                    f"dataset.root={self.root}: {printable(link)} is a symbolic link to "
                    f"{printable(target)}, {_overlap(target, real, owner)}: its images would be read "
                    "twice or under another class; remove the link, or link only to images outside "
                    "the dataset folder"
                )
        self.claimed[target] = f"what {printable(link)} links to"


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _overlap(target: str, real: str, owner: str) -> str:
    """How a link's target meets what is claimed: `owner` names it ("the dataset folder")."""
    if target == real:
        return f"{owner} itself" if owner.startswith("the ") else f"the same as {owner}"
    return f"a folder that holds {owner}" if _within(real, target) else f"inside {owner}"


def list_splits(root: Path) -> dict[str, Listing]:
    """train/'s and test/'s listings, with links checked across both (a train link and a test
    link to the same folder would put the same images in both)."""
    links = Links(root)
    return {split: list_split(root, split, links) for split in ("train", "test")}


def list_split(root: Path, split: str, links: Links | None = None) -> Listing:
    """root/split/<class>/**: each class folder's image files, nested folders included.
    Strings, not Paths: 50,000 files take about 0.2 s."""
    links = links or Links(root)
    listing = Listing()
    with os.scandir(root / split) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if ignored(entry.name):
                continue
            relative = f"{split}/{entry.name}"
            if entry.is_dir():  # follows a symbolic link
                if entry.is_symlink():
                    links.follow(entry.path, relative)
                listing.classes[entry.name] = sorted(_scan(entry.path, relative, listing, links))
            else:
                listing.strays.append(relative)
    return listing


def _scan(folder: str, relative: str, listing: Listing, links: Links) -> list[str]:
    found = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):  # the same link named first, every time
            if ignored(entry.name):
                continue
            path = f"{relative}/{entry.name}"
            if entry.is_dir():
                if entry.is_symlink():
                    links.follow(entry.path, path)
                found += _scan(entry.path, path, listing, links)
            elif os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                listing.strays.append(path)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                listing.broken.append(path)
            else:
                if entry.is_symlink():
                    links.follow(entry.path, path)
                found.append(path)
    return found


def printable(path: str) -> str:
    """A file name that is not UTF-8 (os.scandir hands it over with surrogates) as \\xff escapes,
    so printing it cannot fail."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def some(paths: Sequence[str]) -> str:
    """The first few of `paths`, and how many more: for a one-line message."""
    shown = ", ".join(printable(path) for path in paths[:EXAMPLES])
    return shown + (f" and {len(paths) - EXAMPLES} more" if len(paths) > EXAMPLES else "")


def listed_classes(root: str, splits: dict[str, Listing]) -> dict[str, dict[str, list[str]]]:
    """split -> class -> image files, for the classes with images in both splits. A class folder
    without images in either split is skipped with a warning; one with images in only one split,
    or a broken link, stops here with one line."""
    broken = [path for listing in splits.values() for path in listing.broken]
    if broken:
        raise UserError(
            f"dataset.root={root}: {some(broken)}: broken symbolic link(s), their target is "
            "gone; remove them or restore the targets"
        )
    strays = [path for listing in splits.values() for path in listing.strays]
    if strays:
        log.warning(
            f"dataset.root={root}: skipped {len(strays)} file(s) that are not images in a class folder: "
            f"{some(strays)} (images end in {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    train, test = splits["train"].classes, splits["test"].classes
    names = sorted(set(train) | set(test))
    empty = [name for name in names if not train.get(name) and not test.get(name)]
    if empty:
        log.warning(f"dataset.root={root}: skipped class folders without images in train/ or test/: {empty}")
    for name in names:
        for have, lack, other in (("train", "test", test), ("test", "train", train)):
            if splits[have].classes.get(name) and not other.get(name):
                state = "has no images" if name in other else "is missing"
                count = len(splits[have].classes[name])
                raise UserError(
                    f"dataset.root={root}: {have}/{name}/ has {count} image{'s' * (count != 1)} but "
                    f"{lack}/{name}/ {state}; every class needs images in both train/ and test/: add "
                    f"images to {lack}/{name}/ or move {have}/{name}/ out of {root}/{have}"
                )
    kept = [name for name in names if name not in empty]
    if not kept:
        raise UserError(
            f"dataset.root={root}: no images in {root}/train/<class>/ and {root}/test/<class>/ "
            f"(images end in {', '.join(sorted(IMAGE_SUFFIXES))}, in any case)"
        )
    return {split: {name: splits[split].classes[name] for name in kept} for split in ("train", "test")}


# ---------------------------------------------------------------- decoding
def decode_rule() -> str:
    """What turns files into tensors, for the decoded cache's key: a new decoder or rule may decode
    differently, so it decodes again."""
    import PIL

    return (
        f"PIL {PIL.__version__}: 8-bit RGB (16-bit greys scaled, transparency over black, EXIF "
        f"orientation), JPEG draft, {IMAGE_SIZE}x{IMAGE_SIZE}, other sizes resized bilinear"
    )


def decode_image(file: Path | str | BinaryIO, name: Path | str) -> torch.Tensor:
    """uint8 3 x 32 x 32 from any image file Pillow reads; UndecodableImage names `name`."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as image:
            image.draft(None, (IMAGE_SIZE, IMAGE_SIZE))  # a large JPEG decodes at 1/2-1/8 scale
            ImageOps.exif_transpose(image, in_place=True)  # a phone photo the right way up
            rgb = _to_rgb(image)
            if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
                rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # truncated, empty, not an image, too large (DecompressionBombError)
        reason = first_line(e).replace(f" {str(name)!r}", "")  # Pillow repeats the path
        raise UndecodableImage(str(name), reason) from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _to_rgb(image):  # PIL.Image.Image in and out (PIL is imported lazily)
    from PIL import Image

    if image.mode in SIXTEEN_BIT_GREYS:  # Pillow's convert() would clip 0-65535 at 255
        grey = np.asarray(image, dtype=np.float64) / 257
        return Image.fromarray(grey.clip(0, 255).round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def decode_all(files: Sequence[str | BinaryIO], names: Sequence[str]) -> torch.Tensor:
    """N x 3 x 32 x 32 uint8; files that cannot be decoded stop it with one line naming them."""

    def decode(file: str | BinaryIO, name: str) -> torch.Tensor | UndecodableImage:
        try:
            return decode_image(file, name)
        except UndecodableImage as e:
            return e

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decoding releases the GIL
        decoded = list(pool.map(decode, files, names, chunksize=256))
    bad = [d for d in decoded if isinstance(d, UndecodableImage)]
    if len(bad) == 1:
        raise UserError(f"{bad[0]}; replace or delete the file")
    if bad:
        raise UserError(
            f"{bad[0]}; and {len(bad) - 1} more files cannot be decoded "
            f"({some([b.name for b in bad[1:]])}); replace or delete them"
        )
    return torch.stack(decoded)
