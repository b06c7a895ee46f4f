"""run(cfg): the one page that wires the pieces together."""

from __future__ import annotations

import functools
import logging
import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cifar_exp import checkpoints, reports, signals, sweep_refresh
from cifar_exp.config import build
from cifar_exp.data import ImageData
from cifar_exp.devices import cudnn_autotune, distributed, select_device, wrap_model
from cifar_exp.errors import TrialPruned
from cifar_exp.holdout import hold_out
from cifar_exp.precision import to_half
from cifar_exp.search import trial
from cifar_exp.tracking import identity, resumption, runs
from cifar_exp.tracking.identity import JobContext
from cifar_exp.tracking.store import tracking_uri
from cifar_exp.train import Loop, Tensors, predict_logits, prepare
from cifar_exp.validation import check_batch_size, validate

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=2)
def load_data(dataset_yaml: str, trust: bool) -> ImageData:
    """Loads a dataset once per process (the jobs of an in-process sweep share it), with its
    validation split held out of the training images."""
    node = OmegaConf.create(dataset_yaml)
    return hold_out(build(node, trust, _convert_="all"), node.val_size, node.split_seed)


@functools.lru_cache(maxsize=1)
def prepare_data(dataset_yaml: str, device: str, channels_last: bool, half: bool, trust: bool) -> Tensors:
    """The dataset normalised on its device (in float16 for trainer.half), once per process for
    all jobs that share it (training never writes into these tensors)."""
    dtype = torch.float16 if half else torch.float32
    return prepare(load_data(dataset_yaml, trust), torch.device(device), channels_last, dtype)


def run(
    cfg: DictConfig, tags: dict[str, str] | None = None, context: JobContext | None = None
) -> dict[str, float]:
    """Trains and evaluates one configuration (or continues an interrupted one); returns the
    final metrics. `tags` go on a new MLflow run (`mlflow.runName` names it); `context`: the sweep
    and search trial the job belongs to."""
    context = context or JobContext()
    if context.store_uri and context.store_uri != tracking_uri(cfg.mlflow):  # the sweep's store
        cfg = OmegaConf.merge(cfg, {"mlflow": {"tracking_uri": context.store_uri}})
    validate(cfg)  # every range, before anything is built or recorded
    previous = trial.earlier_run(cfg, context)  # in a re-run sweep or search: the job's earlier run
    if previous and previous.status == "FINISHED":
        log.info(f"skipped: run {previous.run_id} already finished this config")
        return previous.metrics
    resume_from, state, resume = resume_point(cfg, previous)  # checked before anything is written
    seed_everything(cfg.seed)
    device = select_device(cfg.device, cfg.trainer.batch_size)
    rank = distributed()[0]
    if rank:  # under DDP only rank 0 talks to MLflow, writes checkpoints and reports
        cfg = OmegaConf.merge(cfg, {"mlflow": {"enabled": False}, "trainer": {"checkpoint": False}})
        logging.getLogger("cifar_exp").setLevel(logging.WARNING)
    dataset = OmegaConf.to_yaml(cfg.dataset)  # the key of the per-process data caches
    data = load_data(dataset, cfg.trust)
    check_batch_size(cfg, len(data.train_images))
    trainer = cfg.trainer
    tensors = prepare_data(dataset, str(device), trainer.channels_last, trainer.half, cfg.trust)
    net, model, gpus = build_network(cfg, len(data.classes), tensors, device)
    optimizer = build(cfg.optimizer, cfg.trust)(param_groups(net, cfg.optimizer))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    reporting = search_reporting(context.trial)  # a search trial reports to its study each epoch
    continued = resume.run_id if resume else None  # a finished sweep that holds it is summarised again
    with (
        sweep_refresh.refreshed_after(cfg.mlflow, continued),
        runs.start_run(cfg, device.type, gpus, resume, run_tags(data, tags, context), context) as tracker,
    ):
        path = checkpoints.file_path(cfg.trainer.checkpoint)
        # the run id once the run is open; metrics flushed before each checkpoint, tagged after
        save = checkpoints.writer(path, tracker.wait_open, tracker.flush, tracker.set_checkpoint)
        loop = Loop(
            *(model, optimizer, tensors, data.classes, trainer, generator, tracker.log_metrics, save),
            **reporting,
        )
        if state:
            checkpoints.resume(loop, state)
            log.info(f"resumed from {resume_from}: epoch {loop.progress.epoch}, step {loop.progress.step}")
        elif tracker.enabled:
            record_inputs(tracker, data)
        with signals.deferred():  # Ctrl-C/SIGTERM: finish the step, checkpoint, then stop
            metrics, confusion = loop.fit()
        if rank == 0:
            report(confusion, data.classes, data.fallback)
        if tracker.enabled:
            tracker.log_files(result_files(net, data, tensors, confusion), "the figures, tables and weights")
    return metrics


