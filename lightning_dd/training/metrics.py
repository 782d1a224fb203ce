"""Evaluation metrics the families share, on torchmetrics."""
from __future__ import annotations

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassStatScores


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` (put in eval mode) on ``images (N, C, H, W)``, ``labels (N,)``,
    batch by batch on the network's device: the correct predictions counted by torchmetrics'
    micro-averaged ``MulticlassStatScores`` (true positives, int64), divided by ``N`` in Python
    (float64: ``correct / N`` exactly as a fraction of two ints; torchmetrics' own accuracy divides in
    float32). Returns a fraction in ``[0, 1]`` (0.0 for ``N = 0``)."""
    net.eval()
    dev = next(net.parameters()).device
    stats = None
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        if not len(y):
            continue
        logits = net(x.to(dev)).cpu()
        if stats is None:
            stats = MulticlassStatScores(logits.shape[1], average="micro")
        stats.update(logits, y)
    correct = int(stats.compute()[0]) if stats is not None else 0
    return correct / max(1, len(labels))
