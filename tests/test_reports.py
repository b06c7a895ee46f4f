"""The per-run figures, drawn in-process: one picture each, the images' pixels in it, and no
matplotlib (importing it alone cost a tracked run ~0.3 s; it is for the sweep plot only)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from conftest import ok, start

from cifar_exp import reports

CLASSES = [f"class_{i}" for i in range(10)]


def solid_images(n: int) -> torch.Tensor:
    """n uint8 3 x 32 x 32 images, each one flat colour."""
    colours = torch.arange(n * 3, dtype=torch.int64).view(n, 3, 1, 1) * 7 % 256
    return colours.to(torch.uint8).expand(n, 3, 32, 32).contiguous()


def test_image_grid_is_one_picture_holding_every_image_enlarged() -> None:
    images = solid_images(20)
    labels = torch.arange(20) % 10
    grid = reports.image_grid(images, labels, CLASSES, columns=8, scale=3)
    pixels = np.asarray(grid)
    assert grid.mode == "RGB"
    assert grid.width > 8 * 96 and grid.height > 3 * 96  # 8 columns, 3 rows of 96 px tiles
    found = {tuple(int(c) for c in colour) for colour in pixels.reshape(-1, 3)}
    for image in images:
        assert tuple(image[:, 0, 0].tolist()) in found


def test_prediction_grid_marks_right_and_wrong() -> None:
    images, labels = solid_images(4), torch.tensor([0, 1, 2, 3])
    predicted = torch.tensor([0, 1, 5, 5])  # two right, two wrong
    pixels = np.asarray(reports.image_grid(images, labels, CLASSES, predicted))
    assert (pixels == reports.GREEN).all(-1).any()
    assert (pixels == reports.RED).all(-1).any()


def test_confusion_image_shades_cells_by_count() -> None:
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion.fill_diagonal_(100)
    confusion[0, 1] = 7
    pixels = np.asarray(reports.confusion_image(confusion, CLASSES))
    assert (pixels == reports.DARK_BLUE).all(-1).any()  # the largest count
    assert (pixels == reports.LIGHT_BLUE).all(-1).any()  # zero


def test_figures_do_not_import_matplotlib(tmp_path: Path) -> None:
    code = (
        "import sys, torch; from cifar_exp import reports; "
        "reports.confusion_image(torch.eye(3, dtype=torch.int64), ['a', 'b', 'c']); "
        "reports.image_grid(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]), ['a', 'b']); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    ok(start([sys.executable, "-c", code], tmp_path).result())
