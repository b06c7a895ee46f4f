"""Image folders as users have them: stray, hidden and nested files, empty or one-sided class
folders, every image mode and size, unreadable files, links, uppercase extensions. Each case
either loads (what is skipped is said once) or stops with one line naming the file or folder and
the fix. The folders are generated in tmp_path with Pillow."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_exp import image_files
from cifar_exp.data import ImageData, load_imagefolder
from cifar_exp.errors import UserError
from cifar_exp.image_files import decode_image

COLOURS = {"cat": (200, 40, 40), "dog": (40, 40, 200)}


def solid(colour: tuple[int, ...], size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def save(image: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """train/{cat,dog}/ with 2 solid images each, test/{cat,dog}/ with 1: the clean folder that
    each test then makes untidy."""
    base = tmp_path / "images"
    for name, colour in COLOURS.items():
        for split, count in (("train", 2), ("test", 1)):
            for i in range(count):
                save(solid(colour), base / split / name / f"{i}.png")
    return base


def load(root: Path) -> ImageData:
    return load_imagefolder(root=str(root), mean=[0.5] * 3, std=[0.5] * 3, cache=True, cache_dir=None)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def one_line_error(root: Path) -> str:
    with pytest.raises(UserError) as excinfo:
        load(root)
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def assert_clean(data: ImageData) -> None:
    """Exactly the clean folder's images, labelled by their folder."""
    assert data.classes == ["cat", "dog"]
    assert data.train_labels.tolist() == [0, 0, 1, 1] and data.test_labels.tolist() == [0, 1]
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        for image, label in zip(images, labels, strict=True):
            colour = torch.tensor(COLOURS[data.classes[label]], dtype=torch.uint8).view(3, 1, 1)
            assert torch.equal(image, colour.expand(3, 32, 32))


