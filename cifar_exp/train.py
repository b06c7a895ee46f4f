"""fit/evaluate: pure loops over in-memory tensors that return plain metric dicts. They never talk
to MLflow; whoever calls them passes `on_metrics(metrics, step)` to receive what to record."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cifar_exp import signals
from cifar_exp.config import TrainerConfig
from cifar_exp.data import BatchOrder, ImageData, alternating_flip, augment, normalise, random_flip
from cifar_exp.devices import distributed, unwrap_model
from cifar_exp.errors import UserError
from cifar_exp.evaluation import describe, evaluate, mixed_precision
from cifar_exp.evaluation import predict_logits as predict_logits  # run.py and tests import it here
from cifar_exp.precision import sum_loss_hyperparameters
from cifar_exp.schedules import Lookahead, onecycle
from cifar_exp.step_clock import StepClock

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, float], int], None]
# (report, metrics, last): a search's pruner reads the validation metrics `reports_per_epoch` times
# an epoch; report r of epoch e is number (e - 1) * reports_per_epoch + r, the epoch's end the last
ReportCallback = Callable[[int, dict[str, float], bool], None]
# What every epoch logs (fit's metrics). With a validation split the epoch is evaluated on it
# (val/*) and the test split once, at the end (test/loss, test/acc, test/acc/<class>); without
# one, each epoch is evaluated on the test split, as the tutorial does (test/* every epoch).
EPOCH_METRICS = (
    "val/acc",
    "val/loss",
    "train/loss_epoch",
    "time/epoch_s",
    "time/eval_s",
    "throughput/images_per_s",
)
TEST_METRICS = ("test/acc", "test/loss")  # besides test/acc/<class>


class NonFiniteLossError(UserError):
    """The training loss became NaN or inf (usually a learning rate that is too high)."""


@dataclass
class Tensors:
    """A dataset moved to the training device and normalised once, ready to slice."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_images: torch.Tensor | None = None  # None: no validation split
    val_labels: torch.Tensor | None = None


def prepare(
    data: ImageData, device: torch.device, channels_last: bool = False, dtype: torch.dtype = torch.float32
) -> Tensors:
    """uint8 -> normalised `dtype` on `device`, once per run (batches are then just slices)."""

    def move(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        if channels_last:  # rearranged as uint8, a quarter of the bytes of the normalised floats
            images = images.contiguous(memory_format=torch.channels_last)
        return normalise(images, data.mean, data.std, dtype)

    train = (move(data.train_images), data.train_labels.to(device))
    test = (move(data.test_images), data.test_labels.to(device))
    val = (move(data.val_images), data.val_labels.to(device)) if data.has_val else (None, None)
    return Tensors(*train, *test, *val)


@dataclass
class Progress:
    """Where training stands; with the rest of Loop.state_dict() enough to continue exactly."""

    epoch: int = 1  # the epoch in progress, 1-based
    step: int = 0  # optimizer steps done in all
    epoch_step: int = 0  # steps done within `epoch`
    window_loss: float = 0.0  # summed loss of the steps since the last train/loss point
    window: int = 0
    epoch_loss: float = 0.0  # summed loss of the steps of this epoch
    epoch_rng: torch.Tensor | None = None  # data generator state before this epoch's shuffle

    def advance(self) -> None:
        """One optimizer step done."""
        self.step, self.epoch_step, self.window = self.step + 1, self.epoch_step + 1, self.window + 1


class LossSums:
    """The training loss summed on the device, so that no step waits for the host: over the
    logging window and over the epoch. Reading a mean syncs, averages over the DDP processes
    (which all read at the same step) and fails on NaN or inf."""

    def __init__(self, progress: Progress, device: torch.device, world: int) -> None:
        self.window = torch.full((), progress.window_loss, device=device)
        self.epoch = torch.full((), progress.epoch_loss, device=device)
        self.world = world

    def add(self, loss: torch.Tensor) -> None:
        self.window += loss
        self.epoch += loss

    def window_mean(self, steps: int, step: int, lr: float) -> float:
        """The window's mean loss over its `steps` steps; the next window starts at zero."""
        mean = _finite(self._mean(self.window) / steps, step, lr)
        self.window.zero_()
        return mean

    def epoch_mean(self, steps: int, step: int, lr: float) -> float:
        return _finite(self._mean(self.epoch) / max(1, steps), step, lr)

    def save_to(self, progress: Progress) -> None:
        """Keeps the partial sums in `progress`, for a checkpoint mid-epoch."""
        progress.window_loss, progress.epoch_loss = self.window.item(), self.epoch.item()

    def _mean(self, total: torch.Tensor) -> float:
        if self.world > 1:
            total = total.clone()
            torch.distributed.all_reduce(total)
            total /= self.world
        return total.item()


def _finite(value: float, step: int, lr: float) -> float:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} by step {step} (lr={lr:g}); lower optimizer.lr or check the data"
        )
    return value


