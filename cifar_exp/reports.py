"""A run's figures and files: image grids (the tutorial's imshow), the confusion matrix, the
per-class table (tables.py writes it), the weights. Pure functions of tensors; saving is the
caller's job.

Each figure is drawn with Pillow as one picture (a few milliseconds), so a run never imports
matplotlib (~0.3 s); the sweep's plots, once per sweep, are sweep_plots.py's."""

from __future__ import annotations

import functools
import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cifar_exp import tables

FONT_PX = 12  # caption and label text height, px
LINE_PX = FONT_PX + 4  # one line of text with its spacing, px
PAD_PX = 6  # white space between tiles and around the picture, px
BLACK, GREEN, RED, WHITE = (0, 0, 0), (0, 128, 0), (200, 0, 0), (255, 255, 255)
# The ends of matplotlib's "Blues" colour map: no count, the largest count.
LIGHT_BLUE, DARK_BLUE = np.array([247, 251, 255]), np.array([8, 48, 107])

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

PNG_COMPRESSION = 1  # zlib level: ~3x faster than Pillow's default 6, files a few % larger
# Artifact paths of a run, read back by `cifar-exp predict`.
TRAIN_SAMPLES_ARTIFACT = "figures/train_samples.png"
WEIGHTS_ARTIFACT = "model/state_dict.pt"
CLASSES_ARTIFACT = "model/classes.json"


@functools.lru_cache(maxsize=1)
def _font() -> Font:
    return ImageFont.load_default(size=FONT_PX)  # Pillow's bundled font: no font files needed