def resume_point(
    cfg: DictConfig, previous: identity.PreviousRun | None
) -> tuple[str | None, dict[str, Any] | None, resumption.Resume | None]:
    """(resume_from, state, resume): what the run continues from (cfg.resume, or the earlier run of
    a re-run sweep that left a checkpoint), its checkpoint, and the run it may reopen (None: a new
    run); all None for a fresh start. A resume that may not proceed is one line (UserError)."""
    if previous and previous.pruned:  # the study never heard it: it does now, without training
        raise TrialPruned(previous.pruned)
    resume_from = cfg.resume or (previous.run_id if previous and previous.checkpoint else None)
    if not resume_from:
        return None, None, None
    state = checkpoints.load(identity.checkpoint_path(resume_from, cfg.mlflow))
    resume = resumption.check(cfg, resume_from, checkpoints.run_id(state), state["progress"])
    return resume_from, state, resume


def run_tags(data: ImageData, tags: dict[str, str] | None, context: JobContext) -> dict[str, str]:
    """The tags a new run starts with: where its data came from, the caller's `tags`, and a search
    trial's number (one child per trial, found again by it: previous_trial_run)."""
    extra_tags = {"data": data.source, **(tags or {})}
    if context.trial:
        extra_tags[identity.TRIAL_TAG] = str(context.trial.number)
    return extra_tags


def search_reporting(link: trial.TrialLink | None) -> dict[str, Any]:
    """Loop's arguments for a search trial: the reporter its pruner reads, `reports_per_epoch`
    times an epoch, and the test split each epoch when its metric is a test/ one. {} outside a
    search (one report an epoch, nobody listening)."""
    if link is None:
        return {}
    return {
        "on_report": trial.Reporter(link),
        "reports_per_epoch": link.reports_per_epoch,
        "test_each_epoch": link.metric.startswith("test/"),  # asked for by name
    }


def record_inputs(tracker: runs.RecordWriter, data: ImageData) -> None:
    """The first records of a new run: what trained it (the fallback may stand in), which images
    it held out to choose on, and a grid of its training images."""
    split = {f"split/{k}": v for k, v in (data.split or {"val_images": "0"}).items()}
    tracker.log_params({"data": data.name, **split})
    samples = reports.sample_files(data.train_images, data.train_labels, data.classes)
    tracker.log_files(samples, "the sample images")


def build_network(
    cfg: DictConfig, num_classes: int, tensors: Tensors, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(net, model, gpus): the network fitted to the data, in the run's precision and memory
    format, and the model that trains it (wrapped for several GPUs, compiled); the GPUs it uses."""
    trainer = cfg.trainer
    net = build(cfg.model, cfg.trust, num_classes=num_classes)
    net.fit_to_data(tensors.train_images)  # airbench: its first layer whitens patches of the data
    if trainer.half:  # after the whitening is set in float32, as airbench
        net = to_half(net)
    torch.backends.cudnn.benchmark = cudnn_autotune(device, trainer.drop_last)
    if trainer.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model, gpus = wrap_model(net, device, cfg.device.data_parallel)
    log.info(f"device: {device.type}" + (f", {gpus} GPU(s)" if gpus else ""))
    if trainer.compile:
        model = torch.compile(model)
    return net, model, gpus


def result_files(
    net: torch.nn.Module, data: ImageData, tensors: Tensors, confusion: torch.Tensor
) -> dict[str, str | bytes]:
    """The trained model's predictions on the test images its grid shows (a draw across classes),
    with the figures, tables and weights they go into."""
    net.eval()
    shown = reports.grid_indices(data.test_labels).to(tensors.test_images.device)
    predicted = predict_logits(net, tensors.test_images[shown]).argmax(1)
    test = (data.test_images, data.test_labels, data.classes)
    return reports.result_files(*test, predicted, confusion, net.state_dict())


def param_groups(net: torch.nn.Module, optimizer: DictConfig) -> list[dict]:
    """Trainable parameters. With optimizer.norm_bias_lr_scale, BatchNorm shifts get lr * scale and
    weight decay / scale, so their decay per step (lr * weight_decay) stays that of the other
    parameters (airbench)."""
    scale = optimizer.norm_bias_lr_scale
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    norm = [p for n, p in trainable if "norm" in n]
    if scale == 1.0 or not norm:
        return [{"params": [p for _, p in trainable]}]
    rest = [p for n, p in trainable if "norm" not in n]
    scaled = {"lr": optimizer.lr * scale, "weight_decay": optimizer.weight_decay / scale}
    return [{"params": norm, **scaled}, {"params": rest}]


def report(confusion: torch.Tensor, classes: list[str], fallback: str | None = None) -> None:
    """The tutorial's closing report, computed like the tutorial: 100 * correct // total; with a
    `fallback`, a last line saying the bundled sample stood in for the full dataset."""
    correct, total = confusion.diag(), confusion.sum(1)
    print(
        f"Accuracy of the network on the {int(total.sum())} test images: "
        f"{int(100 * correct.sum() // total.sum())} %"
    )
    for i, name in enumerate(classes):
        print(f"Accuracy of {name:>5s} : {int(100 * correct[i] // max(1, int(total[i]))):2d} %")
    if fallback:
        print(
            f"Trained on the bundled CIFAR-10 sample (5,000 images), not the full set: {fallback}. "
            "Figures are not comparable with the tutorial's."
        )
