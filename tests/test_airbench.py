"""airbench94 on CPU, for a few batches: the network, its whitening layer, its width keys and
the training recipe's pieces (lookahead, BatchNorm-shift learning rate, TTA, alternating flip,
fractional epochs, airbench's float16 precision, cuDNN autotuning)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, compose_config, synthetic
from omegaconf import OmegaConf

from cifar_exp import train
from cifar_exp.config import TrainerConfig, build
from cifar_exp.data import load_synthetic
from cifar_exp.devices import cudnn_autotune
from cifar_exp.errors import UserError
from cifar_exp.models import Airbench94, Network
from cifar_exp.precision import to_half
from cifar_exp.run import param_groups
from cifar_exp.schedules import Lookahead
from cifar_exp.train import Loop, Tensors, predict_logits
from cifar_exp.validation import validate


def airbench(*overrides: str) -> Airbench94:
    """conf/model/airbench94.yaml's network, with `overrides` (model.KEY=VALUE) applied."""
    return build(compose_config("model=airbench94", *overrides).model, True, num_classes=10)


def test_whitening_layer_decorrelates_patches() -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 1, 32, 32)  # strongly correlated channels and neighbours
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn_like(base), torch.randn_like(base)], 1)
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    net = airbench()
    net.init_whitening(images, eps=0.0)
    out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])  # the + half of the pairs
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert torch.equal(net.whiten.weight[12:], -net.whiten.weight[:12])
    assert not net.whiten.weight.requires_grad


def test_whitening_bias_starts_at_zero() -> None:
    assert torch.equal(airbench().whiten.bias, torch.zeros(24))


def class_sorted_images(per_class: int = 1000) -> torch.Tensor:
    """8x8 images as an image folder gives them: sorted by class, each class a different colour
    cast and contrast, so the first half of the set holds half of the classes only."""
    gen = torch.Generator().manual_seed(0)
    classes = []
    for k in range(10):
        scale = torch.tensor([1.0 + k, 1.0, 0.2 + 0.3 * k]).view(1, 3, 1, 1)
        classes.append(torch.randn(per_class, 3, 8, 8, generator=gen) * scale + k / 3)
    return torch.cat(classes)


