"""The networks. Widths come in as keyword arguments, with their values in conf/model/*; each
layer takes its input size from the layer before it, so no pair of widths can disagree."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from cifar_exp.errors import UserError
from cifar_exp.ranges import MAX_EPOCHS, Range, Width


class Network(nn.Module):
    """What the training loop may ask of every network: logits for N x 3 x H x W normalised
    images, and two hooks it always calls, which do nothing unless a network overrides them."""

    def fit_to_data(self, train_images: torch.Tensor) -> None:
        """Called once before training (and before a resumed run loads its weights) with the
        normalised training images on the training device; for layers set from the data."""

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based), also when resuming mid-epoch."""


def as_network(module: nn.Module) -> nn.Module:
    """A network of your own is any nn.Module: the hooks it does not define do nothing."""
    for hook in ("fit_to_data", "start_epoch"):
        if not callable(getattr(module, hook, None)):
            setattr(module, hook, _no_hook)
    return module


def _no_hook(*_: object) -> None:
    """Network's hooks for a module without them (a plain function: the module stays picklable)."""


class CNN(Network):
    """The PyTorch tutorial's network: conv-pool-conv-pool-fc-fc-fc."""

    def __init__(
        self,
        *,
        conv1_out: Width,
        conv2_out: Width,
        fc1_out: Width,
        fc2_out: Width,
        kernel_size: Annotated[int, Range(1, 32, note="pixels; the 32x32 image is the widest")],
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        size = 32  # pixels of the input images
        for layer in ("conv1", "conv2"):
            if kernel_size > size:
                raise UserError(
                    f"model.kernel_size={kernel_size} is larger than the {size}x{size} feature map "
                    f"{layer} slides over; use kernel_size <= {size}"
                )
            size = (size - kernel_size + 1) // 2  # valid convolution, then 2x2 max-pool
            if size < 1:
                raise UserError(
                    f"model.kernel_size={kernel_size} leaves no pixels after {layer} and its pool; "
                    "use a smaller kernel_size"
                )
        self.conv1 = nn.Conv2d(3, conv1_out, kernel_size)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(conv1_out, conv2_out, kernel_size)
        self.fc1 = nn.Linear(conv2_out * size * size, fc1_out)
        self.fc2 = nn.Linear(fc1_out, fc2_out)
        self.fc3 = nn.Linear(fc2_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


# ---------------------------------------------------------------- airbench94
WHITENING_SAMPLE = 5000  # training images whose 2x2 patches set the whitening layer (airbench's)


class _BatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: no learned scale, a learned shift, tiny eps."""

    def __init__(self, num_features: int, momentum: float) -> None:
        super().__init__(num_features, eps=1e-12, momentum=1 - momentum)
        self.weight.requires_grad = False


class _Conv(nn.Conv2d):
    """3x3 'same' convolution, identity-initialised on its first in_channels filters."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class _ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, batchnorm_momentum: float) -> None:
        super().__init__()
        self.conv1 = _Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = _Conv(channels_out, channels_out)
        self.norm2 = _BatchNorm(channels_out, batchnorm_momentum)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Airbench94(Network):
    """Keller Jordan's airbench94 network (github.com/KellerJordan/cifar10-airbench): a frozen
    whitening 2x2 convolution, three conv groups, max-pool, a linear head scaled by 1/9."""

    def __init__(
        self,
        *,
        whiten_width: Annotated[
            int, Range(2, 24, note="even: +/- pairs of the 12 eigenvectors of 2x2x3 patches")
        ],
        block1: Width,
        block2: Width,
        block3: Width,
        batchnorm_momentum: Annotated[
            float, Range(0, 1, high_open=True, note="weight of the old running statistics")
        ],
        whiten_bias_epochs: Annotated[int, Range(0, MAX_EPOCHS)],
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.whiten_bias_epochs = whiten_bias_epochs
        if whiten_width % 2 or whiten_width > 24:
            raise UserError(
                f"model.whiten_width={whiten_width}: must be even and at most 24 "
                "(+/- pairs of the 12 eigenvectors of 3-channel 2x2 patches)"
            )
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from the data by fit_to_data()
        nn.init.zeros_(self.whiten.bias)  # as airbench: its Conv zeroes every bias
        self.layers = nn.Sequential(
            nn.GELU(),
            _ConvGroup(whiten_width, block1, batchnorm_momentum),
            _ConvGroup(block1, block2, batchnorm_momentum),
            _ConvGroup(block2, block3, batchnorm_momentum),
            nn.MaxPool2d(3),
            nn.Flatten(),
        )
        self.head = nn.Linear(block3, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.whiten(x))) / 9

    def fit_to_data(self, train_images: torch.Tensor) -> None:
        """airbench's recipe: whiten with the patches of 5000 training images. airbench takes the
        first 5000 of CIFAR-10's file, whose order is already random; here they are drawn at random
        from torch's seeded generator, since a folder of images comes sorted by class."""
        sample = torch.randperm(len(train_images), device=train_images.device)[:WHITENING_SAMPLE]
        self.init_whitening(train_images[sample])

    def start_epoch(self, epoch: int) -> None:
        """The whitening bias trains for the first `whiten_bias_epochs` epochs only."""
        self.whiten.bias.requires_grad = epoch <= self.whiten_bias_epochs

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten 2x2 patches of `images` (normalised, N x 3 x H x W):
        the eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), and their negatives."""
        c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w).float()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
        eigenvectors = eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
        scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
        half = self.whiten.out_channels // 2  # at most c*h*w, checked in __init__
        self.whiten.weight.copy_(torch.cat((scaled[:half], -scaled[:half])).to(self.whiten.weight))


# ---------------------------------------------------------------- ResNet-18 for 32x32 images
class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN where the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Network):
    """ResNet-18 (He et al. 2016) adapted to 32x32 images as CIFAR papers use it: a 3x3 stem
    without max-pool, then four stages of two basic blocks (32x32, 16x16, 8x8, 4x4), average pool,
    linear head. `width1`..`width4` are the stages' channels (the paper's 64, 128, 256, 512)."""

    def __init__(
        self,
        *,
        width1: Width = 64,  # channels of the stem and the 32x32 stage
        width2: Width = 128,  # channels of the 16x16 stage
        width3: Width = 256,  # channels of the 8x8 stage
        width4: Width = 512,  # channels of the 4x4 stage, also the head's input features
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width1, 3, padding=1, bias=False), nn.BatchNorm2d(width1), nn.ReLU()
        )
        stages, channels = [], width1
        for width, stride in zip((width1, width2, width3, width4), (1, 2, 2, 2), strict=True):
            stages += [_BasicBlock(channels, width, stride), _BasicBlock(width, width, 1)]
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(width4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
