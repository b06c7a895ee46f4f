"""Figures and tables: image grids (the tutorial's imshow), the confusion matrix, per-class and
sweep tables, the sweep plot. Pure functions of tensors and lists; saving is the caller's job."""

from __future__ import annotations

import csv
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def close(fig: Any) -> None:
    plt.close(fig)


def image_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    predicted: torch.Tensor | None = None,
    columns: int = 8,
) -> Any:
    """uint8 N x 3 x H x W images titled with their class (and prediction: red when wrong)."""
    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        title, colour = classes[labels[i]], "black"
        if predicted is not None:
            title = f"{classes[labels[i]]}\n-> {classes[predicted[i]]}"
            colour = "green" if predicted[i] == labels[i] else "red"
        ax.set_title(title, fontsize=7, color=colour)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: torch.Tensor, classes: list[str]) -> Any:
    """Counts, rows = true class, columns = predicted class."""
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = confusion.max().item() or 1
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(len(classes)), torch.arange(len(classes))).tolist(),
        confusion.flatten().tolist(),
        strict=True,
    ):
        ax.text(
            j,
            i,
            count,
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > top / 2 else "black",
        )
    fig.tight_layout()
    return fig


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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def sweep_figure(rows: list[dict[str, Any]], numeric_keys: list[str], metric: str = "test/acc") -> Any:
    """One panel per swept numeric key: `metric` of every finished child against that key."""
    fig, axes = plt.subplots(
        1, max(1, len(numeric_keys)), figsize=(4.5 * max(1, len(numeric_keys)), 3.5), squeeze=False
    )
    for ax, key in zip(axes.flat, numeric_keys, strict=False):
        points = sorted(
            (float(r[key]), float(r[metric]))
            for r in rows
            if r.get(metric) not in (None, "") and r.get(key) not in (None, "")
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