def _fit(text: str, font: Font, width: float) -> str:
    """`text`, shortened with an ellipsis until it is at most `width` px wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: Any, align: str) -> None:
    """Text whose centre ("c"), left end ("l") or right end ("r") is at xy, centred vertically.
    (Pillow's own anchors need a FreeType font; this works with the bitmap fallback too.)"""
    font = _font()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = {"l": xy[0], "c": xy[0] - (right - left) / 2, "r": xy[0] - (right - left)}[align] - left
    draw.text((x, xy[1] - (top + bottom) / 2), text, fill=fill, font=font)


def image_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    predicted: torch.Tensor | None = None,
    columns: int = 8,
    scale: int = 3,
) -> Image.Image:
    """uint8 N x 3 x H x W images in one picture, each captioned with its class; with `predicted`,
    "class / -> prediction" in green when right, red when wrong. Images are enlarged `scale` times
    with nearest neighbour, so their pixels stay visible."""
    n, _, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    caption = LINE_PX * (1 if predicted is None else 2)
    cell_w, cell_h = w * scale + PAD_PX, caption + h * scale + PAD_PX
    picture = Image.new("RGB", (PAD_PX + columns * cell_w, PAD_PX + rows * cell_h), WHITE)
    draw = ImageDraw.Draw(picture)
    big = images.expand(-1, 3, -1, -1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    big = big.permute(0, 2, 3, 1).contiguous().numpy()  # N x H' x W' x 3, what Pillow reads
    true, guess = labels.tolist(), None if predicted is None else predicted.tolist()
    for i in range(n):
        x, y = PAD_PX + (i % columns) * cell_w, PAD_PX + (i // columns) * cell_h
        picture.paste(Image.fromarray(big[i]), (x, y + caption))
        lines, colour = [classes[true[i]]], BLACK
        if guess is not None:
            lines.append(f"-> {classes[guess[i]]}")
            colour = GREEN if guess[i] == true[i] else RED
        for k, line in enumerate(lines):
            text = _fit(line, _font(), w * scale)
            _text(draw, (x + w * scale / 2, y + (k + 0.5) * LINE_PX), text, colour, "c")
    return picture


def confusion_image(confusion: torch.Tensor, classes: list[str]) -> Image.Image:
    """Counts, rows = true class, columns = predicted class, each cell shaded by its count."""
    n, font = len(classes), _font()
    counts = confusion.cpu().numpy()
    largest = max(1, int(counts.max()))
    cell = max(36, int(font.getlength(str(largest))) + 10)  # px: the widest count fits
    names = [_fit(name, font, 160) for name in classes]
    label = int(max(font.getlength(name) for name in names)) + 6  # px of the widest class name
    left, top = PAD_PX + LINE_PX + label, PAD_PX
    bottom = top + n * cell  # the matrix's lower edge
    size = (left + n * cell + PAD_PX, bottom + label + LINE_PX + PAD_PX)

    shade = LIGHT_BLUE + (DARK_BLUE - LIGHT_BLUE) * (counts / largest)[..., None]  # n x n x 3
    cells = np.repeat(np.repeat(shade.astype(np.uint8), cell, 0), cell, 1)
    cells[::cell, :] = cells[:, ::cell] = 255  # 1 px white lines between cells
    pixels = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    pixels[top:bottom, left : left + n * cell] = cells
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    for i in range(n):
        for j in range(n):
            count = int(counts[i, j])
            colour = WHITE if count > largest / 2 else BLACK
            _text(draw, (left + (j + 0.5) * cell, top + (i + 0.5) * cell), str(count), colour, "c")
        _text(draw, (left - 4, top + (i + 0.5) * cell), names[i], BLACK, "r")

    # Column names read upwards under their column: drawn across a strip, then turned 90 degrees.
    strip = Image.new("RGB", (label, n * cell), WHITE)
    strip_draw = ImageDraw.Draw(strip)
    for j, name in enumerate(names):
        _text(strip_draw, (label - 4, (j + 0.5) * cell), name, BLACK, "r")
    picture.paste(strip.rotate(90, expand=True), (left, bottom))
    _text(draw, (left + n * cell / 2, bottom + label + LINE_PX / 2), "predicted", BLACK, "c")
    word = Image.new("RGB", (int(font.getlength("true")) + 4, LINE_PX), WHITE)
    _text(ImageDraw.Draw(word), (2, LINE_PX / 2), "true", BLACK, "l")
    picture.paste(word.rotate(90, expand=True), (PAD_PX, top + (n * cell - word.width) // 2))
    return picture


def per_class_rows(confusion: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    counts = zip(classes, confusion.diag().tolist(), confusion.sum(1).tolist(), strict=True)
    return [
        {"class": name, "correct": right, "total": total, "accuracy": round(right / max(1, total), 4)}
        for name, right, total in counts
    ]


# ---------------------------------------------------------------- a run's files, ready to record
def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESSION)
    return out.getvalue()


GRID_IMAGES = 32  # images in the sample and prediction grids: 4 rows of 8
GRID_SEED = 0  # the grids' own draw: the same images for the same data, whatever the run's seed


def grid_indices(labels: torch.Tensor, count: int = GRID_IMAGES) -> torch.Tensor:
    """Which images a grid shows: a fixed, seeded draw across classes, taken a round at a time
    (one image of each class, in class order, then another of each, ...), so every class is there
    when there are at least `count` images and at most `count` classes. Data sorted by class (image
    folders, the bundled sample) would otherwise show `count` images of its first class. Drawn with
    its own generator: the training's random state is not touched."""
    generator = torch.Generator().manual_seed(GRID_SEED)
    labels = labels.cpu()
    per_class = [
        members[torch.randperm(len(members), generator=generator)]
        for label in labels.unique(sorted=True)
        if len(members := (labels == label).nonzero().flatten())
    ]
    rounds = max((len(members) for members in per_class), default=0)
    drawn = [members[r] for r in range(rounds) for members in per_class if r < len(members)]
    return torch.stack(drawn[:count]) if drawn else torch.zeros(0, dtype=torch.int64)


def sample_files(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, bytes]:
    """A grid of training images drawn across classes (grid_indices), with their labels."""
    shown = grid_indices(labels)
    return {TRAIN_SAMPLES_ARTIFACT: png(image_grid(images[shown], labels[shown], classes))}


def result_files(
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    classes: list[str],
    predicted: torch.Tensor,
    confusion: torch.Tensor,
    state_dict: dict[str, torch.Tensor],
) -> dict[str, str | bytes]:
    """Test predictions (`predicted`: for the test images grid_indices draws) and the confusion
    matrix as figures, the per-class table, and the final weights (loadable into the plain model)."""
    shown = grid_indices(test_labels)
    rows = per_class_rows(confusion, classes)
    weights = io.BytesIO()
    torch.save({k: v.cpu() for k, v in state_dict.items()}, weights)
    return {
        "figures/test_predictions.png": png(
            image_grid(test_images[shown], test_labels[shown], classes, predicted.cpu())
        ),
        "figures/confusion_matrix.png": png(confusion_image(confusion, classes)),
        "tables/per_class_accuracy.md": tables.markdown_table(rows),
        "tables/per_class_accuracy.csv": tables.csv_table(rows),
        CLASSES_ARTIFACT: json.dumps({"classes": classes}, indent=2),
        WEIGHTS_ARTIFACT: weights.getvalue(),
    }
