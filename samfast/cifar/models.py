"""CIFAR models used in the SAM literature, plus a small CNN for demos and tests.

Every model built by :func:`build_model` starts with :class:`Normalize`, so it takes images in
pixel space [0, 1] (as adversarial attacks and RobustBench expect) and normalizes inside.

| name      | params (10 classes) | source of the architecture                                |
|-----------|--------------------:|-----------------------------------------------------------|
| wrn16_8   | 10.96 M | Zagoruyko & Komodakis 2016, pre-activation blocks, no dropout     |
| wrn28_10  | 36.48 M | same                                                              |
| resnet18  | 11.17 M | He et al. 2016, ImageNet block layout with a 3x3 CIFAR stem        |
| resnet20/32/56 | 0.27/0.46/0.85 M | He et al. 2016 CIFAR ResNets, 16/32/64 channels, option-A shortcuts |
| vgg16_bn  | 14.72 M | Simonyan & Zisserman 2015 with BatchNorm, one linear classifier    |
| small_cnn | 0.05 M  | three conv-BN-ReLU-pool stages (24/48/96 channels): an epoch of 10k images in ~8 s on 2 CPU cores |
| small_cnn_w48 | 0.21 M | the same at twice the width (48/96/192): interpolates 2,500 images in 80 epochs on a CPU (the generalization experiment's model) |
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as (non-trained) buffers."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# -- Wide ResNet ----------------------------------------------------------------------------------

class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Invalid depth: {depth} (WRN depth must be 6n + 4)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                layers.append(_WideBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- ResNets ---------------------------------------------------------------------------------------

class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, option_a: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            if option_a:  # parameter-free: subsample and zero-pad channels (He et al. CIFAR)
                self.pad = cout - cin
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.BatchNorm2d(cout))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.shortcut is not None:
            s = self.shortcut(x)
        elif self.pad:
            s = x[:, :, ::self.stride, ::self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            s = x
        return F.relu(y + s)


class CifarResNet(nn.Module):
    """He et al.'s 6n+2-layer CIFAR ResNet (resnet20: n=3)."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"Invalid depth: {depth} (CIFAR ResNet depth must be 6n + 2)")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, cout in enumerate([16, 32, 64]):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, True))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for stage, cout in enumerate([64, 128, 256, 512]):
            for i in range(2):
                layers.append(_BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, False))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- VGG and the small CNN ---------------------------------------------------------------------------

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class VGG16BN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 24) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(3, w), nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * w, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "wrn16_8": lambda k: WideResNet(16, 8, k),
    "wrn28_10": lambda k: WideResNet(28, 10, k),
    "resnet18": ResNet18,
    "resnet20": lambda k: CifarResNet(20, k),
    "resnet32": lambda k: CifarResNet(32, k),
    "resnet56": lambda k: CifarResNet(56, k),
    "vgg16_bn": VGG16BN,
    "small_cnn": SmallCNN,
    "small_cnn_w48": lambda k: SmallCNN(k, width=48),
}


def build_model(name: str, num_classes: int = 10, dataset: str = "cifar10") -> nn.Module:
    """``Normalize`` followed by the named architecture; takes [0, 1] images."""
    if name not in MODELS:
        raise ValueError(f"Invalid model: {name!r} (choose from {', '.join(MODELS)})")
    return nn.Sequential(Normalize(CIFAR_MEAN[dataset], CIFAR_STD[dataset]),
                         MODELS[name](num_classes))
