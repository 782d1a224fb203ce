"""Self-supervised pretraining of the P4Transformer encoder on point-cloud videos: what the pretexts
(:mod:`.mast_pre`, MaST-Pre, ICCV 2023, arXiv 2308.09245; :mod:`.point_contrast`, PointCPSC, ICCV
2023, arXiv 2308.09247) share: one run (a seeded, step-checkpointed, resumable fit of the pretext's
LightningModule over the training clips), the saved encoder (``encoder.pt``) and the evaluation
(linear probes of the pretrained against a random encoder of the same shape)."""
from __future__ import annotations

import time
from typing import ClassVar

import lightning as L
import torch

from lightning_dd.core.config import Fraction, NonNegFloat, PositiveInt
from lightning_dd.data.point_video import ClipDataset
from lightning_dd.data.protocols import PointVideoData
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.point_video.common import (EncoderConfig, PointVideoMethod, ProbeConfig, linear_probe,
                                                     save_encoder)
from lightning_dd.training.optim import OptimizerFactory, ScheduleFactory
from lightning_dd.nets.p4transformer import P4Encoder


class PointVideoPretraining(PointVideoMethod):
    """What the self-supervised pretexts share: the encoder settings, the ``optimizer`` (AdamW in the
    configs) and per-step ``scheduler`` (warmup then cosine), ``epochs`` with a ``warmup_fraction`` of
    warmup steps, the rigid augmentation of the pretraining clips (``rotation`` degrees about the
    vertical axis, ``translation`` data units per axis:
    :func:`lightning_dd.augment.point_cloud.vertical_rigid`; 0 = off, as in the papers' MSR-Action3D
    training), the linear-probe evaluation settings ``probe``.

    A pretext names its LightningModule (:meth:`pretext`, whose ``training_step`` logs its losses
    under ``pretrain/``) and, if not the plain training clips, its training set (:meth:`train_clips`).

    Result: ``out.result`` is the trained :class:`P4Encoder`; :meth:`save` writes it to
    ``encoder.pt`` (:func:`lightning_dd.methods.point_video.common.save_encoder`, with the last
    epoch's losses as ``final_losses``); metrics ``pretrain/<loss>_epoch``.
    """

    stages: ClassVar[tuple[str, ...]] = ("all", "pretrain")
    encoder: EncoderConfig
    optimizer: OptimizerFactory
    scheduler: ScheduleFactory
    epochs: PositiveInt
    warmup_fraction: Fraction
    rotation: NonNegFloat
    translation: NonNegFloat
    probe: ProbeConfig

    def pretext(self, encoder: P4Encoder, steps: int) -> L.LightningModule:  # pragma: no cover - abstract
        """The LightningModule that trains ``encoder`` (its attribute ``encoder``) for ``steps``
        optimizer steps."""
        raise NotImplementedError

    def train_clips(self, dm: PointVideoData) -> ClipDataset:
        """The pretraining set: the training clips (one view each)."""
        return dm.clips("train")

    def warmup_steps(self, steps: int) -> int:
        """Warmup steps of a ``steps``-step schedule: ``warmup_fraction`` of them, at least 1."""
        return max(1, int(self.warmup_fraction * steps))

    def run(self, ctx: RunContext[PointVideoData]) -> MethodOutput:
        from lightning.pytorch.callbacks import ModelCheckpoint

        t0, dm = time.perf_counter(), ctx.dm
        L.seed_everything(ctx.seed, verbose=False)
        loader = dm.loader(self.train_clips(dm), shuffle=True, drop_last=True)
        module = self.pretext(self.encoder.build(), self.epochs * len(loader))
        ckpt_dir = ctx.out_dir / "checkpoints"
        trainer = ctx.make_trainer("pretrain", max_epochs=self.epochs, logger=ctx.loggers,
                                   callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                                   enable_checkpointing=True, log_every_n_steps=5)
        trainer.fit(module, loader, ckpt_path=ctx.resume_from(ckpt_dir / "last.ckpt", "pretraining"))
        hist = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_epoch")}
        return MethodOutput(result=module.encoder, metrics=hist, timings={"pretrain_s": time.perf_counter() - t0})

    def save(self, ctx: RunContext, out: MethodOutput) -> None:
        save_encoder(out.result, self.encoder, ctx.out_dir / "encoder.pt", self.name, final_losses=out.metrics)

    def evaluate(self, ctx: RunContext[PointVideoData], out: MethodOutput) -> dict:
        return probe_pretrained_vs_random(ctx, out.result.cpu(), self.encoder, self.probe)


def probe_pretrained_vs_random(ctx: RunContext[PointVideoData], encoder: P4Encoder, settings: EncoderConfig,
                               probe: ProbeConfig) -> dict:
    """Linear probes (:func:`linear_probe`) of ``encoder`` and of a random encoder of the same
    ``settings`` (seeded by the run's seed), each probed on the same training clips (the same
    probe seed): ``eval/linear_probe/{video_acc,video_acc_std,clip_acc,train_acc}``,
    ``eval/linear_probe_random/...`` and ``eval/linear_probe/gain`` (video accuracy points)."""
    dm = ctx.dm
    torch.manual_seed(ctx.seed)
    rand = settings.build()
    train, test = dm.clips("train"), dm.clips("test")
    res = {}
    for tag, e in (("linear_probe", encoder), ("linear_probe_random", rand)):
        for k, v in linear_probe(e, train, test, dm.test_labels, dm.num_classes, probe, ctx.seed).items():
            res[f"eval/{tag}/{k}"] = v
    res["eval/linear_probe/gain"] = 100 * (res["eval/linear_probe/video_acc"] - res["eval/linear_probe_random/video_acc"])
    return res