# ---------------------------------------------------------------- what is not an image
def test_stray_files_are_skipped_with_one_warning(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    for path in ("README.txt", "train/README.txt", "train/cat/notes.txt", "test/dog/labels.csv"):
        (root / path).write_text("not an image")
    data = load(root)
    assert_clean(data)
    (warning,) = warnings_in(caplog)
    for path in ("train/README.txt", "train/cat/notes.txt", "test/dog/labels.csv"):
        assert path in warning
    assert "README.txt, " in warning and ".png" in warning  # what counts as an image
    assert str(root / "README.txt") not in warning  # beside train/ and test/: not looked at


def test_hidden_and_system_files_are_skipped_silently(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    garbage = b"\x00\x05\x16\x07 AppleDouble"  # macOS's ._ files carry the image's name, not an image
    for path in ("train/cat/._0.png", "test/dog/._0.png", "train/.DS_Store", "train/cat/.DS_Store"):
        (root / path).write_bytes(garbage)
    for path in ("train/cat/Thumbs.db", "test/dog/desktop.ini", ".DS_Store"):
        (root / path).write_bytes(garbage)
    save(solid((0, 255, 0)), root / "train/cat/.hidden.png")  # a real image, but hidden
    save(solid((0, 255, 0)), root / "train/cat/.ipynb_checkpoints/0-checkpoint.png")
    (root / "train/.git").mkdir()  # a hidden folder where classes are: not a class
    (root / "train/__MACOSX/cat").mkdir(parents=True)
    (root / "train/__MACOSX/cat/._0.png").write_bytes(garbage)
    assert_clean(load(root))
    assert warnings_in(caplog) == []


def test_nested_folders_belong_to_their_class_folder(root: Path) -> None:
    save(solid(COLOURS["cat"]), root / "train/cat/2019/march/a.png")
    save(solid(COLOURS["dog"]), root / "train/dog/more/b.png")
    data = load(root)
    assert data.classes == ["cat", "dog"]
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(data.train_images[2], data.train_images[0])  # cat's colour, nested


def test_uppercase_extensions_are_images(root: Path) -> None:
    save(solid(COLOURS["cat"]), root / "train/cat/A.PNG", format="PNG")
    save(solid(COLOURS["cat"]), root / "train/cat/B.JPG", format="JPEG", quality=100)
    save(solid(COLOURS["dog"]), root / "test/dog/C.JpEg", format="JPEG", quality=100)
    data = load(root)
    assert data.train_labels.tolist() == [0, 0, 0, 0, 1, 1] and data.test_labels.tolist() == [0, 1, 1]


# ---------------------------------------------------------------- class folders
def test_empty_class_folders_are_skipped_with_a_warning(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (root / "train/empty").mkdir()
    (root / "test/empty").mkdir()
    (root / "train/only_a_readme").mkdir()
    (root / "train/only_a_readme/README.txt").write_text("later")
    assert_clean(load(root))
    skipped = [w for w in warnings_in(caplog) if "without images" in w]
    assert len(skipped) == 1 and "'empty'" in skipped[0] and "'only_a_readme'" in skipped[0]


@pytest.mark.parametrize(
    ("have", "lack", "empty_folder"),
    [("train", "test", False), ("test", "train", False), ("train", "test", True)],
    ids=["only-in-train", "only-in-test", "test-folder-empty"],
)
def test_a_class_in_one_split_only_stops_naming_the_folder(
    root: Path, have: str, lack: str, empty_folder: bool
) -> None:
    save(solid((0, 255, 0)), root / have / "bird" / "0.png")
    if empty_folder:
        (root / lack / "bird").mkdir()
    message = one_line_error(root)
    state = "has no images" if empty_folder else "is missing"
    assert f"{have}/bird/ has 1 image but {lack}/bird/ {state}" in message
    assert f"add images to {lack}/bird/" in message and str(root) in message


def test_no_class_folder_with_images_names_the_extensions(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "photo.heic").write_bytes(b"HEIC")  # Pillow cannot read it
    message = one_line_error(tmp_path)
    assert "no images" in message and ".png" in message and ".jpg" in message


# ---------------------------------------------------------------- modes and sizes
def _p_with_transparency() -> Image.Image:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 16, 32))  # left half: index 0, the transparent one
    image.info["transparency"] = 0
    return image


MODES = {  # name: (image, file suffix, the RGB Pillow-independent reading expects at (0, 0) and (31, 31))
    "L": (solid(100, mode="L"), ".png", (100, 100, 100), (100, 100, 100)),
    "LA": (solid((100, 255), mode="LA"), ".png", (100, 100, 100), (100, 100, 100)),
    "LA-transparent": (solid((100, 0), mode="LA"), ".png", (0, 0, 0), (0, 0, 0)),
    "P-transparency": (_p_with_transparency(), ".png", (0, 0, 0), (10, 200, 30)),
    "RGBA-half": (solid((200, 100, 50, 128), mode="RGBA"), ".png", (100, 50, 25), (100, 50, 25)),
    "CMYK": (solid((0, 255, 0, 0), mode="CMYK"), ".tif", (255, 0, 255), (255, 0, 255)),
    "I;16": (Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)), ".png", (156,) * 3, (156,) * 3),
    "1-bit": (solid(1, mode="1"), ".png", (255, 255, 255), (255, 255, 255)),
    "1x1": (solid((7, 8, 9), size=(1, 1)), ".png", (7, 8, 9), (7, 8, 9)),
    "tall-odd": (solid((7, 8, 9), size=(3, 301)), ".bmp", (7, 8, 9), (7, 8, 9)),
    "gif": (solid((30, 60, 90)).quantize(), ".gif", (30, 60, 90), (30, 60, 90)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_and_size_becomes_rgb_32x32(tmp_path: Path, mode: str) -> None:
    image, suffix, top_left, bottom_right = MODES[mode]
    path = save(image, tmp_path / f"image{suffix}")
    with Image.open(path) as written:  # the file really has the mode under test
        assert written.size == image.size and (written.mode == image.mode or mode in ("I;16", "gif"))
    pixels = decode_image(path, path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    rgba = pixels[:, 0, 0].tolist(), pixels[:, 31, 31].tolist()
    assert rgba == (list(top_left), list(bottom_right)), mode


def test_a_large_jpeg_is_resized(tmp_path: Path) -> None:
    path = save(solid((200, 120, 40), size=(1600, 1200)), tmp_path / "photo.jpg", quality=95)
    pixels = decode_image(path, path)
    assert pixels.shape == (3, 32, 32)
    assert (pixels.int() - torch.tensor([200, 120, 40]).view(3, 1, 1)).abs().max() <= 3


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "phone.jpg", exif=exif, quality=100)
    pixels = decode_image(path, path).int()
    # Displayed: red on top, blue at the bottom.
    assert pixels[0, 2, 16] > 200 and pixels[2, 2, 16] < 50
    assert pixels[2, 29, 16] > 200 and pixels[0, 29, 16] < 50


def test_an_image_over_pillows_size_limit_stops_naming_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(solid(COLOURS["cat"], size=(40, 40)), root / "train/cat/huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,600 pixels: over twice the limit
    message = one_line_error(root)
    assert f"{root}/train/cat/huge.png" in message and "replace or delete" in message


# ---------------------------------------------------------------- unreadable files
def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize(
    ("name", "content"),
    [("cut.jpg", _truncated_jpeg()), ("empty.png", b""), ("notes.png", b"just some text\n")],
    ids=["truncated-jpeg", "zero-bytes", "text-named-png"],
)
def test_an_unreadable_image_stops_naming_it(root: Path, name: str, content: bytes) -> None:
    (root / "train/dog" / name).write_bytes(content)
    message = one_line_error(root)
    assert message.startswith(f"cannot decode image {root}/train/dog/{name}: ")
    assert message.endswith("replace or delete the file")


def test_several_unreadable_images_are_one_line(root: Path) -> None:
    for i in range(5):
        (root / f"test/cat/bad{i}.png").write_bytes(b"")
    message = one_line_error(root)
    assert f"{root}/test/cat/bad0.png" in message and "and 4 more files cannot be decoded" in message
    assert "bad3.png and 1 more" in message


# ---------------------------------------------------------------- links
def test_links_to_images_and_folders_outside_are_followed(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    save(solid(COLOURS["cat"]), elsewhere / "cats" / "linked.png")
    os.symlink(elsewhere / "cats" / "linked.png", root / "train/cat/link.png")
    save(solid(COLOURS["dog"]), elsewhere / "dogs" / "0.png")
    os.symlink(elsewhere / "dogs", root / "train/dog/more")  # a linked folder inside a class
    os.symlink(elsewhere / "far", elsewhere / "near")  # a chain of links that ends outside
    save(solid(COLOURS["dog"]), elsewhere / "far" / "0.png")
    os.symlink(elsewhere / "near", root / "test/dog/chain")
    data = load(root)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.test_labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("link", "target", "why"),
    [
        ("train/cat/loop", "..", "inside the dataset folder"),  # train/: the other classes as cats
        ("train/cat/loop", "../..", "the dataset folder itself"),
        ("train/cat/loop", "../../..", "a folder that holds the dataset folder"),
        ("train/cat/loop", ".", "inside the dataset folder"),  # itself
        ("train/cat/dogs", "../dog", "inside the dataset folder"),  # a sibling class
        ("train/cat/dog.png", "../dog/0.png", "inside the dataset folder"),  # a file of another class
        ("train/cat/again.png", "0.png", "inside the dataset folder"),  # the same image twice
        ("test/cat/leak", "../../train/cat", "inside the dataset folder"),  # training images tested
        ("train/kitten", "cat", "inside the dataset folder"),  # a class folder that is another class
    ],
)
def test_a_link_back_into_the_data_stops_naming_it(root: Path, link: str, target: str, why: str) -> None:
    os.symlink(target, root / link)
    message = one_line_error(root)
    assert message.startswith(f"dataset.root={root}: {link} is a symbolic link to ")
    assert why in message and "remove the link" in message


def test_a_chain_of_links_back_up_stops_naming_the_first(root: Path, tmp_path: Path) -> None:
    os.symlink(root / "train", tmp_path / "hop")  # outside, but it leads back into the data
    os.symlink(tmp_path / "hop", root / "train/cat/a")
    message = one_line_error(root)
    assert f"train/cat/a is a symbolic link to {os.path.realpath(root / 'train')}" in message


@pytest.mark.parametrize("second", ["train/dog/same.png", "test/dog/same.png"])
def test_two_links_to_the_same_images_stop_naming_the_second(root: Path, tmp_path: Path, second: str) -> None:
    """Outside the dataset, but one folder under two classes (or in both splits) is read twice."""
    save(solid(COLOURS["cat"]), tmp_path / "shared" / "0.png")
    os.symlink(tmp_path / "shared", root / "train/cat/shared")
    os.symlink(tmp_path / "shared" / "0.png", root / second)
    message = one_line_error(root)
    assert f"{second} is a symbolic link to" in message and "inside what train/cat/shared links to" in message


def test_a_link_inside_a_linked_folder_back_to_it_stops(root: Path, tmp_path: Path) -> None:
    save(solid(COLOURS["dog"]), tmp_path / "outside" / "dogs" / "0.png")
    os.symlink(tmp_path / "outside" / "dogs", root / "train/dog/more")
    os.symlink("..", tmp_path / "outside" / "dogs" / "up")  # holds the folder it is in: a loop outside
    message = one_line_error(root)
    assert "train/dog/more/up is a symbolic link to" in message
    assert "a folder that holds what train/dog/more links to" in message


def test_a_split_that_is_a_link_still_refuses_a_loop(root: Path, tmp_path: Path) -> None:
    """train/ itself elsewhere (a big disk): a link from its class folders back up is still a loop."""
    (root / "train").rename(tmp_path / "train_elsewhere")
    os.symlink(tmp_path / "train_elsewhere", root / "train")
    assert_clean(load(root))
    os.symlink("..", tmp_path / "train_elsewhere/cat/loop")
    assert "train/cat/loop is a symbolic link to" in (message := one_line_error(root))
    assert "the train/ folder itself" in message


def test_a_broken_link_stops_naming_it(root: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.png", root / "train/cat/link.png")
    message = one_line_error(root)
    assert f"{root}: train/cat/link.png: broken symbolic link" in message
    assert "remove them or restore the targets" in message


# ---------------------------------------------------------------- the decoded cache
def test_skipped_files_do_not_change_the_cache_key(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(root)
    decoded: list[str] = []
    decode = image_files.decode_image
    monkeypatch.setattr(image_files, "decode_image", lambda f, n: decoded.append(n) or decode(f, n))
    (root / "train/cat/README.txt").write_text("notes")
    (root / "train/cat/.DS_Store").write_bytes(b"\0")
    (root / "test/empty").mkdir()
    second = load(root)
    assert decoded == []  # read from the cache
    assert torch.equal(first.train_images, second.train_images)


def test_a_bad_file_writes_no_cache_and_its_removal_loads(root: Path, decoded_cache_dir: Path) -> None:
    bad = root / "train/cat/bad.png"
    bad.write_bytes(b"")
    one_line_error(root)
    assert not decoded_cache_dir.exists() or not any(decoded_cache_dir.iterdir())
    bad.unlink()
    assert_clean(load(root))
    (cached,) = decoded_cache_dir.iterdir()
    save(solid(COLOURS["cat"]), bad)  # the file fixed: part of the data, decoded into the cache
    data = load(root)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1]
    assert list(decoded_cache_dir.iterdir()) == [cached]  # the same file, rewritten for the new key


def test_file_names_that_are_not_utf8_load_and_print(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Names from old archives (Latin-1, cp1252) are bytes Python cannot decode as UTF-8."""
    folder = os.fsencode(root / "train/cat")
    try:
        save(solid(COLOURS["cat"]), Path(os.fsdecode(folder + b"/caf\xe9.png")), format="PNG")
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    Path(os.fsdecode(folder + b"/r\xe9sum\xe9.txt")).write_text("notes")
    assert load(root).train_labels.tolist() == [0, 0, 0, 1, 1]
    (warning,) = warnings_in(caplog)
    assert "train/cat/r\\xe9sum\\xe9.txt" in warning
    warning.encode("utf-8")  # printable
    assert load(root).train_labels.tolist() == [0, 0, 0, 1, 1]  # from the cache