def test_whitening_samples_all_classes_at_random_seeded() -> None:
    images = class_sorted_images()

    def misfit(weight: torch.Tensor) -> float:
        """How far the layer's outputs over the whole set are from white (covariance I)."""
        out = torch.nn.functional.conv2d(images, weight[:12])  # the + half of the pairs
        flat = out.permute(1, 0, 2, 3).reshape(12, -1)
        return (flat @ flat.T / flat.shape[1] - torch.eye(12)).norm().item()

    def fitted(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        net = airbench()
        net.fit_to_data(images)
        return net.whiten.weight

    first = airbench()
    first.init_whitening(images[:5000])  # the old choice: the first 5 classes only
    assert misfit(fitted(0)) < 0.5 < 5 < misfit(first.whiten.weight)
    assert torch.equal(fitted(0), fitted(0)) and not torch.equal(fitted(0), fitted(1))


def test_widths_are_keys_and_propagate() -> None:
    net = airbench("model.block1=16", "model.block2=32", "model.block3=48")
    assert net.layers[1].conv1.out_channels == 16 and net.layers[2].conv1.in_channels == 16
    assert net.head.in_features == 48
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_norm_biases_get_the_scaled_rate_and_matching_decay() -> None:
    net = airbench("model.block1=8", "model.block2=8", "model.block3=8")
    optimizer = OmegaConf.create({"lr": 1.5, "weight_decay": 0.001, "norm_bias_lr_scale": 64.0})
    groups = param_groups(net, optimizer)
    norm, rest = groups
    assert norm["lr"] == 96.0 and norm["lr"] * norm["weight_decay"] == 1.5 * 0.001
    assert all(p.ndim == 1 for p in norm["params"])  # BatchNorm shifts only
    assert len(norm["params"]) + len(rest["params"]) == len([p for p in net.parameters() if p.requires_grad])


def test_lookahead_ends_on_the_average() -> None:
    net = torch.nn.Linear(2, 2)
    lookahead = Lookahead(net, total_steps=12)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(net, 12)  # last step: decay 1.0, the model becomes the average (here: start)
    assert torch.equal(net.weight, start)


def test_lookahead_last_step_on_a_multiple_of_5_takes_its_pull_first() -> None:
    net = torch.nn.Linear(2, 2)
    lookahead = Lookahead(net, total_steps=10)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(net, 10)  # as airbench: the step-10 pull (decay 0.95^5), then the average
    assert torch.allclose(net.weight, start + (1 - 0.95**5))


def test_tta_averages_mirror_views() -> None:
    net = airbench("model.block1=8", "model.block2=8", "model.block3=8").eval()
    x = torch.randn(3, 3, 32, 32)
    expected = 0.5 * net(x) + 0.5 * net(x.flip(-1))
    assert torch.allclose(predict_logits(net, x, tta=1), expected)
    assert predict_logits(net, x, tta=2).shape == (3, 10)


HALF = ["trainer.half=true", "trainer.autocast=false"]


@pytest.mark.parametrize("precision", [[], HALF], ids=["autocast", "half"])
def test_airbench94_experiment_trains_a_few_batches_on_cpu(main_in_process, precision: list[str]) -> None:
    result = main_in_process(
        "experiment=airbench94",
        *synthetic(train=128, test=50, epochs=1.5, batch=64, log_every=None),  # 3 steps, epoch 2 cut short
        "model.block1=8",
        "model.block2=8",
        "model.block3=8",
        "mlflow.enabled=false",
        *precision,
    )
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2:" in result.stdout
    assert re.search(r"Accuracy of the network on the 50 test images: \d+ %", result.stdout)


# ---------------------------------------------------------------- the training loop's options
class Tiny(Network):
    """A linear classifier over the pixels: fast, and with the hooks every network has."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def tiny_data(n: int = 40, classes: int = 10) -> Tensors:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.arange(n) % classes
    return Tensors(images, labels, images[:16], labels[:16])


def make_loop(
    cfg: TrainerConfig,
    network: Callable[[int], torch.nn.Module] = Tiny,
    data: Tensors | None = None,
    on_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
    checkpoint: Callable[[dict], None] | None = None,
    **options: Any,
) -> Loop:
    """A Loop over `data` (tiny_data()) for `network(num_classes)`, built from seed 0; `options`
    are Loop's keyword arguments."""
    torch.manual_seed(0)
    data = data or tiny_data()
    classes = [str(k) for k in range(int(data.train_labels.max()) + 1)]
    net = network(len(classes))
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.85, nesterov=True, weight_decay=5e-3)
    generator = torch.Generator().manual_seed(0)
    return Loop(net, optimizer, data, classes, cfg, generator, on_metrics, checkpoint, **options)


def trainer(**changes) -> TrainerConfig:
    return TrainerConfig(batch_size=8, checkpoint=False, test_batch_size=100, **changes)


def test_alternating_flip_shows_each_image_both_ways_round() -> None:
    data = tiny_data(n=16, classes=16)  # label i is image i
    loop = make_loop(trainer(epochs=3, flip=True, alternate_flip=True), data=data)
    seen: dict[int, torch.Tensor] = {}

    def step(images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        for x, y in zip(images, labels.tolist(), strict=True):
            seen[(loop.progress.epoch, y)] = x
        return torch.zeros(())

    loop.train_step = step
    loop.fit()
    original = data.train_images
    mirrored = [torch.equal(seen[(1, i)], original[i].flip(-1)) for i in range(16)]
    assert all(mirrored[i] or torch.equal(seen[(1, i)], original[i]) for i in range(16))
    assert 0 < sum(mirrored) < 16  # epoch 1: each image one way round, drawn at random
    for i in range(16):
        assert torch.equal(seen[(2, i)], seen[(1, i)].flip(-1))  # epoch 2: all the other way
        assert torch.equal(seen[(3, i)], seen[(1, i)])


def test_fractional_epochs_stop_at_the_step_count_and_evaluate_the_last_epoch() -> None:
    evaluated, checkpoints = [], []
    cfg = trainer(epochs=2.5, lr_schedule="onecycle", lookahead=True)  # 40 images: 5 steps an epoch
    loop = make_loop(
        cfg,
        on_metrics=lambda metrics, step: evaluated.append(step) if "test/acc" in metrics else None,
        checkpoint=lambda state: checkpoints.append(state["progress"]["step"]),
    )
    loop.fit()
    assert evaluated == checkpoints == [5, 10, 13]  # ceil(2.5 * 5) steps, the third epoch cut short
    assert loop.scheduler.last_epoch == 13
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.07)  # the schedule's end


