"""The supervised trainer of a network on real batches, shared by the families that first train a
model the way its paper does before they distill or quantize from it (SRe2L's squeezed BatchNorm
teachers, arXiv 2306.13092 Sec. 3.1; QAT-ViT's full-precision ViT, arXiv 2307.00331)."""
from __future__ import annotations

from typing import Callable, Iterable

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class SupervisedModule(L.LightningModule):
    """Trains ``net`` on batches ``x (B, C, H, W)``, ``y (B,)``: random crop (4-px padding below
    64 px, random-resized crop of scale 0.25-1 from 64 px on) and horizontal flip (kornia), then
    cross-entropy with ``label_smoothing``; the lr schedule steps per optimizer step.

    Args:
        net: the network (its weights are the module's ``net.*`` entries).
        optimizer: ``params -> Optimizer`` (a partial, e.g. ``functools.partial(torch.optim.SGD,
            lr=0.1, momentum=0.9)``); it gets ``param_groups(net)`` when given, else ``net.parameters()``.
        scheduler: ``Optimizer -> LRScheduler`` (e.g. a partial of
            :func:`lightning_dd.training.schedules.warmup_cosine`), stepped every optimizer step.
        image_size: ``(H, W)`` of the batches.
        label_smoothing: CE label smoothing in ``[0, 1)``.
        loss_name: the progress-bar key of the training loss (``squeeze/train_loss``, ``fp/train_loss``).
        param_groups: ``net -> list of param groups`` (e.g. no weight decay on biases and norms).
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory, image_size,
                 label_smoothing: float, loss_name: str,
                 param_groups: Callable[[nn.Module], list[dict]] | None = None):
        super().__init__()
        import kornia.augmentation as K

        self.net, self.make_optimizer, self.make_scheduler = net, optimizer, scheduler
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
        opt = self.make_optimizer(params)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt), "interval": "step"}}
