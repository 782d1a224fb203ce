"""The student evaluator: train fresh networks on a (distilled) set, test on the real test set.

This is the number every dataset-distillation method is judged by. Following MTT/DATM
(arXiv 2203.11932 / 2310.05773): SGD with momentum 0.9 and weight decay 5e-4, the learned
student learning rate when the set carries one, the learning rate divided by 10 at half of
training, DSA on every batch, soft cross-entropy for learned soft labels. Several seeds give
mean ± std.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from typing import Literal

from pydantic import ConfigDict

from lightning_dd.augment.dsa import DSA
from lightning_dd.core.config import NonNegFloat, PositiveFloat, PositiveInt, Typed
from lightning_dd.data.batches import TensorBatches, batch_loader
from lightning_dd.evaluate.ensemble import (SeedEnsembleModule, SeedRng, batched_support, seed_mode, trains_on_cuda,
                                            zipped_loader)
from lightning_dd.losses import soft_loss
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.nets import build_net_cfg, maybe_compile
from lightning_dd.quiet import quiet_lightning
from lightning_dd.results import check_set

log = logging.getLogger(__name__)

#: ``eval.schedule`` values: ``step`` (MTT/DATM: lr x0.1 after half of the steps) or ``cosine``
#: (``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max = epochs``, stepped once per epoch:
#: the lr of epoch ``e`` is ``lr * (1 + cos(pi * e / epochs)) / 2``; Dataset Quantization's
#: ``validate_cifar.py``, the standard CIFAR ResNet recipe).
SCHEDULES = ("step", "cosine")


def lr_schedule(opt: torch.optim.Optimizer, schedule: str, total_steps: int, epochs: int):
    """The per-step lr scheduler of ``schedule`` (:data:`SCHEDULES`) for ``total_steps`` optimizer
    steps in ``epochs`` equal epochs (``total_steps / epochs`` steps each).

    Raises:
        ValueError: an unknown ``schedule``, or ``total_steps`` not a multiple of ``epochs`` for ``cosine``.
    """
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total_steps // 2], gamma=0.1)
    if schedule == "cosine":
        if epochs < 1 or total_steps % epochs:
            raise ValueError(f"eval.schedule=cosine: {total_steps} steps are not {epochs} equal epochs")
        per_epoch = total_steps // epochs
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * (step // per_epoch) / epochs)))
    raise ValueError(f"eval.schedule must be one of {SCHEDULES}, got {schedule!r}")


def target_loss(logits: torch.Tensor, targets: torch.Tensor, soft_loss_kind: str = "soft_ce",
                temperature: float = 1.0) -> torch.Tensor:
    """The student's training loss: cross-entropy for ``(B,)`` labels, :func:`lightning_dd.losses.soft_loss`
    for ``(B, K)`` soft-label or teacher logits. ``logits (B, K)`` -> scalar batch mean."""
    if targets.dim() == 2:
        return soft_loss(logits, targets, soft_loss_kind, temperature)
    return F.cross_entropy(logits, targets)


def make_augment(kind: str, dsa: DSA | None = None, image_size: tuple[int, int] | None = None):
    """Per-batch training augmentation ``x (N, C, H, W) -> x``.

    ``dsa``: a fresh DSA draw per batch (MTT/DATM evaluation); ``crop_flip``: random crop with
    4-pixel zero padding and horizontal flip (kornia; the standard CIFAR pipeline); ``none``.

    Raises:
        ValueError: unknown ``kind``, or ``dsa`` without a DSA object.
    """
    if kind == "none":
        return None
    if kind == "dsa":
        if dsa is None:
            raise ValueError("eval.augment=dsa needs the augment.dsa settings")
        return lambda x: dsa(x, dsa.sample(x.shape[0], x.shape[-2:], device=x.device))
    if kind == "crop_flip":
        import kornia.augmentation as K

        return torch.nn.Sequential(K.RandomCrop(tuple(image_size), padding=4), K.RandomHorizontalFlip())
    raise ValueError(f"eval.augment must be dsa|crop_flip|none, got {kind!r}")


class StudentModule(L.LightningModule):
    """Trains ``net`` on one small set for a fixed number of steps; tests accuracy.

    Args:
        net: a freshly initialized network.
        lr: SGD learning rate (the distilled set's learned lr, or ``eval.lr``).
        total_steps: optimizer steps; lr is multiplied by 0.1 after half of them (``schedule="step"``).
        num_classes: K, for the accuracy metric.
        momentum, weight_decay: SGD settings (0.9, 5e-4 in the papers).
        augment: callable applied to each training batch (see :func:`make_augment`; ``None`` = none).
        compile: ``torch.compile`` the network when its architecture is verified (see
            :func:`lightning_dd.nets.maybe_compile`; ~1.7x faster ConvNet steps on CPU after ~10 s of
            compilation, shared by later runs of the same architecture and batch shape).
        teacher: a network whose logits on the *same augmented batch* are the targets
            (knowledge distillation, SRe2L/FKD style); ``None`` = use the set's labels.
        soft_loss_kind, temperature: the loss against soft targets (see :mod:`lightning_dd.losses`).
        schedule, epochs: the lr schedule (:func:`lr_schedule`; ``cosine`` needs the number of
            epochs the ``total_steps`` make).
    """

    def __init__(self, net: torch.nn.Module, lr: float, total_steps: int, num_classes: int,
                 momentum: float = 0.9, weight_decay: float = 5e-4, augment=None, compile: bool = False,
                 teacher: torch.nn.Module | None = None, soft_loss_kind: str = "soft_ce", temperature: float = 1.0,
                 schedule: str = "step", epochs: int = 1):
        super().__init__()
        self.schedule, self.epochs = schedule, epochs
        self.net = maybe_compile(net, compile)
        self.lr, self.total_steps = lr, total_steps
        self.momentum, self.weight_decay, self.augment = momentum, weight_decay, augment
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.soft_loss_kind, self.temperature = soft_loss_kind, temperature
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment is not None:
            x = self.augment(x)
        out = self.net(x)
        if self.teacher is not None:
            with torch.no_grad():
                y = self.teacher(x)
        return target_loss(out, y, self.soft_loss_kind, self.temperature)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc.update(self.net(x).argmax(1), y)
        self.log("acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        sched = lr_schedule(opt, self.schedule, self.total_steps, self.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass
class EvalResult:
    """Accuracies (fractions in [0, 1]) of one set on one architecture, one per seed."""

    net: str
    accs: list[float]
    seconds: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def std(self) -> float:
        return float(np.std(self.accs))

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics: ``{prefix}/{net}/acc_mean``, ``acc_std``, ``n_runs``, ``seconds``."""
        p = f"{prefix}/{self.net}"
        return {f"{p}/acc_mean": self.mean, f"{p}/acc_std": self.std, f"{p}/n_runs": len(self.accs),
                f"{p}/seconds": self.seconds}


class StudentSettings(Typed):
    """How the student evaluator trains and tests (the student part of the ``eval`` node,
    ``conf/eval/default.yaml``, which holds every default).

    Fields: epochs (passes over the set); batch_size; num_eval (seeds ``seed .. seed+num_eval-1``);
    seed; momentum, weight_decay (SGD); schedule (``step``: lr x0.1 at half | ``cosine`` per epoch,
    :func:`lr_schedule`); augment (``dsa`` | ``crop_flip`` | ``none``); label_mode (``auto``: the
    set's labels as they are, ``hard``: argmax of soft labels, ``soft``: require soft labels,
    ``teacher``: targets = a teacher's logits per batch); soft_loss, temperature (the loss for soft /
    teacher targets: ``soft_ce``, ``kl``, ``mse_ce``); precision (overrides the Trainer factory's
    precision for these runs: ``32-true``, ``bf16-mixed`` (autocast to bfloat16; AlexNet/VGG11/
    ResNet18 steps on 100 CIFAR images went from 0.78/0.47/1.66 s to 0.38/0.31/0.89 s on a 2-core
    AVX512-BF16 CPU), ``16-mixed`` on GPUs; null: the factory's); parallel_seeds (``sequential``:
    one Trainer per seed; ``vmap``: all seeds stacked in one batched network,
    :mod:`lightning_dd.evaluate.ensemble`, seed ``i`` gets the same initial weights, batch order and
    augmentation draws as its sequential run, losses equal to float32 rounding, not bitwise;
    ``auto``: vmap on CUDA when the net supports it, else sequential, also after running out of
    device memory; the choice is logged. Compilation applies to the sequential runs only; the
    stacked runs know only the ``step`` schedule).
    """

    model_config = ConfigDict(extra="ignore")  # the rest of the eval node is the caller's
    epochs: PositiveInt
    batch_size: PositiveInt
    num_eval: PositiveInt
    seed: int
    momentum: NonNegFloat
    weight_decay: NonNegFloat
    schedule: Literal["step", "cosine"]
    augment: Literal["dsa", "crop_flip", "none"]
    label_mode: Literal["auto", "hard", "soft", "teacher"]
    soft_loss: Literal["soft_ce", "kl", "mse_ce"]
    temperature: PositiveFloat
    precision: str | None
    parallel_seeds: Literal["auto", "vmap", "sequential"]


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, net_cfg: dict, settings: StudentSettings, *,
                 lr: float, epochs: int | None = None, num_eval: int | None = None, dsa: DSA | None = None,
                 make_trainer: TrainerFactory | None = None, teacher: torch.nn.Module | None = None) -> EvalResult:
    """Train ``num_eval`` fresh networks (seeds ``seed .. seed+num_eval-1``) on ``(images, labels)``.

    The MTT/DATM protocol: SGD (momentum 0.9, weight decay 5e-4) for ``epochs`` passes, lr x0.1
    at half, a fresh augmentation draw per batch; accuracy on the full real test set.

    Args:
        images: ``(N, C, H, W)`` float32 in model space (same space as ``test_images``).
        labels: ``(N,)`` int64 hard labels or ``(N, K)`` float soft-label logits.
        test_images, test_labels: the real test set ``(M, C, H, W)``, ``(M,)``.
        net_cfg: ``{"name" | "_target_": ..., **kwargs}`` for :func:`lightning_dd.nets.build_net_cfg`.
        settings: the student settings (:class:`StudentSettings`).
        lr: learning rate. epochs, num_eval: override ``settings``' (e.g. a quick one-seed evaluation).
        dsa: the DSA used when ``settings.augment == "dsa"``.
        make_trainer: the run's Trainer factory (accelerator, devices, strategy, precision; its
            ``compile`` flag compiles the networks, see :class:`StudentModule`); default: CPU/GPU
            auto, fp32, no compile.
        teacher: the network whose logits are the targets with ``label_mode=teacher``.

    Returns:
        :class:`EvalResult` with one test accuracy per seed.

    Raises:
        ValueError: if shapes or label counts do not match, the images contain NaN/inf, the
            label mode does not fit the labels, or ``parallel_seeds=vmap`` is impossible here
            (Trainer settings, or a network that cannot be stacked; the reason is given).
    """
    epochs = epochs or settings.epochs
    num_eval = num_eval or settings.num_eval
    batch_size, seed, momentum, weight_decay = settings.batch_size, settings.seed, settings.momentum, settings.weight_decay
    label_mode, soft_loss_kind, temperature = settings.label_mode, settings.soft_loss, settings.temperature
    precision, parallel_seeds, schedule = settings.precision, settings.parallel_seeds, settings.schedule
    check_set(images, labels, num_classes, tuple(test_images.shape[1:]))
    quiet_lightning()
    if label_mode == "hard" and labels.dim() == 2:
        labels = labels.argmax(1)
    elif label_mode == "soft" and labels.dim() != 2:
        raise ValueError("eval.label_mode=soft needs (N, K) soft labels; this set has hard labels")
    elif label_mode == "teacher" and teacher is None:
        raise ValueError("eval.label_mode=teacher needs a teacher network (eval.teacher_ckpt)")
    aug = make_augment(settings.augment, dsa, tuple(images.shape[-2:]))
    make_trainer = make_trainer or TrainerFactory()
    if precision:
        make_trainer = copy.copy(make_trainer)
        make_trainer.precision = precision
    name = net_cfg.get("name") or str(net_cfg.get("_target_")).rsplit(".", 1)[-1]
    steps = epochs * TensorBatches((images,), batch_size, 1).steps_per_epoch()
    teacher = teacher if label_mode == "teacher" else None
    mode, why = seed_mode(parallel_seeds, num_eval, make_trainer)
    if mode == "vmap" and schedule != "step":
        if parallel_seeds == "vmap":
            raise ValueError(f"eval.parallel_seeds=vmap supports eval.schedule=step only, not {schedule!r}")
        mode, why = "sequential", f"eval.schedule={schedule} (stacked seeds support step only)"
    if mode == "vmap":
        with torch.random.fork_rng(devices=[]):
            probe = build_net_cfg(net_cfg, images.shape[1], num_classes, images.shape[2:])
            unsupported = batched_support(probe, images)
        if unsupported:
            if parallel_seeds == "vmap":
                raise ValueError(f"eval.parallel_seeds=vmap: {name} cannot be stacked over seeds ({unsupported}); "
                                 "use eval.parallel_seeds=sequential or auto")
            mode, why = "sequential", f"{name} cannot be stacked over seeds ({unsupported})"
    log.info("evaluating %d seeds of %s %s (%s)", num_eval, name,
             "stacked with vmap" if mode == "vmap" else "one by one", why)
    t0 = time.perf_counter()
    if mode == "vmap":
        def loss(out, y):
            return target_loss(out, y, soft_loss_kind, temperature)

        try:
            accs = _train_stacked(images, labels, test_images, test_labels, num_classes, net_cfg, lr, steps, epochs,
                                  batch_size, num_eval, seed, aug, momentum, weight_decay, make_trainer, loss, teacher)
            return EvalResult(name, accs, time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            if parallel_seeds == "vmap":
                raise
            log.warning("%d stacked %s students do not fit in device memory; evaluating them one by one",
                        num_eval, name)
            torch.cuda.empty_cache()
    accs = []
    for r in range(num_eval):
        L.seed_everything(seed + r, verbose=False)
        net = build_net_cfg(net_cfg, images.shape[1], num_classes, images.shape[2:])
        module = StudentModule(net, lr, steps, num_classes, momentum, weight_decay, aug, make_trainer.compile,
                               teacher, soft_loss_kind, temperature, schedule, epochs)
        trainer = make_trainer("evaluate", max_steps=steps, max_epochs=1, enable_progress_bar=False)
        trainer.fit(module, batch_loader(images, labels, batch_size=batch_size, epochs=epochs, seed=seed + r))
        out = trainer.test(module, batch_loader(test_images, test_labels, batch_size=1000, epochs=1),
                           verbose=False)
        accs.append(float(out[0]["acc"]))
    return EvalResult(name, accs, time.perf_counter() - t0)


def _train_stacked(images, labels, test_images, test_labels, num_classes, net_cfg, lr, steps, epochs, batch_size,
                   num_eval, seed, aug, momentum, weight_decay, make_trainer, loss, teacher) -> list[float]:
    """The seeds of :func:`evaluate_set` trained at once (:class:`SeedEnsembleModule`). Per seed ``r``
    the global RNG is consumed in the sequential run's order: ``seed_everything(seed + r)``, the net's
    initialization, starting the seeded batch loader; the augmentation then continues that stream
    (:class:`SeedRng`), and the global state is left where the last sequential run leaves it."""
    nets, rngs, iterators = [], [], []
    cuda = trains_on_cuda(make_trainer)
    for r in range(num_eval):
        L.seed_everything(seed + r, verbose=False)
        nets.append(build_net_cfg(net_cfg, images.shape[1], num_classes, images.shape[2:]))
        iterators.append(iter(batch_loader(images, labels, batch_size=batch_size, epochs=epochs, seed=seed + r)))
        rngs.append(SeedRng(cuda))
    module = SeedEnsembleModule(nets, rngs, loss, lr, steps, momentum, weight_decay, aug, teacher)
    trainer = make_trainer("evaluate", max_steps=steps, max_epochs=1, enable_progress_bar=False)
    trainer.fit(module, zipped_loader(iterators, steps))
    rngs[-1].make_global()  # the test loader then draws its seed from here, as the last sequential run's does
    trainer.test(module, batch_loader(test_images, test_labels, batch_size=1000, epochs=1), verbose=False)
    return module.accs
