"""fit/evaluate: pure loops over in-memory tensors that return plain metric dicts. They never talk
to MLflow; whoever calls them passes `on_metrics(metrics, step)` to receive what to record."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cifar_exp.config import TrainerConfig, UserError
from cifar_exp.data import ImageData, augment, batches, normalise
from cifar_exp.devices import unwrap_model

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, float], int], None]


class NonFiniteLossError(UserError):
    """The training loss became NaN or inf (usually a learning rate that is too high)."""


@dataclass
class Tensors:
    """A dataset moved to the training device and normalised once, ready to slice."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def prepare(data: ImageData, device: torch.device, channels_last: bool = False) -> Tensors:
    """uint8 -> normalised float32 on `device`, once per run (batches are then just slices)."""

    def move(images: torch.Tensor) -> torch.Tensor:
        x = normalise(images.to(device), data.mean, data.std, torch.float32)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return Tensors(
        move(data.train_images),
        data.train_labels.to(device),
        move(data.test_images),
        data.test_labels.to(device),
    )


class Lookahead:
    """hlb-cifar10/airbench's lookahead: every 5 steps the weights and BatchNorm statistics are
    pulled onto an exponential moving average of themselves, harder as training ends (decay
    0.95^5 * progress^3); at the last step the model becomes the average."""

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.total_steps = total_steps

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % 5 and step < self.total_steps:
            return
        decay = 1.0 if step >= self.total_steps else 0.95**5 * (step / self.total_steps) ** 3
        for average, current in zip(self.average.values(), model.state_dict().values(), strict=True):
            if current.dtype.is_floating_point:
                average.lerp_(current, 1 - decay)
                current.copy_(average)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_fraction: float) -> float:
    """Multiplier of the base learning rate at `step`. onecycle: linear 0.2 -> 1 over the warm-up,
    then linear 1 -> 0.07 to the end (airbench's shape)."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 - 0.93 * (step - warmup) / max(1, total_steps - warmup)


def _autocast(
    device: torch.device, enabled: bool, dtype: str = "bfloat16"
) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    lookahead: Lookahead | None,
    data: Tensors,
    cfg: TrainerConfig,
    generator: torch.Generator,
    epoch: int,
    step: int,
    on_metrics: MetricsCallback,
) -> tuple[dict[str, float], int]:
    """One pass over the shuffled training set. Returns epoch metrics and the new global step."""
    model.train()
    device = data.train_images.device
    window_loss = torch.zeros((), device=device)  # summed on the device: no host sync per step
    epoch_loss = torch.zeros((), device=device)
    window = epoch_steps = seen = 0
    started = time.perf_counter()
    bar = tqdm(
        total=len(data.train_images),
        unit="img",
        unit_scale=True,
        leave=False,
        desc=f"epoch {epoch}",
        disable=None,
        mininterval=0.5,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.autocast and cfg.autocast_dtype == "float16")
    for images, labels in batches(
        data.train_images, data.train_labels, cfg.batch_size, generator, cfg.drop_last
    ):
        if cfg.flip or cfg.translate:
            images = augment(images, cfg.flip, cfg.translate, generator)
        with _autocast(device, cfg.autocast, cfg.autocast_dtype):
            loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # float16 only: scaled so small gradients do not underflow
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if lookahead is not None:
            lookahead.update(model, step + 1)
        loss = loss.detach()
        window_loss += loss
        epoch_loss += loss
        step, window, epoch_steps = step + 1, window + 1, epoch_steps + 1
        seen += len(images)
        bar.update(len(images))
        if window == cfg.log_every_n_steps:
            mean = _finite(window_loss.item() / window, step, optimizer)  # this syncs the GPU
            log.info(f"[{epoch}, {epoch_steps:5d}] loss: {mean:.3f}")
            bar.set_postfix(loss=f"{mean:.3f}")
            on_metrics({"train/loss": mean}, step)
            window_loss.zero_()
            window = 0
    bar.close()
    loss_epoch = _finite(epoch_loss.item() / max(1, epoch_steps), step, optimizer)  # syncs the GPU
    seconds = time.perf_counter() - started
    metrics = {
        "train/loss_epoch": loss_epoch,
        "time/epoch_s": seconds,
        "throughput/images_per_s": seen / seconds,
    }
    return metrics, step


def _finite(value: float, step: int, optimizer: torch.optim.Optimizer) -> float:
    if not math.isfinite(value):
        lr = optimizer.param_groups[-1]["lr"]
        raise NonFiniteLossError(
            f"training loss became {value} by step {step} (lr={lr:g}); lower optimizer.lr or check the data"
        )
    return value


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
) -> tuple[dict[str, float], torch.Tensor]:
    """Test loss, accuracy (a fraction) and per-class accuracy; plus the confusion matrix
    (rows: true class, columns: predicted)."""
    model.eval()
    n_classes = len(classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=images.device)
    total_loss = torch.zeros((), device=images.device)
    for x, y in batches(images, labels, batch_size):
        with _autocast(images.device, autocast, autocast_dtype):
            logits = predict_logits(model, x, tta).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        confusion += torch.bincount(y * n_classes + logits.argmax(1), minlength=n_classes**2).view(
            n_classes, n_classes
        )
    confusion = confusion.cpu()
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    metrics = {
        "test/loss": total_loss.item() / len(images),
        "test/acc": (confusion.diag().sum() / confusion.sum()).item(),
    }
    metrics.update({f"test/acc/{name}": per_class[i].item() for i, name in enumerate(classes)})
    return metrics, confusion


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensors,
    classes: list[str],
    cfg: TrainerConfig,
    generator: torch.Generator,
    on_metrics: MetricsCallback,
) -> tuple[dict[str, float], torch.Tensor]:
    """Trains for cfg.epochs, evaluating after each; returns the last epoch's metrics and the
    confusion matrix."""
    steps_per_epoch = math.ceil(len(data.train_images) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = None
    if cfg.lr_schedule != "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(cfg.lr_schedule, s, total, cfg.warmup_fraction)
        )
    lookahead = Lookahead(model, total) if cfg.lookahead else None
    step, metrics, confusion = 0, {}, torch.zeros(0)
    for epoch in range(1, cfg.epochs + 1):
        if hasattr(unwrap_model(model), "start_epoch"):
            unwrap_model(model).start_epoch(epoch)
        metrics, step = train_epoch(
            model, optimizer, scheduler, lookahead, data, cfg, generator, epoch, step, on_metrics
        )
        test_metrics, confusion = evaluate(
            model,
            data.test_images,
            data.test_labels,
            classes,
            cfg.test_batch_size,
            cfg.tta,
            cfg.autocast,
        )
        metrics.update(test_metrics)
        log.info(
            f"epoch {epoch}/{cfg.epochs}: train loss {metrics['train/loss_epoch']:.3f}, "
            f"test loss {metrics['test/loss']:.3f}, test acc {100 * metrics['test/acc']:.1f}%, "
            f"{metrics['throughput/images_per_s']:,.0f} images/s"
        )
        on_metrics(metrics, step)
    return metrics, confusion
