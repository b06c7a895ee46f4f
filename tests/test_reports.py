"""The per-run figures, drawn in-process: one picture each, the images' pixels in it, and no
matplotlib (importing it alone cost a tracked run ~0.3 s; it is for the sweep plot only)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ok, start
from PIL import Image

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


# ---------------------------------------------------------------- which images the grids show
def class_sorted(per_class: int, classes: int = 10) -> torch.Tensor:
    """Labels as image folders and the bundled sample hold them: all of class 0, then class 1, ..."""
    return torch.arange(classes).repeat_interleave(per_class)


def test_the_grids_draw_every_class_the_same_way_each_time() -> None:
    labels = class_sorted(100)
    rng = torch.random.get_rng_state()
    shown = reports.grid_indices(labels)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the training's random state is untouched
    assert len(shown) == 32 and len(set(shown.tolist())) == 32
    assert sorted(set(labels[shown].tolist())) == list(range(10))
    assert labels[shown[:10]].tolist() == list(range(10))  # a round: one of each class, in order
    assert torch.equal(reports.grid_indices(labels.clone()), shown)  # the same data, the same images
    assert shown.tolist() != list(range(32))  # drawn, not the first of each class's folder order


@pytest.mark.parametrize(
    ("labels", "classes_shown"),
    [
        (class_sorted(2), 10),  # 20 images: all of them
        (class_sorted(1, classes=32), 32),  # 32 classes of one image: each once
        (class_sorted(3, classes=40), 32),  # more classes than tiles: 32 of them, one image each
        (torch.tensor([3, 3, 3, 3, 3, 0] * 10), 2),  # unbalanced: the rare class still shows
    ],
)
def test_the_grid_draw_covers_classes_at_every_size(labels: torch.Tensor, classes_shown: int) -> None:
    shown = reports.grid_indices(labels)
    assert len(shown) == min(32, len(labels)) and len(set(shown.tolist())) == len(shown)
    assert len(set(labels[shown].tolist())) == classes_shown


def test_the_figures_show_every_class_and_predictions_for_the_images_shown() -> None:
    """Each class one flat colour, sorted by class: the sample grid and the prediction grid hold
    all ten colours, and run.result_files predicts on the very images the grid shows (a network
    that reads the colour is right on all of them: no red caption)."""
    from cifar_exp.data import ImageData
    from cifar_exp.run import result_files
    from cifar_exp.train import Tensors

    labels = class_sorted(50)
    colours = solid_images(10)
    images = colours[labels]
    samples = reports.sample_files(images, labels, CLASSES)[reports.TRAIN_SAMPLES_ARTIFACT]
    found = {tuple(c) for c in np.asarray(Image.open(io.BytesIO(samples))).reshape(-1, 3).tolist()}
    assert all(tuple(colour[:, 0, 0].tolist()) in found for colour in colours)

    class ColourReader(torch.nn.Module):  # logits: 1 for the class whose colour the image has
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x[:, :, :1, :1].flatten(1)[:, None] == colours[None, :, :, 0, 0].float()).all(-1).float()

    data = ImageData(images, labels, images, labels, CLASSES, (0.0,) * 3, (1.0,) * 3, "synthetic")
    tensors = Tensors(images.float(), labels, images.float(), labels)
    files = result_files(ColourReader(), data, tensors, torch.eye(10, dtype=torch.int64))
    pixels = np.asarray(Image.open(io.BytesIO(files["figures/test_predictions.png"])))
    assert (pixels == reports.GREEN).all(-1).any() and not (pixels == reports.RED).all(-1).any()
    found = {tuple(c) for c in pixels.reshape(-1, 3).tolist()}
    assert all(tuple(colour[:, 0, 0].tolist()) in found for colour in colours)