def _progress_bar(progress: Progress, steps: int) -> tqdm:
    """The epoch's bar of `steps` steps, on a terminal only; it starts at the steps a resumed
    epoch already did."""
    return tqdm(
        total=steps,
        initial=progress.epoch_step,
        unit="step",
        leave=False,
        desc=f"epoch {progress.epoch}",
        disable=None,
        mininterval=0.5,
    )


class Loop:
    """fit() and its state. `checkpoint(state)` receives the loop's state (see state_dict) after
    every epoch and when a signal stops training; `on_metrics(metrics, step)` receives what to
    record; `on_report(report, metrics, last)`, `reports_per_epoch` times an epoch (last at the
    epoch's end, after its checkpoint) with the validation metrics, may stop training by raising
    (a search's pruner does); `test_each_epoch` evaluates the test split every epoch even with a
    validation split (a search told to choose on a test metric by name)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Tensors,
        classes: list[str],
        cfg: TrainerConfig,
        generator: torch.Generator,
        on_metrics: MetricsCallback,
        checkpoint: Callable[[dict], None] | None = None,
        on_report: ReportCallback | None = None,
        reports_per_epoch: int = 1,
        test_each_epoch: bool = False,
    ) -> None:
        self.model, self.optimizer, self.data, self.classes = model, optimizer, data, classes
        self.cfg, self.generator, self.on_metrics, self.checkpoint = cfg, generator, on_metrics, checkpoint
        self.on_report, self.reports_per_epoch = on_report, reports_per_epoch
        self.test_each_epoch = test_each_epoch or data.val_images is None
        self.rank, self.world = distributed()  # under DDP each process trains on its shard
        if cfg.batch_size % self.world:
            raise UserError(
                f"trainer.batch_size={cfg.batch_size} must divide evenly over the {self.world} DDP processes"
            )
        self.order = BatchOrder(cfg.batch_size, cfg.drop_last, self.rank, self.world)
        self.steps_per_epoch = self.order.steps(len(data.train_images))
        # fractional epochs (airbench's 9.9) as airbench counts them: the last epoch is cut short
        self.total_steps = total = math.ceil(self.steps_per_epoch * cfg.epochs)
        self.epochs = math.ceil(total / self.steps_per_epoch)
        # steps between a search's reports within an epoch (0: only at the epoch's end)
        every = math.ceil(self.steps_per_epoch / reports_per_epoch)
        self.report_every = every if reports_per_epoch > 1 else 0
        self.loss_scale = 1  # trainer.half: the loss summed over each process's batch
        if cfg.half:
            self.loss_scale = cfg.batch_size // self.world
            sum_loss_hyperparameters(optimizer, self.loss_scale)  # before the scheduler reads lr
        self.scheduler = None
        if cfg.lr_schedule != "constant":  # onecycle
            self.scheduler = LambdaLR(optimizer, lambda s: onecycle(s, total, cfg.warmup_fraction))
        self.lookahead = Lookahead(model, total) if cfg.lookahead else None
        self.random_flip = cfg.flip and not cfg.alternate_flip
        self.train_images = data.train_images
        if cfg.flip and cfg.alternate_flip:  # each image's first orientation, drawn once: the
            # generator is fresh here, so a resumed run (which restores it later) draws the same
            self.train_images = random_flip(data.train_images, generator)
        float16 = cfg.autocast and cfg.autocast_dtype == "float16"
        self.scaler = torch.amp.GradScaler(data.train_images.device.type, enabled=float16)
        self.progress = Progress()
        self._confusion = torch.zeros(0)  # the test split's, when an epoch evaluated it

    def state_dict(self) -> dict:
        """Plain tensors and numbers (no RNG states of the process: checkpoints.py adds those)."""
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "lookahead": self.lookahead.average if self.lookahead else None,
            "scaler": self.scaler.state_dict(),
            "progress": dict(vars(self.progress)),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.lookahead and state["lookahead"]:
            self.lookahead.average = state["lookahead"]
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        self.generator.set_state(state["generator"])

    def fit(self) -> tuple[dict[str, float], torch.Tensor]:
        """Trains to cfg.epochs, evaluating after each epoch (on the validation split, else on the
        test split), then the test split once; returns the last epoch's metrics with the test
        metrics, and the test confusion matrix. Resumed with no epoch left (stopped after its last
        checkpoint, while ending), it only evaluates, recording the test metrics if the end had
        not (the epochs' were recorded already). Log lines meanwhile print above the progress bar
        (from any thread: the record writer's too), never through it."""
        with logging_redirect_tqdm():
            return self._fit()

    def _fit(self) -> tuple[dict[str, float], torch.Tensor]:
        ended = self.progress.epoch > self.epochs  # whole epochs: a cut-short last one counts
        metrics = self.evaluate_epoch() if ended else {}
        while self.progress.epoch <= self.epochs:
            epoch = self.progress.epoch
            metrics = self.train_epoch()
            started = time.perf_counter()
            metrics.update(self.evaluate_epoch(), **{"time/eval_s": time.perf_counter() - started})
            log.info(f"epoch {epoch}/{self.epochs}: {describe(metrics)}")
            self.on_metrics(metrics, self.progress.step)
            self.progress = Progress(epoch=epoch + 1, step=self.progress.step)
            if self.checkpoint:
                self.checkpoint(self.state_dict())
            if self.on_report:
                self.on_report(epoch * self.reports_per_epoch, metrics, epoch == self.epochs)
        test, confusion = self.evaluate_test(metrics)
        if not self.test_each_epoch:  # the test split's one evaluation (else the last epoch's was)
            if not ended:
                log.info(f"test (once, at the end): {describe(test)}")
            self.on_metrics(test, self.progress.step)
        return {**metrics, **test}, confusion

    def evaluate_epoch(self) -> dict[str, float]:
        """What each epoch records: the validation metrics, and the test metrics too when there
        is no validation split (then they are the ones that choose) or test_each_epoch."""
        metrics: dict[str, float] = {}
        if self.data.val_images is not None:
            metrics, _ = self._evaluate(self.data.val_images, self.data.val_labels, "val")
        if self.test_each_epoch:
            test, self._confusion = self._evaluate(self.data.test_images, self.data.test_labels, "test")
            metrics.update(test)
        return metrics

    def evaluate_test(self, metrics: dict[str, float]) -> tuple[dict[str, float], torch.Tensor]:
        """The test metrics and confusion matrix of the model as it is: those of the last epoch's
        evaluation when it evaluated the test split, else evaluated now."""
        if self.test_each_epoch and "test/acc" in metrics:
            return {k: v for k, v in metrics.items() if k.startswith("test/")}, self._confusion
        return self._evaluate(self.data.test_images, self.data.test_labels, "test")

    def _evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, split: str
    ) -> tuple[dict[str, float], torch.Tensor]:
        model = unwrap_model(self.model) if self.world > 1 else self.model  # no collectives
        settings = (self.cfg.test_batch_size, self.cfg.tta, self.cfg.autocast, self.cfg.autocast_dtype)
        return evaluate(model, images, labels, self.classes, *settings, split)

    def _report_within_epoch(self) -> None:
        """A search's report between two of an epoch's ends: the validation metrics now, recorded
        at this step (evaluation does not touch the training's random draws or BatchNorm's
        statistics). Not training time: it runs outside the epoch's StepClock."""
        p = self.progress
        metrics = self.evaluate_epoch()
        self.model.train()
        self.on_metrics(metrics, p.step)
        number = (p.epoch - 1) * self.reports_per_epoch + p.epoch_step // self.report_every
        self.on_report(number, metrics, False)

    def train_epoch(self) -> dict[str, float]:
        """The rest of the current epoch (all of it unless resuming mid-epoch; the last one stops
        at the run's step count)."""
        cfg, p, images, labels = self.cfg, self.progress, self.train_images, self.data.train_labels
        self.model.train()
        unwrap_model(self.model).start_epoch(p.epoch)
        if cfg.flip and cfg.alternate_flip:
            images = alternating_flip(images, p.epoch)
        if p.epoch_rng is None:  # a fresh epoch; a resumed one replays its saved order
            p.epoch_rng = self.generator.get_state()
        epoch = self.order.epoch(images, labels, self.generator, p.epoch_rng, skip=p.epoch_step)
        epoch = itertools.islice(epoch, max(0, self.total_steps - p.step))
        losses = LossSums(p, images.device, self.world)
        bar = _progress_bar(p, min(self.steps_per_epoch, self.total_steps - (p.step - p.epoch_step)))
        clock, seen = StepClock(), 0
        for x, y in epoch:
            with clock:
                losses.add(self.train_step(x, y, p.step))
            p.advance()
            seen += len(x) * self.world  # images/s and batch size are the global ones
            bar.update()
            if p.window == cfg.log_every_n_steps:
                self._log_window(losses, bar, seen, clock)
            self._stop_if_signalled(losses, bar)
            if self.report_every and p.epoch_step % self.report_every == 0 and self.on_report:
                if p.epoch_step < self.steps_per_epoch and p.step < self.total_steps:  # not the epoch's end
                    with clock:  # a GPU's queued steps finish first: training time, not the report's
                        clock.wait_for(images.device)
                    self._report_within_epoch()
        bar.close()
        with clock:  # the device finishes the epoch's queued steps here: training time
            loss_epoch = losses.epoch_mean(p.epoch_step, p.step, self._lr())  # syncs
        return {
            "train/loss_epoch": loss_epoch,
            "time/epoch_s": clock.seconds,
            "throughput/images_per_s": seen / max(clock.seconds, 1e-9),
        }

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        cfg = self.cfg
        if self.random_flip or cfg.translate:
            images = augment(images, self.random_flip, cfg.translate, self.generator)
        with mixed_precision(images.device, cfg.autocast, cfg.autocast_dtype):
            logits = self.model(images).float()  # float16 under autocast or trainer.half: loss in float32
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        summed = loss * self.loss_scale if self.loss_scale != 1 else loss
        self.scaler.scale(summed).backward()  # autocast float16: scaled so small gradients do not underflow
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.lookahead is not None:
            self.lookahead.update(self.model, step + 1)
        return loss.detach()

    def _log_window(self, losses: LossSums, bar: tqdm, seen: int, clock: StepClock) -> None:
        """A train/loss point: the mean of the window's steps (this syncs the device)."""
        p = self.progress
        with clock:  # waiting for the device's queued steps is training time
            mean = losses.window_mean(p.window, p.step, self._lr())
        log.info(f"[{p.epoch}, {p.epoch_step:5d}] loss: {mean:.3f}")
        images_per_s = seen / max(clock.seconds, 1e-9)
        bar.set_postfix(loss=f"{mean:.3f}", img_s=f"{images_per_s:,.0f}")
        self.on_metrics({"train/loss": mean}, p.step)
        p.window = 0

    def _stop_if_signalled(self, losses: LossSums, bar: tqdm) -> None:
        """If Ctrl-C or SIGTERM arrived: checkpoint mid-epoch (with the partial sums), then stop."""
        if (stop := signals.take()) is None:
            return
        bar.close()
        losses.save_to(self.progress)
        if self.checkpoint:
            self.checkpoint(self.state_dict())
        raise stop

    def _lr(self) -> float:
        """The learning rate of the last parameter group, for error messages."""
        return self.optimizer.param_groups[-1]["lr"] * self.loss_scale
