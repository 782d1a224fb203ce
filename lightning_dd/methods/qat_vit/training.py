"""Lightning modules of QAT-ViT (Huang et al., arXiv 2307.00331): the full-precision ViT's training
and quantization-aware training with multi-crop knowledge distillation and the variation-aware
bin regularizer.

Multi-crop KD (FKD, Shen & Xing, arXiv 2112.01528, as QAT-ViT uses it): every image of a step gives
``num_crops`` random-resized crops (each its own box, flipped with probability 1/2); the FP
teacher's softmax on each crop is the target of a soft cross-entropy. Deviation from FKD: FKD
writes the crop boxes and the teacher's soft labels to disk once and replays them; here the
teacher labels each crop on the fly (same targets in expectation, one teacher forward per step,
nothing stored).
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.losses import soft_cross_entropy
from lightning_dd.methods.qat_vit.model import quantized_layers
from lightning_dd.methods.qat_vit.regularizer import OscillationTracker, bin_regularizer, ramp
from lightning_dd.methods.statistics_matching.crops import crop_resize, sample_crops


def multi_crop(x: torch.Tensor, num_crops: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``num_crops`` random-resized, randomly flipped crops of every image, crop-major.

    Shapes: ``x (B, C, H, W)`` -> ``(num_crops * B, C, H, W)``."""
    b, _, h, w = x.shape
    rep = x.repeat(num_crops, 1, 1, 1)
    boxes = sample_crops(b * num_crops, h, w, scale, generator)
    flips = torch.rand(b * num_crops, generator=generator) < 0.5
    return crop_resize(rep, boxes, flips)


def _param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on >= 2-dim weights only (not biases, norms, embeddings, steps)."""
    decay, rest = [], []
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token")) else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _cosine(opt, total: int, warmup: int):
    def f(s):
        if s < warmup:
            return (s + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class FPModule(L.LightningModule):
    """Trains the FP ViT: AdamW, linear warmup then cosine over ``total_steps``, random crop
    (4-px padding below 64 px, random-resized crop of scale 0.25-1 above) and flip (kornia),
    cross-entropy with ``label_smoothing``. Batches ``x (B, C, H, W)``, ``y (B,)``."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
                 image_size, label_smoothing: float = 0.1):
        super().__init__()
        import kornia.augmentation as K

        self.net, self.lr, self.wd = net, lr, weight_decay
        self.total, self.warmup, self.ls = total_steps, warmup_steps, label_smoothing
        h, w = image_size
        crop = K.RandomResizedCrop((h, w), scale=(0.25, 1.0)) if h >= 64 else K.RandomCrop((h, w), padding=4)
        self.augment = nn.Sequential(crop, K.RandomHorizontalFlip())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(self.augment(x)), y, label_smoothing=self.ls)
        self.log("fp/train_loss", loss, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(_param_groups(self.net, self.wd), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _cosine(opt, self.total, self.warmup),
                                                   "interval": "step"}}


class QATModule(L.LightningModule):
    """QAT of a quantized ViT against its FP teacher.

    Loss per step: soft cross-entropy between the student's and the teacher's predictions on the
    multi-crop views (:func:`multi_crop`), plus ``ramp(progress, reg_weight, reg_start) * sum over
    weight-quantized layers of bin_regularizer`` (0 when ``reg_weight = 0``: the QAT-without-
    regularizer baseline). AdamW, warmup + cosine over ``total_steps``; step sizes and offsets
    learn with the weights (no weight decay on them).

    Logged (to the run's loggers, prefix ``prefix``): ``loss``, ``kd``, ``reg``, ``reg_weight``,
    ``osc_rate`` (share of weights oscillating per step, mean over layers, per epoch).

    Args:
        student: the quantized ViT (:func:`~.model.quantize_vit`), steps already initialized.
        teacher: the FP ViT (frozen, eval mode).
        num_crops, crop_scale: views per image and their area fraction range.
        seed: the crop stream's seed.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, lr: float, weight_decay: float, total_steps: int,
                 warmup_steps: int, num_crops: int, crop_scale: tuple[float, float], reg_weight: float,
                 reg_start: float, prefix: str = "qat", seed: int = 0):
        super().__init__()
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.lr, self.wd, self.total, self.warmup = lr, weight_decay, total_steps, warmup_steps
        self.num_crops, self.crop_scale = num_crops, tuple(crop_scale)
        self.reg_weight, self.reg_start, self.prefix = reg_weight, reg_start, prefix
        self.gen = torch.Generator().manual_seed(seed)
        self.layers = quantized_layers(student)
        self.tracker: OscillationTracker | None = None
        self.osc_history: list[float] = []

    def regularizer(self) -> torch.Tensor:
        """``sum over quantized layers of bin_regularizer(weight)`` (0-dim)."""
        return sum(bin_regularizer(lay.weight, lay.wq.step, lay.wq.qn, lay.wq.qp) for lay in self.layers.values())

    def on_fit_start(self):
        self.teacher.to(self.device)
        self.tracker = OscillationTracker(self.layers)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        views = multi_crop(x.cpu(), self.num_crops, self.crop_scale, self.gen).to(self.device)
        with torch.no_grad():
            target = self.teacher(views)
        kd = soft_cross_entropy(self.student(views), target)
        lam = ramp(self.global_step / max(1, self.total), self.reg_weight, self.reg_start)
        reg = self.regularizer() if lam > 0 else kd.new_zeros(())
        loss = kd + lam * reg
        p = self.prefix
        self.log_dict({f"{p}/loss": loss, f"{p}/kd": kd, f"{p}/reg": reg.detach(), f"{p}/reg_weight": lam},
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log(f"{p}/kd_loss", kd, prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.tracker.update()

    def on_train_epoch_end(self):
        rates = self.tracker.rates()
        osc = sum(rates.values()) / max(1, len(rates))
        self.osc_history.append(osc)
        self.log(f"{self.prefix}/osc_rate", osc, on_epoch=True)
        self.last_rates = rates
        self.tracker.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(_param_groups(self.student, self.wd), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _cosine(opt, self.total, self.warmup),
                                                   "interval": "step"}}


