"""Small BatchNorm backbones for multi-backbone statistics matching (G-VBSM, arXiv 2311.17950,
Sec. 4: ConvNet, ResNet-18, MobileNetV2, WRN-16-2 and ShuffleNetV2-0.5 as the CIFAR backbones).

* ``MobileNetV2``: torchvision's MobileNetV2 (Sandler et al., arXiv 1801.04381).
* ``ShuffleNetV2``: torchvision's ShuffleNetV2 x0.5 (Ma et al., arXiv 1807.11164).
* ``WRN16_2``: Wide-ResNet-16-2 (Zagoruyko & Komodakis, arXiv 1605.07146), pre-activation blocks.

``stem``: ``auto`` uses a stride-1 stem (no early down-sampling) for inputs smaller than 64 px, as
the CIFAR variants do, and the ImageNet stem otherwise; ``imagenet`` always keeps the ImageNet stem
(32x down-sampling overall for MobileNetV2 and ShuffleNetV2, torchvision's; 16x for WRN16_2, whose
ImageNet stem is a stride-2 conv + 2x2 max pooling; much cheaper at 32 px, used by CPU presets);
``small`` always uses the stride-1 stem. All map ``(N, C, H, W)`` float -> ``(N, K)`` logits and
use BatchNorm.
"""
from __future__ import annotations

import torch.nn as nn


def _small_stem(stem: str, im_size) -> bool:
    if stem not in ("auto", "imagenet", "small"):
        raise ValueError(f"net.stem must be auto|imagenet|small, got {stem!r}")
    return stem == "small" or (stem == "auto" and im_size[0] < 64)


def mobilenet_v2(channel: int, num_classes: int, im_size=(32, 32), stem: str = "auto", width_mult: float = 1.0):
    """torchvision MobileNetV2; see the module doc for ``stem``.

    Raises:
        ValueError: unknown ``stem``.
    """
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    first = net.features[0][0]
    stride = (1, 1) if _small_stem(stem, im_size) else (2, 2)
    if channel != 3 or stride != first.stride:
        net.features[0][0] = nn.Conv2d(channel, first.out_channels, 3, stride=stride, padding=1, bias=False)
    return net


def shufflenet_v2(channel: int, num_classes: int, im_size=(32, 32), stem: str = "auto"):
    """torchvision ShuffleNetV2 x0.5; see the module doc for ``stem``.

    Raises:
        ValueError: unknown ``stem``.
    """
    import torchvision

    net = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=num_classes)
    small = _small_stem(stem, im_size)
    if channel != 3 or small:
        out = net.conv1[0].out_channels
        net.conv1[0] = nn.Conv2d(channel, out, 3, stride=1 if small else 2, padding=1, bias=False)
    if small:
        net.maxpool = nn.Identity()
    return net


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.short = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return y + (x if self.short is None else self.short(o))


class WRN16_2(nn.Module):
    """Wide-ResNet-16-2 (depth 16, widen factor 2): 3 groups of 2 pre-activation blocks with
    32/64/128 channels, strides 1/2/2, global average pooling, linear classifier.

    Args:
        channel, num_classes, im_size: input channels, classes, ``(H, W)`` (>= 4 px).
        stem: see the module doc; the ImageNet form is a stride-2 3x3 conv + 2x2 max pooling (4x fewer
            positions per side).
    """

    def __init__(self, channel: int, num_classes: int, im_size=(32, 32), stem: str = "auto", widen: int = 2):
        super().__init__()
        small = _small_stem(stem, im_size)
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(channel, w[0], 3, 1, 1, bias=False) if small else nn.Sequential(
            nn.Conv2d(channel, w[0], 3, 2, 1, bias=False), nn.MaxPool2d(2))
        blocks, cin = [], w[0]
        for g, stride in zip(w[1:], (1, 2, 2)):
            blocks += [_WideBlock(cin, g, stride), _WideBlock(g, g, 1)]
            cin = g
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))))
