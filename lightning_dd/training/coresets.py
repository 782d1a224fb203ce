"""Greedy coreset selection on feature vectors (herding, k-center), shared by the image selection
baselines and the graph family's node coresets (GCond Sec. 5.1)."""
from __future__ import annotations

import torch


def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` ``(N, D)`` chosen by herding (no repeats), in order."""
    if k > len(features):
        raise ValueError(f"herding: asked for {k} of {len(features)} samples")
    mu = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    avail = torch.ones(len(features), dtype=torch.bool)
    for i in range(k):
        # mean after adding each candidate: (total + f) / (i + 1)
        dist = ((total + features) / (i + 1) - mu).pow(2).sum(1)
        dist[~avail] = float("inf")
        j = int(dist.argmin())
        chosen.append(j)
        avail[j] = False
        total += features[j]
    return torch.tensor(chosen, dtype=torch.long)


def k_center(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` ``(N, D)`` by greedy k-center (first = nearest the mean)."""
    if k > len(features):
        raise ValueError(f"k-center: asked for {k} of {len(features)} samples")
    first = int((features - features.mean(0)).pow(2).sum(1).argmin())
    chosen = [first]
    mind = (features - features[first]).pow(2).sum(1)
    for _ in range(k - 1):
        j = int(mind.argmax())
        chosen.append(j)
        mind = torch.minimum(mind, (features - features[j]).pow(2).sum(1))
    return torch.tensor(chosen, dtype=torch.long)