def test_a_cut_short_last_epoch_resumes_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 11 (epoch 3 of 2.5, with alternating flips, translation, lookahead and
    BatchNorm), then resumed from its checkpoint: the same metrics and weights as without a stop."""
    cfg = trainer(
        epochs=2.5, flip=True, alternate_flip=True, translate=2, lookahead=True, lr_schedule="onecycle"
    )

    def small(num_classes: int) -> Airbench94:
        return airbench("model.block1=8", "model.block2=8", "model.block3=8")

    whole = make_loop(cfg, small)
    expected, _ = whole.fit()

    saved = []
    cut = make_loop(cfg, small, checkpoint=lambda state: saved.append(copy.deepcopy(state)))
    stop_after_11 = lambda: KeyboardInterrupt() if cut.progress.step == 11 else None  # noqa: E731
    monkeypatch.setattr(train.signals, "take", stop_after_11)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    monkeypatch.undo()
    assert saved[-1]["progress"]["epoch"] == 3 and saved[-1]["progress"]["epoch_step"] == 1
    resumed = make_loop(cfg, small)
    resumed.load_state_dict(saved[-1])
    metrics, _ = resumed.fit()
    assert resumed.progress.step == 13
    assert {k: metrics[k] for k in ("train/loss_epoch", "test/loss", "test/acc")} == {
        k: expected[k] for k in ("train/loss_epoch", "test/loss", "test/acc")
    }
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_keeps_batchnorm_in_float32() -> None:
    net = to_half(airbench("model.block1=8", "model.block2=8", "model.block3=8"))
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == (torch.float32 if "norm" in name else torch.float16), name
    logits = net(torch.randn(2, 3, 32, 32).half())
    logits.float().sum().backward()
    assert logits.dtype == torch.float16 and net.layers[1].norm1.bias.grad.dtype == torch.float32


def test_half_sums_the_loss_and_takes_the_same_sgd_steps() -> None:
    """trainer.half's summed loss with lr / batch and weight_decay * batch: the mean loss's steps
    (shown in float32, where the two differ by rounding only)."""
    mean = make_loop(trainer(epochs=2, lr_schedule="onecycle"))
    summed = make_loop(trainer(epochs=2, lr_schedule="onecycle", half=True))
    assert summed.optimizer.param_groups[0]["lr"] == 0.05 / 8 * 0.2  # the warm-up's first factor
    assert not summed.scaler.is_enabled()  # no GradScaler, no read-back of its scale each step
    mean.fit()
    summed.fit()
    for a, b in zip(mean.model.parameters(), summed.model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_half_needs_sgd_and_no_autocast() -> None:
    with pytest.raises(UserError, match="trainer.autocast=false"):
        validate(compose_config("trainer.half=true", "trainer.autocast=true"))
    net = Tiny(10)
    adam = torch.optim.Adam(net.parameters())
    with pytest.raises(UserError, match="optimizer=sgd"):
        Loop(net, adam, tiny_data(), list("0123456789"), trainer(half=True), torch.Generator(), print)


@pytest.mark.parametrize("epochs", ["0", "-1.5", "nan"])
def test_epochs_must_be_positive(epochs: str) -> None:
    with pytest.raises(UserError, match="trainer.epochs"):
        validate(compose_config(f"trainer.epochs={epochs}"))


def test_cudnn_autotunes_fixed_shapes_on_cuda_only() -> None:
    assert cudnn_autotune(torch.device("cuda"), fixed_shapes=True)
    assert not cudnn_autotune(torch.device("cuda"), fixed_shapes=False)  # a smaller last batch
    assert not cudnn_autotune(torch.device("cpu"), fixed_shapes=True)


# ---------------------------------------------------------------- benchmarks/airbench_anchor.py
def anchor_module():
    path = REPO / "benchmarks" / "airbench_anchor.py"
    spec = importlib.util.spec_from_file_location("airbench_anchor", path)
    module = sys.modules["airbench_anchor"] = importlib.util.module_from_spec(spec)  # for its dataclass
    spec.loader.exec_module(module)
    return module


def test_anchor_writes_our_images_as_airbench_reads_them(tmp_path: Path) -> None:
    anchor = anchor_module()
    data = load_synthetic(
        train_size=60, test_size=20, noise=0.1, seed=0, root="", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    data.train_labels, order = data.train_labels.sort()  # as an image folder loads: by class
    data.train_images = data.train_images[order]
    folder = anchor.write_reference_data(data, tmp_path)
    anchor.check_reference_data(folder)
    train = torch.load(tmp_path / "cifar10" / "train.pt", weights_only=True)
    assert train["images"].shape == (60, 32, 32, 3) and train["classes"] == data.classes
    assert len(train["labels"][:10].unique()) > 3  # the first (airbench's whitening sample) mix classes

    def pairs(images: torch.Tensor, labels: torch.Tensor) -> set[tuple[bytes, int]]:
        return {(x.numpy().tobytes(), int(y)) for x, y in zip(images, labels, strict=True)}

    ours = pairs(data.train_images.permute(0, 2, 3, 1).contiguous(), data.train_labels)
    assert pairs(train["images"], train["labels"]) == ours  # the same images and labels, reordered
    test = torch.load(tmp_path / "cifar10" / "test.pt", weights_only=True)
    assert torch.equal(test["images"], data.test_images.permute(0, 2, 3, 1))


@pytest.mark.slow
def test_anchor_smoke_runs_ours_on_cpu(tmp_path: Path) -> None:
    """--smoke: tiny generated images, one seed of each of our variants for a few steps; the
    reference is skipped (it needs CUDA) but its data files are written and read back."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "airbench_anchor.py"), "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reference: skipped" in result.stdout
    for name in ("airbench94", "airbench94_half"):
        assert re.search(rf"^{name} +1 +\d+\.\d\d% ", result.stdout, re.MULTILINE), result.stdout
    record = json.loads((tmp_path / "anchor.json").read_text())
    assert set(record["summary"]) == {"airbench94", "airbench94_half"}
    assert all(run["train_s"] > 0 for runs in record["runs"].values() for run in runs)


