"""Supervised action recognition on point-cloud videos with the P4Transformer backbone (Fan et
al., CVPR 2021): fine-tuning a pretrained encoder (MaST-Pre, ICCV 2023, Sec. 4.1 protocol: cls
token + max-pool head, AdamW, cosine schedule) or training from scratch, or linear probing of a
frozen encoder; optionally on a fraction of the training labels (per class, seeded).

``method.pretrained=<run>/encoder.pt`` (an encoder checkpoint of :mod:`.mast_pre` or any method that
saves one; loaded with ``weights_only=True``) sets the encoder, whose settings then come from the
checkpoint; ``null`` starts from a random encoder of ``method.encoder``.

Metrics: ``eval/video_acc`` (clip scores summed per video; test subjects 6-10), ``eval/clip_acc``.

Deviation: one optimizer (AdamW, ``method.optimizer``) for every setting, where the P4Transformer
scratch baseline used SGD with momentum (its lr 0.01, warmup 10 epochs); the same recipe for scratch
and pretrained runs keeps the comparison about the initialization.
"""
from __future__ import annotations

import time
from typing import Callable, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F

from lightning_dd.core.config import ConfigError, Fraction, NonNegInt, PositiveInt
from lightning_dd.data.point_video import video_accuracy
from lightning_dd.data.protocols import PointVideoData
from lightning_dd.io import atomic_save
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.point_video.common import (EncoderConfig, PointVideoMethod, ProbeConfig, linear_probe,
                                                     load_encoder)
from lightning_dd.training.optim import OptimizerFactory, ScheduleFactory, optimizers
from lightning_dd.nets.p4transformer import P4Classifier


class ClassifierModule(L.LightningModule):
    """P4Classifier trained with cross-entropy (label smoothing); ``optimizer`` (``params -> Optimizer``)
    and ``scheduler`` (``(optimizer, total=steps, warmup=warmup) -> LRScheduler``, stepped per step)."""

    def __init__(self, net: P4Classifier, optimizer: Callable, scheduler: Callable, steps: int, warmup: int,
                 label_smoothing: float):
        super().__init__()
        self.net, self.make_optimizer, self.make_scheduler = net, optimizer, scheduler
        self.steps, self.warmup, self.ls = steps, warmup, label_smoothing

    def training_step(self, batch, _):
        clip, y, _v = batch
        logits = self.net(clip)
        loss = F.cross_entropy(logits, y, label_smoothing=self.ls)
        self.log_dict({"finetune/loss": loss, "finetune/acc": (logits.argmax(1) == y).float().mean()},
                      prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return optimizers(self.make_optimizer, self.make_scheduler, self.parameters(), self.steps, self.warmup)


@torch.no_grad()
def test_scores(net: P4Classifier, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax scores ``(n_clips, C)``, labels and video indices of every test clip."""
    net.eval()
    s, ys, vs = [], [], []
    for clip, y, v in loader:
        s.append(net(clip).softmax(1))
        ys.append(y)
        vs.append(v)
    return torch.cat(s), torch.cat(ys), torch.cat(vs)


class PointVideoFinetune(PointVideoMethod):
    """Fine-tune / train from scratch / linear-probe a P4Transformer classifier (module docstring),
    ``conf/method/msr_finetune.yaml``.

    Result (``finetune`` mode): ``out.result`` is the trained :class:`P4Classifier`; :meth:`save`
    writes ``classifier.pt`` (``{"classifier": state_dict, "encoder_config", "num_classes",
    "head_hidden"}``). ``linear`` mode has no artifact: its probe is its evaluation (in :meth:`run`).
    """

    stages: ClassVar[tuple[str, ...]] = ("all", "train")
    pretrained: str | None
    mode: Literal["finetune", "linear"]
    encoder: EncoderConfig
    label_fraction: Fraction
    epochs: PositiveInt
    optimizer: OptimizerFactory
    scheduler: ScheduleFactory
    warmup_epochs: NonNegInt
    label_smoothing: Fraction
    head_hidden: PositiveInt
    head_dropout: Fraction
    probe: ProbeConfig

    def check(self, ctx: RunContext) -> None:
        if self.label_fraction <= 0:
            raise ConfigError("method.label_fraction must be > 0")
        if self.pretrained is not None and not str(self.pretrained).strip():
            raise ConfigError("method.pretrained: empty path")

    def _encoder(self, ctx: RunContext):
        if self.pretrained:
            return load_encoder(self.pretrained)
        torch.manual_seed(ctx.seed)
        return self.encoder.build(), self.encoder

    def run(self, ctx: RunContext[PointVideoData]) -> MethodOutput:
        t0, dm = time.perf_counter(), ctx.dm
        L.seed_everything(ctx.seed, verbose=False)
        encoder, enc_cfg = self._encoder(ctx)
        subset = None if self.label_fraction >= 1 else dm.labelled_subset(self.label_fraction, ctx.seed)
        n_lab = len(dm.train_labels) if subset is None else len(subset)
        metrics = {"train/labelled_videos": n_lab}
        if self.mode == "linear":
            res = linear_probe(encoder, dm.clips("train", subset), dm.clips("test"), dm.test_labels, dm.num_classes,
                               self.probe, ctx.seed)
            metrics.update({f"eval/{k}": v for k, v in res.items()})
            return MethodOutput(metrics=metrics, timings={"train_s": time.perf_counter() - t0})
        net = P4Classifier(encoder, dm.num_classes, self.head_hidden, self.head_dropout)
        loader = dm.loader(dm.clips("train", subset), shuffle=True, drop_last=True)
        steps = self.epochs * len(loader)
        module = ClassifierModule(net, self.optimizer, self.scheduler, steps, self.warmup_epochs * len(loader),
                                  self.label_smoothing)
        trainer = ctx.make_trainer("finetune", max_epochs=self.epochs, logger=ctx.loggers, log_every_n_steps=5)
        trainer.fit(module, loader)
        return MethodOutput(result=net, extras={"encoder_config": enc_cfg}, metrics=metrics,
                            timings={"train_s": time.perf_counter() - t0})

    def save(self, ctx: RunContext, out: MethodOutput) -> None:
        if out.result is None:
            return  # linear mode
        atomic_save({"classifier": out.result.state_dict(), "encoder_config": out.extras["encoder_config"].model_dump(),
                     "num_classes": ctx.dm.num_classes, "head_hidden": self.head_hidden}, ctx.out_dir / "classifier.pt")

    def evaluate(self, ctx: RunContext[PointVideoData], out: MethodOutput) -> dict:
        if out.result is None:
            return {}  # linear mode: evaluated in run
        dm = ctx.dm
        scores, y, v = test_scores(out.result.cpu(), dm.loader(dm.clips("test"), shuffle=False))
        return {"eval/video_acc": video_accuracy(scores, v, dm.test_labels),
                "eval/clip_acc": float((scores.argmax(1) == y).float().mean())}
