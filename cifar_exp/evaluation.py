"""Evaluation: logits (with test-time augmentation), a split's loss, accuracy and confusion
matrix as plain metric dicts, and the line a log prints for them. No training, no tracking."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.data import batches


def chosen_metric(name: str, logged: list[dict[str, Any]]) -> str:
    """The metric that chooses, as runs logged it: a val/ metric of runs that logged no val/
    metric at all (no validation split: dataset.val_size=0) is its test/ twin, and whatever
    chooses on it then chooses on the test split (and says so)."""
    if name.startswith("val/") and logged and not any(k.startswith("val/") for m in logged for k in m):
        return "test/" + name.removeprefix("val/")
    return name


def mixed_precision(device: torch.device, enabled: bool, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA when enabled; nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, tta: int = 0) -> torch.Tensor:
    """Logits for a batch; tta 1 averages with the mirror image, 2 also with 1-pixel shifts."""
    logits = model(images)
    if tta >= 1:
        logits = 0.5 * logits + 0.5 * model(images.flip(-1))
    if tta >= 2:
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        h, w = images.shape[-2:]
        shifted = [padded[..., :h, :w], padded[..., 2 : h + 2, 2 : w + 2]]
        shifted_logits = [0.5 * model(x) + 0.5 * model(x.flip(-1)) for x in shifted]
        logits = 0.5 * logits + 0.5 * torch.stack(shifted_logits).mean(0)
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    batch_size: int,
    tta: int = 0,
    autocast: bool = False,
    autocast_dtype: str = "bfloat16",
    split: str = "test",
) -> tuple[dict[str, float], torch.Tensor]:
    """`split`/loss, `split`/acc (a fraction, computed from the counts: 301/1000 is 0.301) and, for
    the test split, test/acc/<class>; plus the confusion matrix (rows: true class, columns:
    predicted)."""
    model.eval()
    n_classes = len(classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=images.device)
    total_loss = torch.zeros((), device=images.device)
    for x, y in batches(images, labels, batch_size):
        with mixed_precision(images.device, autocast, autocast_dtype):
            logits = predict_logits(model, x, tta).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        pairs = y * n_classes + logits.argmax(1)  # true class * n_classes + predicted
        confusion += torch.bincount(pairs, minlength=n_classes**2).view(n_classes, n_classes)
    confusion = confusion.cpu()
    correct, total = confusion.diag().tolist(), confusion.sum(1).tolist()
    metrics = {f"{split}/loss": total_loss.item() / len(images), f"{split}/acc": sum(correct) / sum(total)}
    if split == "test":
        metrics.update({f"test/acc/{name}": correct[i] / max(1, total[i]) for i, name in enumerate(classes)})
    return metrics, confusion


def describe(metrics: dict[str, float]) -> str:
    """The log line's part for an epoch or the final test: "train loss 1.234, val loss 1.100, val
    acc 60.1%, 5,000 images/s"."""
    parts = []
    if "train/loss_epoch" in metrics:
        parts.append(f"train loss {metrics['train/loss_epoch']:.3f}")
    for split in ("val", "test"):
        if f"{split}/acc" in metrics:
            loss, acc = metrics[f"{split}/loss"], 100 * metrics[f"{split}/acc"]
            parts.append(f"{split} loss {loss:.3f}, {split} acc {acc:.1f}%")
    if "throughput/images_per_s" in metrics:
        parts.append(f"{metrics['throughput/images_per_s']:,.0f} images/s")
    return ", ".join(parts)
