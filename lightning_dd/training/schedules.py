"""Learning-rate schedules the families share, as ``torch.optim.lr_scheduler.LambdaLR`` multipliers."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total: int, warmup: int = 0) -> float:
    """The lr multiplier at optimizer step ``step`` (0-based): linear warmup ``(step + 1) / warmup``
    over the first ``warmup`` steps, then a half cosine from 1 to 0 at step ``total``, 0 after.
    With ``warmup = 0``: ``(1 + cos(pi min(step, total) / total)) / 2`` (SRe2L's squeeze and
    recover schedules; MaST-Pre's and the QAT FP model's with their warmups)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` of :func:`warmup_cosine_factor` over ``total`` optimizer steps (step it per
    optimizer step: Lightning's ``"interval": "step"``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total, warmup))
