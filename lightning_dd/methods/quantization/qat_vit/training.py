"""Lightning modules of QAT-ViT (Huang et al., arXiv 2307.00331): the full-precision ViT's training
and quantization-aware training with multi-crop knowledge distillation and the variation-aware
bin regularizer.

Multi-crop KD (FKD, Shen & Xing, arXiv 2112.01528, as QAT-ViT uses it): every image of a step gives
``num_crops`` random-resized crops of the original image (each its own box, flipped with
probability 1/2); the FP teacher's softmax on each crop is the target of a soft cross-entropy.
Deviation from FKD: FKD writes the crop boxes and the teacher's soft labels to disk once and
replays them; here the teacher labels each crop on the fly (same targets in expectation, one
teacher forward per step, nothing stored).

Training length and schedules (the reference's ``train_VVTQ.py`` loop, :func:`qat_passes`): a pass
over the images with ``num_crops`` views each counts as ``num_crops`` epochs
(``range(warmup, epochs, num_crops)``); once a pass would start at ``epoch >= epochs - num_crops``,
the remaining epochs train single-crop with ``num_crops`` times the images per step (same views per
step). The learning rate is the timm cosine of the reference's epoch counter, constant within a
pass (:func:`reference_lr`); the regularizer's weight is evaluated at the epoch a pass starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch
import torch.nn as nn

from lightning_dd.augment.crops import crop_resize, sample_crops
from lightning_dd.losses import soft_cross_entropy
from lightning_dd.methods.quantization.qat_vit.model import quantized_layers
from lightning_dd.methods.quantization.qat_vit.regularizer import OscillationTracker, bin_regularizer, ramp
from lightning_dd.training.schedules import warmup_cosine
from lightning_dd.training.supervised import SupervisedModule, recipe_spec


def multi_crop(x: torch.Tensor, num_crops: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``num_crops`` random-resized, randomly flipped crops of every image, crop-major.

    Shapes: ``x (B, C, H, W)`` -> ``(num_crops * B, C, H, W)``."""
    b, _, h, w = x.shape
    rep = x.repeat(num_crops, 1, 1, 1)
    boxes = sample_crops(b * num_crops, h, w, scale, generator)
    flips = torch.rand(b * num_crops, generator=generator) < 0.5
    return crop_resize(rep, boxes, flips)


def _param_groups(net: nn.Module) -> list[dict]:
    """Two groups: the >= 2-dim weights (the optimizer's own weight decay), then the rest (biases,
    norms, position embedding, class token, quantizer steps: weight decay 0)."""
    decay, rest = [], []
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token")) else rest).append(p)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def fp_module(net: nn.Module, optimizer: Callable, scheduler: Callable, total_steps: int, warmup_steps: int,
              image_size, label_smoothing: float) -> SupervisedModule:
    """The FP ViT's LightningModule (DeiT's recipe, arXiv 2012.12877): ``optimizer`` (the configs:
    AdamW) with weight decay on >= 2-dim weights only, ``scheduler`` per optimizer step over
    ``total_steps`` with ``warmup_steps`` of warmup (the configs: linear warmup then cosine to 0),
    random crop + flip, cross-entropy with ``label_smoothing``
    (:class:`~lightning_dd.training.supervised.SupervisedModule`). Batches ``x (B, C, H, W)``, ``y (B,)``."""
    return SupervisedModule(net, optimizer, scheduler, total_steps, warmup_steps, image_size, label_smoothing,
                            "fp/train_loss", param_groups=_param_groups)


def fp_spec(optimizer: Callable, scheduler: Callable) -> dict:
    """The recipe's part of the FP model's cache key: ``lr`` and ``wd`` (the optimizer's ``lr`` and
    ``weight_decay``), plus a ``recipe`` entry only for a recipe other than AdamW with the
    warmup-cosine (:func:`~lightning_dd.training.supervised.recipe_spec`)."""
    return recipe_spec(optimizer, scheduler, {"lr": "lr", "weight_decay": "wd"}, torch.optim.AdamW, warmup_cosine)


