"""MaST-Pre: Shen et al., "Masked Spatio-Temporal Structure Prediction for Self-supervised Learning
on Point Cloud Videos", ICCV 2023 (arXiv 2308.09245; reference code JohnsonSign/MaST-Pre).

Pretraining (Sec. 3): the clip's point tubes (:class:`~lightning_dd.nets.p4transformer.P4DConv`
tokens) are masked at random, ``mask_ratio`` (75%) of them per sample; the P4Transformer encoder
sees only the visible tubes (+ their (x, y, z, t) positions); an MAE-style decoder gets the encoded
visible tokens (linearly projected) and one shared mask token per masked tube, each plus its
decoder position embedding, and predicts for every masked tube

* its point patch in each of the ``tk`` kernel frames: the ``k`` neighbour displacements of the
  ball query, scored by Chamfer-L2 per frame (:func:`~lightning_dd.nets.point_ops.chamfer_l2`),
  averaged over the frames (Sec. 3.3, "point cloud reconstruction");
* its temporal cardinality differences (Sec. 3.4): per kernel frame the soft counts of the
  neighbours in 2 elevation x 4 azimuth bins (:func:`soft_cardinality`), differenced between
  consecutive frames, SmoothL1.

The loss is their sum. After pretraining, :meth:`MaSTPre.evaluate` linear-probes the frozen encoder
and, as the baseline, the same probe on a frozen *randomly initialized* encoder of the same shape.

Deviations from the reference code: the cardinality targets are soft counts (sigmoid of the
vertical displacement for the 2 elevation bins, softmax over the cosine to the 4 azimuth-bin
centres in the horizontal x-z plane), where the reference counts neighbours into octants of the
camera frame (signs of x, y; depth z for elevation) with linear interpolation between elevation
volumes. Like the reference's (``useNormalization=False``) they are counts of the distinct
neighbours (``cardinality=count``, the default). ``cardinality=fraction`` (this module's first
version, kept for the CPU preset) divides by ``k`` with the padding slots included: the
frame-to-frame differences are then ~0.05 and SmoothL1 stays in its quadratic regime (a term of
0.006 against Chamfer's 0.13), yet on the skeleton-rendered CPU data its linear probe gained more
(seed 0, 30 epochs, the paired 3-repeat probe: +4.2 points over a random encoder, against +2.3 with
counts: there the count differences between consecutive frames are mostly the resampling noise of
the rendered points, a SmoothL1 of 0.60 that does not fall). The transformer heads have width
``dim / heads`` (torch's encoder layer); per-sample masks come from ``torch.rand(...).argsort``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.augment.point_cloud import vertical_rigid
from lightning_dd.core.config import Fraction, NonNegFloat, PositiveFloat, PositiveInt
from lightning_dd.nets.point_ops import chamfer_l2
from lightning_dd.methods.base import Method, MethodOutput, RunContext
from lightning_dd.methods.point_video.common import (EncoderConfig, ProbeConfig, cosine_warmup, linear_probe,
                                                     load_encoder, save_encoder)
from lightning_dd.nets.p4transformer import P4Encoder, transformer


def soft_cardinality(disp: torch.Tensor, radius: float, temp: float = 0.25, fraction: bool = False) -> torch.Tensor:
    """Soft neighbour counts in 2 elevation x 4 azimuth bins (MaST-Pre Sec. 3.4, soft form).

    As the reference's descriptor (``useNormalization=False``), the counts are *not* normalized:
    each real neighbour adds 1 spread over the bins, so a row sums to the number of distinct
    neighbours in the ball (0..k). Slots that are not real neighbours do not count: the padding of
    the ball query (copies of the first hit, recognized by their displacement being equal to the
    first slot's) and, for a ball with no point at all, every slot (displacement outside ``radius``).

    With ``fraction`` instead each of the ``k`` slots adds ``1 / k``, padding included (rows sum to
    1; ``method.cardinality=fraction``).

    Shapes:
        disp: ``(..., k, 3)`` displacements (x, y up, z depth), as the ball query's slots. Returns
        ``(..., 8)`` counts (elevation-major: bins 0-3 above the anchor, 4-7 below).
    """
    up = torch.sigmoid(disp[..., 1] / (0.1 * radius))                      # elevation: above / below
    elev = torch.stack([up, 1 - up], -1)                                   # (..., k, 2)
    phi = torch.atan2(disp[..., 2], disp[..., 0])
    centres = torch.arange(4, device=disp.device, dtype=disp.dtype) * (torch.pi / 2)
    azim = (torch.cos(phi.unsqueeze(-1) - centres) / temp).softmax(-1)    # (..., k, 4)
    bins = (elev.unsqueeze(-1) * azim.unsqueeze(-2)).flatten(-2)          # (..., k, 8)
    if fraction:
        return bins.mean(-2)
    pad = (disp == disp[..., :1, :]).all(-1)
    pad[..., 0] = False                                                    # the first hit itself counts
    real = ~pad & (disp.pow(2).sum(-1) < radius * radius)                 # (..., k)
    return (bins * real.unsqueeze(-1)).sum(-2)


def random_mask(b: int, t: int, ratio: float, device=None) -> torch.Tensor:
    """Indices ``(B, T)`` of a random permutation per sample: the first ``T - int(ratio T)`` visible."""
    return torch.rand(b, t, device=device).argsort(1)


class MaSTPreModule(L.LightningModule):
    """Encoder + decoder + the two MaST-Pre losses (module docstring)."""

    def __init__(self, encoder: P4Encoder, hp: "MaSTPre", steps: int):
        super().__init__()
        self.encoder, self.hp, self.total_steps = encoder, hp, steps
        tube = encoder.tube
        self.tk, self.k, d = tube.tk, tube.k, hp.decoder_dim
        self.decoder_embed = nn.Linear(encoder.dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder_pos = nn.Linear(4, d)
        self.decoder = transformer(d, hp.decoder_depth, hp.decoder_heads, 2 * d, 0.0)
        self.decoder_norm = nn.LayerNorm(d)
        self.points_head = nn.Linear(d, 3 * self.k * self.tk)
        self.card_head = nn.Linear(d, 8 * (self.tk - 1))

    def losses(self, clip: torch.Tensor) -> dict:
        """``{"loss", "points", "cardinality"}`` of a batch of clips ``(B, L, N, 3)``."""
        xyzt, feats, neigh = self.encoder.tokens(clip, return_neighbours=True)
        b, t, _ = feats.shape
        n_vis = t - int(self.hp.mask_ratio * t)
        perm = random_mask(b, t, self.hp.mask_ratio, clip.device)
        take = lambda x, idx: torch.gather(x, 1, idx.view(b, -1, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
        vis, msk = perm[:, :n_vis], perm[:, n_vis:]
        enc = self.encoder.encode(take(feats, vis), take(xyzt, vis))
        pos = self.decoder_pos(torch.cat([take(xyzt, vis), take(xyzt, msk)], 1))
        x = torch.cat([self.decoder_embed(enc), self.mask_token.expand(b, t - n_vis, -1)], 1) + pos
        out = self.decoder_norm(self.decoder(x))[:, n_vis:]                       # (B, M, d) masked tubes
        gt = take(neigh, msk)                                                      # (B, M, tk, k, 3)
        pred = self.points_head(out).view(*gt.shape)
        points = chamfer_l2(pred.reshape(-1, self.k, 3), gt.reshape(-1, self.k, 3))
        card = soft_cardinality(gt, self.encoder.tube.radius, fraction=self.hp.cardinality == "fraction")
        target = card[:, :, 1:] - card[:, :, :-1]
        card_loss = F.smooth_l1_loss(self.card_head(out).view_as(target), target)
        return {"loss": points + card_loss, "points": points, "cardinality": card_loss}

    def training_step(self, batch, _):
        clip = batch[0]
        if self.hp.rotation > 0 or self.hp.translation > 0:
            clip = vertical_rigid(clip, self.hp.rotation, self.hp.translation)[0]
        out = self.losses(clip)
        self.log_dict({f"pretrain/{k}": v for k, v in out.items()}, prog_bar=True, on_step=True, on_epoch=True)
        return out["loss"]

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.ndim > 1 and "token" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.ndim > 1 and "token" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hp.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=self.hp.lr)
        warm = max(1, int(self.hp.warmup_fraction * self.total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_warmup(s, self.total_steps, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PointVideoPretraining(Method):
    """What the self-supervised pretexts share: the encoder settings, AdamW ``lr``/``weight_decay``,
    ``epochs`` with a ``warmup_fraction`` of linear warmup then cosine, the rigid augmentation of the
    pretraining clips (``rotation``, ``translation``: :func:`lightning_dd.augment.point_cloud.vertical_rigid`,
    off by default, as in the papers' MSR-Action3D training), and the evaluation, linear
    probes of the saved ``encoder.pt`` against a random encoder (:func:`probe_pretrained_vs_random`)."""

    stages: ClassVar[tuple[str, ...]] = ("all", "pretrain")
    encoder: EncoderConfig = EncoderConfig()
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegFloat = 0.05
    epochs: PositiveInt = 200
    warmup_fraction: Fraction = 0.05
    rotation: NonNegFloat = 0.0      # degrees: rigid augmentation, a rotation about the vertical axis from U(-r, r)
    translation: NonNegFloat = 0.0   # data units (mm / 300): ... and a shift per axis from U(-t, t), per clip
    probe: ProbeConfig = ProbeConfig()

    def evaluate(self, ctx: RunContext, out: MethodOutput) -> dict:
        return probe_pretrained_vs_random(ctx, Path(out.extras["encoder"]), self.probe)


class MaSTPre(PointVideoPretraining):
    """MaST-Pre pretraining (module docstring), ``conf/method/mast_pre.yaml``; saves ``encoder.pt``.

    Fields: ``encoder`` (P4Transformer settings), decoder width/depth/heads, ``mask_ratio``,
    ``cardinality`` (the targets of Sec. 3.4: ``count``, the reference's unnormalized counts of the
    distinct neighbours, or ``fraction``, shares of the ``k`` ball-query slots; see
    :func:`soft_cardinality` and the module docstring), AdamW
    ``lr``/``weight_decay``, ``epochs`` with a ``warmup_fraction`` of linear warmup then cosine;
    ``probe``: the linear-probe evaluation (pretrained vs random encoder).

    Class attribute ``module_cls``: the LightningModule :meth:`run` trains (a subclass may swap it,
    e.g. ``experiments/point_video/encoder_dependence.py`` freezes the encoder to measure how much of
    the pretext the encoder's features carry).
    """

    module_cls: ClassVar[type[MaSTPreModule]] = MaSTPreModule
    decoder_dim: PositiveInt = 512
    decoder_depth: PositiveInt = 4
    decoder_heads: PositiveInt = 8
    mask_ratio: Fraction = 0.75
    cardinality: Literal["count", "fraction"] = "count"

    def check(self, ctx_cfg) -> None:
        from lightning_dd.core.config import ConfigError

        if self.encoder.dim % self.encoder.heads or self.decoder_dim % self.decoder_heads:
            raise ConfigError("method.encoder.dim / decoder_dim must be divisible by their heads")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")

    def run(self, ctx: RunContext) -> MethodOutput:
        from lightning.pytorch.callbacks import ModelCheckpoint

        t0, dm = time.perf_counter(), ctx.dm
        L.seed_everything(ctx.seed, verbose=False)
        loader = dm.train_dataloader()
        steps = self.epochs * len(loader)
        module = self.module_cls(self.encoder.build(), self, steps)
        ckpt_dir = ctx.out_dir / "checkpoints"
        trainer = ctx.trainer("pretrain", max_epochs=self.epochs, logger=ctx.loggers, callbacks=[
            *ctx.callbacks, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], enable_checkpointing=True,
            log_every_n_steps=5)
        trainer.fit(module, loader, ckpt_path=ctx.resume_from(ckpt_dir / "last.ckpt", "pretraining"))
        hist = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_epoch")}
        path = ctx.out_dir / "encoder.pt"
        save_encoder(module.encoder, self.encoder, path, self.name, final_losses=hist)
        return MethodOutput(extras={"encoder": str(path)}, metrics={f"{k}": v for k, v in hist.items()},
                            timings={"pretrain_s": time.perf_counter() - t0})

def probe_pretrained_vs_random(ctx: RunContext, encoder_path: Path, probe: ProbeConfig) -> dict:
    """Linear probes (:func:`linear_probe`) of the saved encoder and of a random encoder of the
    same settings (seeded by the run's seed), each probed on the same training clips (the same
    probe seed): ``eval/linear_probe/{video_acc,video_acc_std,clip_acc,train_acc}``,
    ``eval/linear_probe_random/...`` and ``eval/linear_probe/gain`` (video accuracy points)."""
    dm = ctx.dm
    enc, cfg = load_encoder(encoder_path)
    torch.manual_seed(ctx.seed)
    rand = cfg.build()
    train, test = dm.clips("train"), dm.clips("test")
    res = {}
    for tag, e in (("linear_probe", enc), ("linear_probe_random", rand)):
        for k, v in linear_probe(e, train, test, dm.test_labels, dm.num_classes, probe, ctx.seed).items():
            res[f"eval/{tag}/{k}"] = v
    res["eval/linear_probe/gain"] = 100 * (res["eval/linear_probe/video_acc"] - res["eval/linear_probe_random/video_acc"])
    return res