@pytest.mark.parametrize("test_each_epoch", [False, True], ids=["val only", "test named"])
def test_reports_within_epochs_record_each_point_once(test_each_epoch: bool) -> None:
    """With a validation split and a search reporting twice an epoch: val/acc at each report, the
    test split at the end only (or, named by the search, at each report too), no point twice."""
    data = tiny_data()  # 40 images in batches of 8: 5 steps an epoch, reports after 3 and 5
    data.val_images, data.val_labels = data.test_images, data.test_labels
    points: list[tuple[str, int]] = []
    reports: list[tuple[int, bool]] = []
    loop = make_loop(
        trainer(epochs=2),
        data=data,
        on_metrics=lambda metrics, step: points.extend((k, step) for k in metrics),
        on_report=lambda report, metrics, last: reports.append((report, last)),
        reports_per_epoch=2,
        test_each_epoch=test_each_epoch,
    )
    loop.fit()
    assert len(points) == len(set(points)), "a metric recorded twice at one step"
    assert reports == [(1, False), (2, False), (3, False), (4, True)]
    assert sorted(step for key, step in points if key == "val/acc") == [3, 5, 8, 10]
    test_steps = sorted(step for key, step in points if key == "test/acc")
    assert test_steps == ([3, 5, 8, 10] if test_each_epoch else [10])