@dataclass(frozen=True)
class Pass:
    """One pass over the training images in the reference's epoch loop (``train_VVTQ.py``).

    Attributes:
        epoch: the reference's epoch counter when the pass starts (the regularizer's weight).
        crops: views per image (``num_crops``, or 1 in warmup and the single-crop finish).
        lr_epoch: the epoch the learning-rate schedule is evaluated at during the pass.
    """

    epoch: int
    crops: int
    lr_epoch: int


def qat_passes(epochs: int, num_crops: int, warmup_epochs: int = 0) -> list[Pass]:
    """The passes of the reference's loop: ``warmup_epochs`` single-crop epochs, then
    ``for epoch in range(warmup_epochs, epochs, num_crops)`` one ``num_crops``-view pass each, until
    ``epoch >= epochs - num_crops``: from there the remaining ``epochs - epoch`` epochs train
    single-crop (their LR at ``epoch + 1``: the reference steps the scheduler before each).

    Example: ``qat_passes(150, 4)`` = 37 four-crop passes (epochs 0, 4, ..., 144) + 2 single-crop
    epochs (148, 149): ``37 * 4 + 2 = 150`` epochs' worth of views."""
    passes = [Pass(e, 1, e) for e in range(min(warmup_epochs, epochs))]
    for e in range(warmup_epochs, epochs, num_crops):
        if e >= epochs - num_crops:
            return passes + [Pass(f, 1, f + 1) for f in range(e, epochs)]
        passes.append(Pass(e, num_crops, e))
    return passes


