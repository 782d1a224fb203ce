"""Optimizers and learning-rate schedules from config: a method's ``optimizer`` / ``scheduler``
nodes (``_partial_: true``, as in the lightning-hydra-template) become ``functools.partial``
objects when Hydra builds the method, typed here and validated before any data is read."""
from __future__ import annotations

from typing import Annotated, Callable

import torch
import torch.nn as nn
from pydantic import AfterValidator


def _builds_optimizer(factory: Callable) -> Callable:
    """``factory`` (``params -> Optimizer``) if it builds an optimizer on one dummy parameter.

    Raises:
        ValueError: it does not (a negative ``lr``, an unknown keyword, not an optimizer); pydantic
            reports it under the field's key (``method.optimizer: ...``).
    """
    try:
        opt = factory([nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as e:
        raise ValueError(f"does not build an optimizer: {e}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"builds a {type(opt).__name__}, not a torch.optim.Optimizer")
    return factory


def _builds_schedule(factory: Callable) -> Callable:
    """``factory`` (``(optimizer, total=, warmup=) -> LRScheduler``) if it builds a schedule of a
    dummy optimizer for a 10-step run with 1 warmup step.

    Raises:
        ValueError: it does not.
    """
    try:
        sched = factory(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), total=10, warmup=1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"does not build a schedule with (optimizer, total=, warmup=): {e}") from None
    if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
        raise ValueError(f"builds a {type(sched).__name__}, not a torch.optim.lr_scheduler.LRScheduler")
    return factory


OptimizerFactory = Annotated[Callable[..., torch.optim.Optimizer], AfterValidator(_builds_optimizer)]
"""``params -> Optimizer``: a method config's ``optimizer`` node, ``{_target_: torch.optim.AdamW,
_partial_: true, lr: ..., weight_decay: ...}``, which Hydra builds into a ``functools.partial``;
validated by building it once on a dummy parameter."""
ScheduleFactory = Annotated[Callable[..., torch.optim.lr_scheduler.LRScheduler], AfterValidator(_builds_schedule)]
"""``(optimizer, total=, warmup=) -> LRScheduler`` stepped per optimizer step: a method config's
``scheduler`` node, ``{_target_: lightning_dd.training.schedules.warmup_cosine, _partial_: true}``;
``total`` and ``warmup`` (optimizer steps) are filled in at fit time."""


def optimizers(optimizer: Callable, scheduler: Callable, params, total: int, warmup: int) -> dict:
    """Lightning's ``configure_optimizers`` answer of a stage whose optimizer and schedule come from config: ``optimizer(params)``
    (``params``: parameters or param groups) and ``scheduler(opt, total=total, warmup=warmup)``,
    stepped per optimizer step."""
    opt = optimizer(params)
    sched = scheduler(opt, total=total, warmup=warmup)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
