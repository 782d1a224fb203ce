"""Evaluation architectures beyond ConvNet, in the forms dataset-distillation papers evaluate
with (DC/DSA/MTT "cross-architecture" nets, arXiv 2006.05929 / 2203.11932):

* ``AlexNet``: 5 conv layers (128-192-256-192-192), max pooling, one linear layer.
* ``VGG11``: the VGG-11 conv stack (64-M-128-M-256-256-M-512-512-M-512-512-M) with a
  single linear classifier; ``norm`` instance (default, as in MTT) or batch.
* ``ResNet18`` / ``ResNet50``: torchvision's ResNets; at CIFAR resolution (``H < 64``) the stem
  is a 3x3 stride-1 conv without max pooling (the standard CIFAR ResNet); at ImageNet
  resolution torchvision's 7x7/stride-2 stem. ``norm`` instance (GroupNorm with one group per
  channel, as in MTT's ResNet18) or batch (``ResNet18BN``).

All map ``(N, C, H, W)`` float -> ``(N, K)`` logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _norm_layer(norm: str):
    if norm == "instancenorm":
        return lambda c: nn.GroupNorm(c, c, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"net.norm must be instancenorm|batchnorm|none, got {norm!r}")


class AlexNet(nn.Module):
    """AlexNet for small images (DC benchmark variant). ``im_size`` ``(H, W)`` with H, W >= 8."""

    def __init__(self, channel: int, num_classes: int, im_size=(32, 32)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, 5, padding=4 if channel == 1 else 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        with torch.no_grad():
            n = self.features(torch.zeros(1, channel, *im_size)).numel()
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class VGG11(nn.Module):
    """VGG-11 conv stack + one linear layer (DC/MTT variant). ``norm``: instancenorm|batchnorm|none."""

    CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, channel: int, num_classes: int, im_size=(32, 32), norm: str = "instancenorm"):
        super().__init__()
        make_norm = _norm_layer(norm)
        layers: list[nn.Module] = []
        c = channel
        for i, v in enumerate(self.CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=3 if channel == 1 and i == 0 else 1), make_norm(v),
                           nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.features(torch.zeros(1, channel, *im_size)).numel()
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def resnet(depth: int, channel: int, num_classes: int, im_size=(32, 32), norm: str = "instancenorm") -> nn.Module:
    """torchvision ResNet-``depth`` (18 or 50) with the stem suited to ``im_size`` (see module doc)."""
    import torchvision

    fn = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
    net = fn(weights=None, num_classes=num_classes, norm_layer=_norm_layer(norm))
    if im_size[0] < 64:
        net.conv1 = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channel != 3:
        net.conv1 = nn.Conv2d(channel, 64, 7, stride=2, padding=3, bias=False)
    return net
