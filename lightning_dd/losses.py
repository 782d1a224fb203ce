"""Label losses shared by methods and the evaluator.

Targets come in three forms: hard labels ``(N,)`` int64; soft labels given as *logits* ``(N, K)``
(DATM's learnable soft labels); and a teacher's logits computed on the same augmented batch
(knowledge distillation, as in SRe2L/FKD evaluation). The soft losses:

* ``soft_ce``: ``-sum softmax(t / T) * log_softmax(s / T)`` (DATM, arXiv 2310.05773, Sec. 3.3; T = 1);
* ``kl``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al. KD; SRe2L arXiv 2306.13092);
* ``mse_ce``: ``MSE(s, t) + ce_weight * soft_ce`` on logits (G-VBSM's evaluation loss, arXiv 2311.17950).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SOFT_LOSSES = ("soft_ce", "kl", "mse_ce")


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy against soft targets given as logits. ``(N, K)``, ``(N, K)`` -> scalar batch mean."""
    t = temperature
    return -(F.softmax(target_logits / t, 1) * F.log_softmax(logits / t, 1)).sum(1).mean()


def soft_loss(logits: torch.Tensor, target_logits: torch.Tensor, kind: str = "soft_ce", temperature: float = 1.0,
              ce_weight: float = 0.1) -> torch.Tensor:
    """One of :data:`SOFT_LOSSES` between student ``logits`` and ``target_logits``, both ``(N, K)``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "soft_ce":
        return soft_cross_entropy(logits, target_logits, temperature)
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target_logits / t, 1), reduction="batchmean",
                        log_target=True) * t * t
    if kind == "mse_ce":
        return F.mse_loss(logits, target_logits) + ce_weight * soft_cross_entropy(logits, target_logits, temperature)
    raise ValueError(f"soft-label loss must be one of {SOFT_LOSSES}, got {kind!r}")


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label CE for ``labels (N,)`` int64, soft CE for ``labels (N, K)`` float logits."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    return soft_cross_entropy(logits, labels)
