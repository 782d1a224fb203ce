"""The 20-joint skeleton reference row for the skeleton-rendered MSR-Action3D point-cloud videos:
a temporal convolutional classifier on the same real joint sequences, labels and split (subjects
1-5 train, 6-10 test) the renderer draws from (:mod:`lightning_dd.data.skeleton_render`).

Input (ours, not a paper's): each sequence's joints relative to the hip centre, divided by the
shoulder-hip trunk length of its first frame (body-size invariant), linearly resampled to ``frames``
frames, plus the frame-to-frame velocities: ``(frames, 120)``. Net: three Conv1d(k=5)-BatchNorm-ReLU
blocks, [max, mean] over time, dropout, linear. Training: AdamW, cosine, random per-axis scale
U(0.9, 1.1) and a rotation about the vertical axis U(-``rotate``, ``rotate``) degrees per sample.
"""
from __future__ import annotations

import math
import time
from typing import ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.core.config import Fraction, NonNegFloat, PositiveInt
from lightning_dd.data.protocols import SkeletonData
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.point_video.common import PointVideoMethod
from lightning_dd.training.optim import OptimizerFactory, ScheduleFactory, optimizers


def normalize_sequence(joints: np.ndarray, frames: int) -> torch.Tensor:
    """Hip-centred, trunk-normalized joints resampled to ``frames`` frames.

    Shapes:
        joints: ``(T, 20, 3)`` metres. Returns ``(frames, 20, 3)`` float32.
    """
    j = torch.from_numpy(np.asarray(joints, dtype=np.float32))
    j = j - j[:, 6:7]                                                # hip centre (MSR joint 7)
    trunk = (j[0, 2] - j[0, 6]).norm().clamp_min(1e-3)              # neck - hip centre
    pos = torch.linspace(0, len(j) - 1, frames)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=len(j) - 1)
    w = (pos - lo).view(-1, 1, 1)
    return ((1 - w) * j[lo] + w * j[hi]) / trunk


def augment(x: torch.Tensor, rotate_deg: float) -> torch.Tensor:
    """Per-sample scale U(0.9, 1.1) per axis and rotation about y. x: ``(B, T, 20, 3)``."""
    b = x.shape[0]
    th = (torch.rand(b) * 2 - 1) * math.radians(rotate_deg)
    c, s = th.cos(), th.sin()
    z, o = torch.zeros(b), torch.ones(b)
    rot = torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)
    scale = 0.9 + 0.2 * torch.rand(b, 1, 1, 3)
    return torch.einsum("btjc,bdc->btjd", x, rot) * scale


def as_input(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, 20, 3)`` -> channels-first ``(B, 120, T)``: positions and velocities."""
    vel = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], 1)
    return torch.cat([x.flatten(2), vel.flatten(2)], -1).transpose(1, 2)


class SkeletonNet(nn.Module):
    """Temporal CNN over joint sequences (module docstring). ``(B, 120, T)`` -> ``(B, C)``."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        layers, c = [], 120
        for _ in range(3):
            layers += [nn.Conv1d(c, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(torch.cat([h.amax(-1), h.mean(-1)], -1))


class SkeletonModule(L.LightningModule):
    """SkeletonNet trained with cross-entropy (label smoothing 0.1) on augmented sequences (module docstring)."""

    def __init__(self, net: SkeletonNet, hp: "SkeletonClassifier", steps: int):
        super().__init__()
        self.net, self.hp, self.steps = net, hp, steps

    def training_step(self, batch, _):
        x, y = batch
        logits = self.net(as_input(augment(x, self.hp.rotate)))
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        self.log("skeleton/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return optimizers(self.hp.optimizer, self.hp.scheduler, self.parameters(), self.steps,
                          max(1, self.steps // 20))


class SkeletonClassifier(PointVideoMethod):
    """20-joint skeleton classifier (module docstring), ``conf/method/skeleton_msr.yaml``: sequences
    resampled to ``frames`` frames, a ``width``-channel net with ``dropout``, ``epochs`` of
    ``optimizer`` (AdamW in the config) in batches of ``batch_size`` under ``scheduler`` (5% of the
    steps warmup, then cosine), rotations up to
    ``rotate`` degrees. Metrics: ``eval/video_acc`` on the test subjects, ``eval/train_acc``."""

    stages: ClassVar[tuple[str, ...]] = ("all",)
    data_protocol: ClassVar[type] = SkeletonData
    frames: PositiveInt
    width: PositiveInt
    dropout: Fraction
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: OptimizerFactory
    scheduler: ScheduleFactory
    rotate: NonNegFloat

    def run(self, ctx: RunContext[SkeletonData]) -> MethodOutput:
        t0 = time.perf_counter()
        L.seed_everything(ctx.seed, verbose=False)
        seqs, labels, subjects = ctx.dm.skeletons()
        x = torch.stack([normalize_sequence(s, self.frames) for s in seqs])
        train = torch.tensor([int(s) in ctx.dm.train_subjects for s in subjects])
        ds = torch.utils.data.TensorDataset(x[train], labels[train])
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)
        net = SkeletonNet(ctx.dm.num_classes, self.width, self.dropout)
        module = SkeletonModule(net, self, self.epochs * len(loader))
        ctx.make_trainer("skeleton", max_epochs=self.epochs, logger=ctx.loggers, log_every_n_steps=5).fit(module, loader)
        net.eval()
        with torch.no_grad():
            te = net(as_input(x[~train])).argmax(1)
            tr = net(as_input(x[train])).argmax(1)
        return MethodOutput(metrics={"eval/video_acc": float((te == labels[~train]).float().mean()),
                                     "eval/train_acc": float((tr == labels[train]).float().mean()),
                                     "eval/test_videos": int((~train).sum()), "eval/train_videos": int(train.sum())},
                            timings={"train_s": time.perf_counter() - t0})