def images_per_step(batch_size: int, num_crops: int, crops: int) -> int:
    """Images per optimizer step of a pass with ``crops`` views per image: the reference's
    ``ceil(batch_size / num_crops)`` images (``batch_size`` counts views), ``num_crops`` times as
    many in single-crop passes."""
    return math.ceil(batch_size / num_crops) * (num_crops // crops)


def training_length(epochs: int, num_crops: int, warmup_epochs: int, n_images: int, batch_size: int) -> tuple[int, int]:
    """``(optimizer steps, views seen)`` of QAT on ``n_images`` training images (one process; every
    pass ends with a smaller last batch, as the reference's ``drop_last=False`` loaders)."""
    steps = views = 0
    for p in qat_passes(epochs, num_crops, warmup_epochs):
        steps += math.ceil(n_images / images_per_step(batch_size, num_crops, p.crops))
        views += n_images * p.crops
    return steps, views


def reference_lr(t: float, epochs: int, warmup_epochs: int = 0, warmup_lr: float = 1e-6,
                 lr: float = 1.0, min_lr: float = 0.0) -> float:
    """timm's ``CosineLRScheduler`` (as ``train_VVTQ.py`` creates it: ``t_initial = epochs``, one
    cycle, no warmup prefix) at epoch ``t``: linear from ``warmup_lr`` during ``warmup_epochs``, then
    ``min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2``; ``min_lr`` from ``t >= epochs`` on (the
    paper's command sets ``--min-lr 0``)."""
    if t < warmup_epochs:
        return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


class QATModule(L.LightningModule):
    """QAT of a quantized ViT against its FP teacher, pass by pass (:func:`qat_passes`; one
    Lightning epoch per pass, its loader from ``loader_for(pass)``: run the Trainer with
    ``max_epochs=len(passes)`` and ``reload_dataloaders_every_n_epochs=1``).

    Loss per step: soft cross-entropy between the student's and the teacher's predictions on the
    views, plus ``ramp(pass.epoch / epochs, reg_weight, reg_start) * sum over weight-quantized
    layers of bin_regularizer`` (0 when ``reg_weight = 0``: the QAT-without-regularizer baseline).
    ``optimizer`` (the configs: AdamW) at its ``lr * reference_lr(pass.lr_epoch)``, weight decay on
    >= 2-dim weights only; step sizes and offsets learn with the weights (no weight decay on them). A batch ``x (B, V, C, H, W)`` holds its views already (streamed
    ImageNet); ``x (B, C, H, W)`` gets ``pass.crops`` views per image (:func:`multi_crop`).

    Logged (to the run's loggers, prefix ``prefix``): ``loss``, ``kd``, ``reg``, ``reg_weight``,
    ``osc_rate`` (share of weights oscillating per step, mean over layers, per pass).

    Args:
        student: the quantized ViT (:func:`~.model.quantize_vit`), steps already initialized.
        teacher: the FP ViT (frozen, eval mode).
        optimizer: ``params -> Optimizer`` (a config partial); its ``lr`` is the schedule's peak.
        epochs, num_crops, warmup_epochs: the reference's loop (:func:`qat_passes`).
        loader_for: ``Pass -> DataLoader`` of ``(x, y)`` batches of
            :func:`images_per_step` images.
        crop_scale: the views' area fraction range.
        seed: the crop stream's seed.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, optimizer: Callable, epochs: int,
                 num_crops: int, warmup_epochs: int, loader_for: Callable[[Pass], object],
                 crop_scale: tuple[float, float], reg_weight: float, reg_start: float, prefix: str = "qat",
                 seed: int = 0):
        super().__init__()
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.make_optimizer, self.epochs, self.warmup = optimizer, epochs, warmup_epochs
        self.passes = qat_passes(epochs, num_crops, warmup_epochs)
        self.loader_for, self.crop_scale = loader_for, tuple(crop_scale)
        self.reg_weight, self.reg_start, self.prefix = reg_weight, reg_start, prefix
        self.gen = torch.Generator().manual_seed(seed)
        self.layers = quantized_layers(student)
        self.tracker: OscillationTracker | None = None
        self.last_rates: dict[str, float] = {}  # per layer, the last pass's oscillation rate

    @property
    def current_pass(self) -> Pass:
        return self.passes[min(self.current_epoch, len(self.passes) - 1)]

    def train_dataloader(self):
        return self.loader_for(self.current_pass)

    def regularizer(self) -> torch.Tensor:
        """``sum over quantized layers of bin_regularizer(weight)`` (0-dim; each step's gradient
        scaled by its weight quantizer's factor)."""
        return sum(bin_regularizer(lay.weight, lay.wq.step, lay.wq.qn, lay.wq.qp, lay.wq.grad_factor(lay.weight))
                   for lay in self.layers.values())

    def on_fit_start(self):
        self.teacher.to(self.device)
        self.tracker = OscillationTracker(self.layers)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        p = self.current_pass
        if x.dim() == 5:  # (B, V, C, H, W): views made by the dataset, crop-major as the reference's cat
            views = x.transpose(0, 1).flatten(0, 1).to(self.device)
        else:
            views = multi_crop(x.cpu(), p.crops, self.crop_scale, self.gen).to(self.device)
        with torch.no_grad():
            target = self.teacher(views)
        kd = soft_cross_entropy(self.student(views), target)
        lam = ramp(p.epoch / self.epochs, self.reg_weight, self.reg_start)
        reg = self.regularizer() if lam > 0 else kd.new_zeros(())
        loss = kd + lam * reg
        pre = self.prefix
        self.log_dict({f"{pre}/loss": loss, f"{pre}/kd": kd, f"{pre}/reg": reg.detach(), f"{pre}/reg_weight": lam},
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log(f"{pre}/kd_loss", kd, prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.tracker.update()

    def on_train_epoch_end(self):
        rates = self.tracker.rates()
        osc = sum(rates.values()) / max(1, len(rates))
        self.log(f"{self.prefix}/osc_rate", osc, on_epoch=True)
        self.last_rates = rates
        self.tracker.reset()

    def configure_optimizers(self):
        opt = self.make_optimizer(_param_groups(self.student))
        passes, epochs, warmup, lr = self.passes, self.epochs, self.warmup, opt.defaults["lr"]

        def factor(k):  # LambdaLR's multiplier during Lightning epoch (pass) k
            return reference_lr(passes[min(k, len(passes) - 1)].lr_epoch, epochs, warmup, 1e-6 / lr)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
