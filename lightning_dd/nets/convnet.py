"""ConvNet: the standard dataset-distillation backbone (Gidaris & Komodakis 2018; used by DC, DSA,
MTT arXiv 2203.11932 and DATM arXiv 2310.05773).

``depth`` blocks of [3x3 conv (``width`` channels) -> norm -> ReLU -> 2x2 average pool], then a
linear classifier. ``norm="instancenorm"`` is ``GroupNorm(width, width)`` with affine parameters,
as in the reference code (it has no running statistics, which keeps the unrolled student
purely functional).

Parity (``tests/parity/test_parity_trajectory_matching.py``): the reference's ``networks.py``
``ConvNet`` state dict loads here unchanged (same names, shapes and order; a flat vector has
``ReparamModule``'s layout) and gives its logits. Deviation kept: for 1-channel inputs the
reference pads the first conv by 3 (its 28x28 MNIST then runs at 32x32); here every conv pads by 1.
Only ``data=digits`` (8x8, not a reference setting) is 1-channel here, and its recorded numbers use
padding 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ConvNet(nn.Module):
    """ConvNet-``width``-``depth``.

    Args:
        channel: input channels C.
        num_classes: output logits K.
        im_size: input ``(H, W)``; each block halves it when pooling.
        width: channels of every conv (128 in the papers).
        depth: number of conv blocks (3 for 32x32).
        norm: ``instancenorm`` | ``batchnorm`` | ``groupnorm`` (4 groups) | ``none``.
        act: ``relu`` | ``leakyrelu`` | ``sigmoid``.
        pooling: ``avgpool`` | ``maxpool`` | ``none``.

    Shapes: ``(N, C, H, W)`` float -> ``(N, K)`` logits.

    Raises:
        ValueError: unknown norm/act/pooling, or an input too small for ``depth`` poolings.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(32, 32), width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", act: str = "relu", pooling: str = "avgpool"):
        super().__init__()
        acts = {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid}
        if act not in acts:
            raise ValueError(f"net.act must be one of {list(acts)}, got {act!r}")
        if pooling not in ("avgpool", "maxpool", "none"):
            raise ValueError(f"net.pooling must be avgpool|maxpool|none, got {pooling!r}")
        h, w = im_size
        layers: list[nn.Module] = []
        c = channel
        for d in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            layers += self._norm(norm, width)
            layers.append(acts[act]())
            if pooling != "none":
                if h < 2 or w < 2:
                    raise ValueError(f"input {im_size} too small for {depth} pooling blocks")
                layers.append(nn.AvgPool2d(2) if pooling == "avgpool" else nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    @staticmethod
    def _norm(norm: str, width: int) -> list[nn.Module]:
        if norm == "instancenorm":
            return [nn.GroupNorm(width, width, affine=True)]
        if norm == "groupnorm":
            return [nn.GroupNorm(4, width, affine=True)]
        if norm == "batchnorm":
            return [nn.BatchNorm2d(width)]
        if norm == "none":
            return []
        raise ValueError(f"net.norm must be instancenorm|groupnorm|batchnorm|none, got {norm!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
