"""Figures: image grids (the tutorial's imshow), the confusion matrix, the sweep plots, and the
per-class table a run keeps (tables.py writes it). Pure functions of tensors and lists; saving is
the caller's job.

The per-run figures are drawn with Pillow as one picture each (a few milliseconds); only the sweep
plot, once per sweep, uses matplotlib, imported there (importing it costs ~0.3 s)."""

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


def close(fig: Any) -> None:
    """Frees a matplotlib figure (sweep_figure's); Pillow images need nothing."""
    import matplotlib.pyplot as plt

    plt.close(fig)


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
    pixels = np.full((PAD_PX + rows * cell_h, PAD_PX + columns * cell_w, 3), 255, dtype=np.uint8)
    big = images.expand(-1, 3, -1, -1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    big = big.permute(0, 2, 3, 1).numpy()  # N x H' x W' x 3, what Pillow reads
    for i in range(n):
        x, y = PAD_PX + (i % columns) * cell_w, PAD_PX + (i // columns) * cell_h + caption
        pixels[y : y + h * scale, x : x + w * scale] = big[i]
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    true, guess = labels.tolist(), None if predicted is None else predicted.tolist()
    for i in range(n):
        x, y = PAD_PX + (i % columns) * cell_w, PAD_PX + (i // columns) * cell_h
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
    correct, total = confusion.diag(), confusion.sum(1)
    return [
        {
            "class": name,
            "correct": int(correct[i]),
            "total": int(total[i]),
            "accuracy": round(float(correct[i]) / max(1, int(total[i])), 4),
        }
        for i, name in enumerate(classes)
    ]


def _axis(values: list[Any]) -> tuple[list[float], list[str] | None, bool]:
    """Where each value goes on an axis: numbers at themselves (log scale when all positive and
    spanning more than 20x), anything else at 0, 1, 2... in first-seen order with its label."""
    numbers = [tables.number(v) for v in values]
    if all(n is not None for n in numbers):
        log = min(numbers) > 0 and max(numbers) > 20 * min(numbers)
        return numbers, None, log
    labels = list(dict.fromkeys(str(v) for v in values))
    return [float(labels.index(str(v))) for v in values], labels, False


def sweep_figure(
    rows: list[dict[str, Any]], keys: list[str], names: dict[str, str] | None = None, metric: str = "test/acc"
) -> Any:
    """`metric` of the children against what the sweep varies: a heatmap when exactly two keys
    vary over a grid, else one panel per key (every child a dot, the mean per value a line, the
    best a star). Sized to be read in MLflow's artifact preview: panels of about 480x360 px, at
    most two a row."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    names = names or {k: k for k in keys}
    done = [r for r in rows if tables.number(r.get(metric)) is not None]
    best = next((r for r in done if r.get("best")), None)
    if len(keys) == 2 and all(len({str(r[k]) for r in done}) > 1 for k in keys):
        return _heatmap(plt, done, keys, names, metric, best)
    columns = min(2, max(1, len(keys)))
    rows_n = (max(1, len(keys)) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.8 * columns, 3.6 * rows_n), dpi=100, squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs, labels, log = _axis([r[key] for r in done])
        ys = [float(r[metric]) for r in done]
        ax.plot(xs, ys, "o", color="tab:blue", alpha=0.6)
        means: dict[float, list[float]] = {}
        for x, y in zip(xs, ys, strict=True):
            means.setdefault(x, []).append(y)
        if len(means) < len(xs) or len(means) <= 12:  # a grid: join the means; a search: dots only
            line = sorted((x, sum(v) / len(v)) for x, v in means.items())
            ax.plot(*zip(*line, strict=True), "-", color="tab:blue", alpha=0.8, label="mean")
        if best is not None:
            ax.plot(xs[done.index(best)], float(best[metric]), "*", color="tab:red", ms=14, label="best")
            ax.legend(loc="best", fontsize=9)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0)
        elif log:
            ax.set_xscale("log")
        elif len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)))
        ax.set_xlabel(names[key], fontsize=11)
        ax.set_ylabel(metric, fontsize=11)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _heatmap(
    plt: Any, rows: list[dict[str, Any]], keys: list[str], names: dict[str, str], metric: str, best: Any
) -> Any:
    """`metric` over a two-key grid: one cell per pair of values (the mean if several runs), each
    written in its cell; the best boxed."""
    x_key, y_key = keys

    def rank(value: str) -> tuple[bool, float, str]:  # numbers by size, then words by name
        return tables.number(value) is None, tables.number(value) or 0.0, value

    order = {k: sorted({str(r[k]) for r in rows}, key=rank) for k in keys}
    grid = np.full((len(order[y_key]), len(order[x_key])), np.nan)
    cells: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        cell = (order[y_key].index(str(r[y_key])), order[x_key].index(str(r[x_key])))
        cells.setdefault(cell, []).append(float(r[metric]))
    for (i, j), values in cells.items():
        grid[i, j] = sum(values) / len(values)
    width = min(9.6, 2.4 + 1.1 * len(order[x_key]))
    fig, ax = plt.subplots(figsize=(width, min(7.2, 1.6 + 0.8 * len(order[y_key]))), dpi=100)
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label=metric)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), _ in cells.items():
        colour = "black" if grid[i, j] > middle else "white"
        ax.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", color=colour, fontsize=10)
    if best is not None:
        i, j = order[y_key].index(str(best[y_key])), order[x_key].index(str(best[x_key]))
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(order[x_key])), order[x_key])
    ax.set_yticks(range(len(order[y_key])), order[y_key])
    ax.set_xlabel(names[x_key], fontsize=11)
    ax.set_ylabel(names[y_key], fontsize=11)
    ax.set_title(f"{metric} (best boxed)", fontsize=11)
    fig.tight_layout()
    return fig


def group_figure(groups: list[dict[str, Any]], keys: list[str], names: dict[str, str], metric: str) -> Any:
    """Each config's mean `metric` over its seeds with its 95% confidence interval as error bars,
    and its mean test/acc beside it (never used to choose); the best config starred. Configs in
    the order of their values, labelled by them."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    def rank(group: dict[str, Any]) -> list[tuple[bool, float, str]]:  # numbers by size, then words
        values = [(tables.number(group[k]), str(group[k])) for k in keys]
        return [(n is None, n or 0.0, text) for n, text in values]

    shown = sorted((g for g in groups if g["n"]), key=rank)
    labels = [",".join(str(g[k]) for k in keys) or "config" for g in shown]
    fig, ax = plt.subplots(figsize=(min(9.6, 3.2 + 0.9 * len(shown)), 3.8), dpi=100)
    xs = np.arange(len(shown))
    measured = list(dict.fromkeys([metric, "test/acc"]))
    for offset, (name, colour) in zip(
        (-0.1, 0.1), zip(measured, ("tab:blue", "tab:orange"), strict=False), strict=False
    ):
        means = [g[f"{name}_mean"] for g in shown]
        errors = [
            [
                m - g[f"{name}_ci_low"] if g[f"{name}_ci_low"] != "" else 0
                for m, g in zip(means, shown, strict=True)
            ],
            [
                g[f"{name}_ci_high"] - m if g[f"{name}_ci_high"] != "" else 0
                for m, g in zip(means, shown, strict=True)
            ],
        ]
        label = f"{name} (mean, 95% CI)" + (", chooses" if name == metric else ", reported")
        ax.errorbar(xs + offset, means, yerr=errors, fmt="o", capsize=4, color=colour, label=label)
    best = next((i for i, g in enumerate(shown) if g["best"]), None)
    if best is not None:
        ax.plot(xs[best] - 0.1, shown[best][f"{metric}_mean"], "*", color="tab:red", ms=14, label="best")
    ax.set_xticks(xs, labels, rotation=20 if len(labels) > 4 else 0)
    ax.set_xlabel(", ".join(names[k] for k in keys))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def search_history_figure(
    values: list[float | None],
    metric: str = "test/acc",
    pruned: list[bool] | None = None,
    maximize: bool = True,
) -> Any:
    """A search's `metric` per trial in the order the trials ran, with the best so far (of the
    finished trials) as a step line; a pruned trial is drawn at its last reported value as a grey
    mark, None (a failed trial) as a red cross on the x axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pruned = pruned or [False] * len(values)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    trials = list(zip(range(1, len(values) + 1), values, pruned, strict=True))
    done = [(t, v) for t, v, p in trials if v is not None and not p]
    if done:
        xs, ys = zip(*done, strict=True)
        ax.plot(xs, ys, "o", label="finished")
        best = np.maximum.accumulate(ys) if maximize else np.minimum.accumulate(ys)
        ax.step(xs, best, where="post", label="best so far")
    stopped = [(t, v) for t, v, p in trials if v is not None and p]
    if stopped:
        xs, ys = zip(*stopped, strict=True)
        ax.plot(xs, ys, "v", color="grey", alpha=0.7, label="pruned (last value)")
    failed = [t for t, v, _ in trials if v is None]
    if failed:
        ax.plot(failed, [ax.get_ylim()[0]] * len(failed), "x", color="red", label="failed", clip_on=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers only
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if values:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- a run's files, ready to record
def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESSION)
    return out.getvalue()


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    out = io.BytesIO()
    fig.savefig(out, format="png")
    close(fig)
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
