"""Label losses shared by methods and the evaluator."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets given as *logits* (DATM's learnable soft labels).

    ``logits``, ``target_logits``: ``(N, K)``. Returns the batch mean of
    ``-sum_k softmax(target)_k * log_softmax(logits)_k`` (DATM, arXiv 2310.05773, Sec. 3.3).
    """
    return -(F.softmax(target_logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label CE for ``labels (N,)`` int64, soft CE for ``labels (N, K)`` float logits."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    return soft_cross_entropy(logits, labels)
