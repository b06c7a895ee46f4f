"""airbench94 on CPU, for a few batches: the network, its whitening layer, its width keys and
the training recipe's pieces (lookahead, BatchNorm-shift learning rate, TTA)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cifar_exp.config import build
from cifar_exp.models import Airbench94
from cifar_exp.run import param_groups
from cifar_exp.train import Lookahead, predict_logits
from tests.conftest import compose_config, run_cli


def airbench(*overrides: str) -> Airbench94:
    """conf/model/airbench94.yaml's network, with `overrides` (model.KEY=VALUE) applied."""
    return build(compose_config("model=airbench94", *overrides).model, num_classes=10)


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
    lookahead = Lookahead(net, total_steps=10)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(net, 10)  # last step: decay 1.0, the model becomes the average (here: start)
    assert torch.equal(net.weight, start)


def test_tta_averages_mirror_views() -> None:
    net = airbench("model.block1=8", "model.block2=8", "model.block3=8").eval()
    x = torch.randn(3, 3, 32, 32)
    expected = 0.5 * net(x) + 0.5 * net(x.flip(-1))
    assert torch.allclose(predict_logits(net, x, tta=1), expected)
    assert predict_logits(net, x, tta=2).shape == (3, 10)


def test_airbench94_experiment_trains_a_few_batches_on_cpu(tmp_path: Path) -> None:
    result = run_cli(
        "experiment=airbench94",
        "device=cpu",
        "dataset=synthetic",
        "dataset.train_size=512",
        "dataset.test_size=100",
        "trainer.epochs=1",
        "trainer.batch_size=256",
        "model.block1=16",
        "model.block2=32",
        "model.block3=32",
        "mlflow.enabled=false",
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"Accuracy of the network on the 100 test images: \d+ %", result.stdout)
