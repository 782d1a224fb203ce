"""The supervised trainer of a network on real batches, shared by the families that first train a
model the way its paper does before they distill or quantize from it (SRe2L's squeezed BatchNorm
teachers, arXiv 2306.13092 Sec. 3.1; QAT-ViT's full-precision ViT, arXiv 2307.00331), and the part
of such a model's cache key that its optimizer and schedule (config partials) make."""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.training.optim import optimizers


class SupervisedModule(L.LightningModule):
    """Trains ``net`` on batches ``x (B, C, H, W)``, ``y (B,)``: random crop (4-px padding below
    64 px, random-resized crop of scale 0.25-1 from 64 px on) and horizontal flip (kornia), then
    cross-entropy with ``label_smoothing``; the lr schedule steps per optimizer step.

    Args:
        net: the network (its weights are the module's ``net.*`` entries).
        optimizer: ``params -> Optimizer`` (a config partial,
            :data:`lightning_dd.training.optim.OptimizerFactory`); it gets ``param_groups(net)`` when
            given, else ``net.parameters()``.
        scheduler: ``(optimizer, total=, warmup=) -> LRScheduler`` (a config partial,
            :data:`lightning_dd.training.optim.ScheduleFactory`), stepped every optimizer step.
        total_steps, warmup_steps: the schedule's length and warmup, in optimizer steps.
        image_size: ``(H, W)`` of the batches.
        label_smoothing: CE label smoothing in ``[0, 1)``.
        loss_name: the progress-bar key of the training loss (``squeeze/train_loss``, ``fp/train_loss``).
        param_groups: ``net -> list of param groups`` (e.g. no weight decay on biases and norms).
    """

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable, total_steps: int, warmup_steps: int,
                 image_size, label_smoothing: float, loss_name: str,
                 param_groups: Callable[[nn.Module], list[dict]] | None = None):
        super().__init__()
        import kornia.augmentation as K

        self.net, self.make_optimizer, self.make_scheduler = net, optimizer, scheduler
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.label_smoothing, self.loss_name, self.param_groups = label_smoothing, loss_name, param_groups
        h, w = image_size
        crop = K.RandomResizedCrop((h, w), scale=(0.25, 1.0)) if h >= 64 else K.RandomCrop((h, w), padding=4)
        self.augment = nn.Sequential(crop, K.RandomHorizontalFlip())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(self.augment(x)), y, label_smoothing=self.label_smoothing)
        self.log(self.loss_name, loss, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        params = self.param_groups(self.net) if self.param_groups is not None else self.net.parameters()
        return optimizers(self.make_optimizer, self.make_scheduler, params, self.total_steps, self.warmup_steps)


def _target(factory: Callable) -> str:
    """``module.qualname`` of what a partial (or plain callable) calls."""
    f = getattr(factory, "func", factory)
    return f"{f.__module__}.{f.__qualname__}"


def _recipe(optimizer: Callable, scheduler: Callable, keys) -> dict:
    """What is called and with which arguments, less the optimizer keywords in ``keys``."""
    parts = {}
    for part, f, drop in (("optimizer", optimizer, keys), ("scheduler", scheduler, ())):
        parts[part] = {"_target_": _target(f), **{k: v for k, v in getattr(f, "keywords", {}).items() if k not in drop}}
        if getattr(f, "args", ()):
            parts[part]["_args_"] = list(f.args)
    return parts


def recipe_spec(optimizer: Callable, scheduler: Callable, keys: dict[str, str], usual_optimizer: Callable,
                usual_scheduler: Callable) -> dict:
    """The cache-key part of a model trained with ``optimizer`` and ``scheduler`` (config partials):
    the optimizer keywords named in ``keys`` (keyword -> key name, e.g. ``{"weight_decay": "wd"}``;
    ints written as floats, ``None`` when absent) and, under ``"recipe"``, the rest of both
    (``{"optimizer": {"_target_": ..., **other keywords}, "scheduler": {...}}``) only where it differs
    from ``usual_optimizer`` / ``usual_scheduler`` (e.g. ``partial(torch.optim.SGD, momentum=0.9)``),
    so that a model of the usual recipe keeps the key it had when only ``keys`` were settings."""
    kw = getattr(optimizer, "keywords", {})
    spec = {}
    for name, key in keys.items():
        v = kw.get(name)
        spec[key] = float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    rest = _recipe(optimizer, scheduler, keys)
    if rest != _recipe(usual_optimizer, usual_scheduler, keys):
        spec["recipe"] = rest
    return spec
