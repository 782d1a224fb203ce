"""MaST-Pre: Shen et al., "Masked Spatio-Temporal Structure Prediction for Self-supervised Learning
on Point Cloud Videos", ICCV 2023 (arXiv 2308.09245; reference code JohnsonSign/MaST-Pre).

Pretraining (Sec. 3): the clip's point tubes (:class:`~lightning_dd.nets.p4transformer.P4DConv`
tokens) are masked at random, ``mask_ratio`` (75%) of them per sample; the P4Transformer encoder
sees only the visible tubes (+ their (x, y, z, t) positions); an MAE-style decoder gets the encoded
visible tokens (linearly projected) and one shared mask token per masked tube, each plus its
decoder position embedding, and predicts for every masked tube

* its point patch in each of the ``tk`` kernel frames: the ``k`` ball-query neighbours'
  absolute coordinates (the reference's ``xyzs_neighbors``), scored by Chamfer-L2 per frame
  (:func:`~lightning_dd.nets.point_ops.chamfer_l2`), averaged over the frames (Sec. 3.3);
* its temporal cardinality differences (Sec. 3.4): per kernel frame the reference's 8-volume
  interpolated neighbour histogram (:func:`cardinality_descriptor`), differenced between
  consecutive frames, SmoothL1.

The loss is their sum (:func:`mast_pre_losses`). After pretraining, the family's evaluation
(:class:`~lightning_dd.methods.point_video.pretraining.PointVideoPretraining`) linear-probes the
frozen encoder and, as the baseline, the same probe on a frozen *randomly initialized* encoder of
the same shape. The targets and losses equal the reference's on fixed
inputs (``tests/parity/test_parity_point_video.py``).

Options that leave the reference (named, off by default):

* ``target=displacement``: the point targets minus the anchor (this module's first version).
* ``cardinality=fraction`` (set by the CPU preset): soft shares of the ``k`` ball-query slots in
  2 elevation (y up) x 4 azimuth (x-z plane) bins (:func:`soft_cardinality`), padding included.
  On the skeleton-rendered CPU data, against soft *counts* of the distinct neighbours (an earlier
  reading of the reference, since replaced by :func:`cardinality_descriptor`), the shares' linear
  probe gained more (seed 0, 30 epochs, paired 3-repeat probe: +4.2 over a random encoder against
  +2.3): there the count differences between consecutive frames are mostly the resampling noise
  of the rendered points, a SmoothL1 of 0.60 that does not fall.

Deviations from the reference code kept: the transformer layers are ``torch.nn.TransformerEncoderLayer``
(pre-norm, GELU, head width ``dim / heads``; the reference's heads are ``dim_head`` wide, and its
dropout (``dropout1``, 0.05 in both transformers here too) acts only in the MLP, torch's also on the
attention weights and after attention); the linear heads and position embeddings are
``nn.Linear`` (the reference's 1x1 ``Conv1d``, the same map); the per-sample masks come from
``torch.rand(...).argsort`` (the reference shuffles a numpy 0/1 vector per sample: the same
distribution, other draws); the learning rate is warmed up and cosine-annealed per step to 0
(the reference's timm ``CosineLRScheduler`` steps per epoch, from 1e-6 to a floor of 1e-6).
"""
from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.augment.point_cloud import vertical_rigid
from lightning_dd.core.config import ConfigError, Fraction, PositiveInt
from lightning_dd.methods.base import RunContext
from lightning_dd.training.optim import optimizers
from lightning_dd.methods.point_video.pretraining import PointVideoPretraining
from lightning_dd.nets.p4transformer import P4Encoder, transformer
from lightning_dd.nets.point_ops import chamfer_l2


def cardinality_descriptor(disp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """MaST-Pre's point-tube cardinality descriptor of one kernel frame (Sec. 3.4; the reference's
    ``getDescribe`` with ``useInterpolation=True, useNormalization=False``, a SHOT-style histogram).

    Each real neighbour falls in one of 8 volumes: 4 azimuth sectors of the (x, y) plane (sector
    ``s`` spans ``[-180 + 90 s, -90 + 90 s)`` degrees, centre ``-135 + 90 s``) x 2 elevation halves
    (``z <= 0`` / ``z > 0``; volume ``2 s + [z > 0]``), and adds, linearly interpolated:

    * elevation: ``1 - |e|`` to its volume, where ``e`` is the inclination ``acos(z / |d|)``
      minus its half's centre (45 or 135 degrees) in units of 90 degrees; toward the equator
      (inclination in [45, 135] degrees) the other half's volume gets ``|e|``, beyond the centres
      the ``|e|`` is dropped;
    * azimuth (not for a neighbour on the z axis): ``1 - |a|`` to its volume and ``|a|`` to the
      adjacent sector's volume of the same half on the side it leans to (cyclic), ``a`` the
      azimuth minus its sector's centre in units of 90 degrees (clamped to +-0.5).

    So each neighbour adds between 1.5 and 2 (6 neighbours: ~11.5-11.9). Counted are the distinct
    ball-query hits: the first slot and every slot whose index differs from it; a row whose indices
    are all 0 (the ball query's empty ball, or a ball holding only point 0) counts nothing. Not
    normalized (the reference's ``useNormalization=False``).

    Shapes:
        disp: ``(..., k, 3)`` neighbour minus anchor (x, y, z: z the camera depth of the
        reference's data); index: ``(..., k)`` the ball query's indices. Returns ``(..., 8)`` in
        ``disp``'s dtype.
    """
    x, y, z = disp.unbind(-1)
    half_pi = torch.pi / 2
    upper = (y > 0) | ((y == 0) & (x < 0))
    right = (x > 0) | ((x == 0) & (y > 0))
    sector = 2 * upper.long() + (right != upper).long()                       # 0..3 by azimuth
    volume = 2 * sector + (z > 0).long()
    incl = torch.acos((z / (disp.norm(dim=-1) + 1e-15)).clamp(-1.0, 1.0))
    lower = (incl > half_pi) | (((incl - half_pi).abs() < 1e-6) & (z <= 0))
    e = (incl - torch.where(lower, 1.5 * half_pi, 0.5 * half_pi)) / half_pi
    equatorward = torch.where(lower, incl <= 1.5 * half_pi, incl >= 0.5 * half_pi)
    has_xy = (x != 0) | (y != 0)
    a = ((torch.atan2(y, x) - (sector * half_pi - 1.5 * half_pi)) / half_pi).clamp(-0.5, 0.5)
    a = torch.where(has_xy, a, torch.zeros_like(a))
    side = torch.where(a > 0, 2, -2)
    hot = lambda v: F.one_hot(v % 8, 8).to(disp.dtype)                      # (..., k, 8)
    w = hot(volume) * ((1 - e.abs()) + has_xy * (1 - a.abs())).unsqueeze(-1)
    w = w + hot(volume ^ 1) * (equatorward * e.abs()).unsqueeze(-1) + hot(volume + side) * a.abs().unsqueeze(-1)
    real = index != index[..., :1]
    real[..., 0] = True
    real &= (index != 0).any(-1, keepdim=True)
    return (w * real.unsqueeze(-1)).sum(-2)


def soft_cardinality(disp: torch.Tensor, radius: float, temp: float = 0.25) -> torch.Tensor:
    """Soft shares of the ``k`` ball-query slots in 2 elevation x 4 azimuth bins
    (``method.cardinality=fraction``, this module's first reading of Sec. 3.4, kept for the CPU
    preset; not the reference's :func:`cardinality_descriptor`): y is up, azimuth in the x-z plane;
    elevation by a sigmoid of the vertical displacement, azimuth by a softmax over the cosine to the
    4 bin centres. Every slot adds ``1 / k``, the ball query's padding included, so rows sum to 1.

    Shapes:
        disp: ``(..., k, 3)`` neighbour minus anchor. Returns ``(..., 8)`` (bins 0-3 above the
        anchor, 4-7 below).
    """
    up = torch.sigmoid(disp[..., 1] / (0.1 * radius))                      # elevation: above / below
    elev = torch.stack([up, 1 - up], -1)                                   # (..., k, 2)
    phi = torch.atan2(disp[..., 2], disp[..., 0])
    centres = torch.arange(4, device=disp.device, dtype=disp.dtype) * (torch.pi / 2)
    azim = (torch.cos(phi.unsqueeze(-1) - centres) / temp).softmax(-1)    # (..., k, 4)
    return (elev.unsqueeze(-1) * azim.unsqueeze(-2)).flatten(-2).mean(-2)


def mast_pre_losses(pred_points: torch.Tensor, pred_card: torch.Tensor, points: torch.Tensor,
                    card: torch.Tensor) -> dict[str, torch.Tensor]:
    """MaST-Pre's two losses over the masked tubes (Sec. 3.3-3.5), as the reference's decoder:

    * ``points``: Chamfer-L2 (:func:`~lightning_dd.nets.point_ops.chamfer_l2`) between the
      predicted and the target ``k`` points of each tube in each kernel frame, averaged over tubes
      and frames (squared input units);
    * ``cardinality``: SmoothL1 (beta 1, mean) between the predicted and the target temporal
      differences ``card[t + 1] - card[t]`` of the descriptors;

    ``loss`` = their sum.

    Shapes:
        pred_points, points: ``(..., tk, k, 3)``; pred_card: ``(..., tk - 1, 8)``; card: ``(..., tk, 8)``.
    """
    k = points.shape[-2]
    chamfer = chamfer_l2(pred_points.reshape(-1, k, 3), points.reshape(-1, k, 3))
    card_loss = F.smooth_l1_loss(pred_card, card[..., 1:, :] - card[..., :-1, :])
    return {"loss": chamfer + card_loss, "points": chamfer, "cardinality": card_loss}


def random_mask(b: int, t: int, ratio: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random mask of ``int(ratio T)`` of ``T`` tokens per sample (a random permutation per sample,
    its first ``T - int(ratio T)`` entries visible).

    Shapes:
        Returns ``(visible (B, T - int(ratio T)), masked (B, int(ratio T)))`` token indices (long).
    """
    perm = torch.rand(b, t, device=device).argsort(1)
    n_vis = t - int(ratio * t)
    return perm[:, :n_vis], perm[:, n_vis:]


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
        self.decoder = transformer(d, hp.decoder_depth, hp.decoder_heads, 2 * d, hp.encoder.dropout)
        self.decoder_norm = nn.LayerNorm(d)
        self.points_head = nn.Linear(d, 3 * self.k * self.tk)
        self.card_head = nn.Linear(d, 8 * (self.tk - 1))

    def targets(self, neigh: torch.Tensor, index: torch.Tensor, xyzt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretext's targets of tubes: their points ``(..., tk, k, 3)`` (absolute coordinates,
        the reference's; minus the anchor with ``target=displacement``) and their descriptors
        ``(..., tk, 8)`` (:func:`cardinality_descriptor`, or :func:`soft_cardinality` with
        ``cardinality=fraction``), from :meth:`P4Encoder.tokens`'s neighbours ``(..., tk, k, 3)``,
        indices ``(..., tk, k)`` and positions ``(..., 4)``."""
        disp = neigh - xyzt[..., None, None, :3]
        points = neigh if self.hp.target == "absolute" else disp
        if self.hp.cardinality == "fraction":
            return points, soft_cardinality(disp, self.encoder.tube.radius)
        return points, cardinality_descriptor(disp, index)

    def losses(self, clip: torch.Tensor) -> dict:
        """``{"loss", "points", "cardinality"}`` of a batch of clips ``(B, L, N, 3)``."""
        xyzt, feats, neigh, index = self.encoder.tokens(clip, return_neighbours=True)
        b, t, _ = feats.shape
        vis, msk = random_mask(b, t, self.hp.mask_ratio, clip.device)
        n_vis = vis.shape[1]
        take = lambda x, idx: torch.gather(x, 1, idx.view(b, -1, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
        enc = self.encoder.encode(take(feats, vis), take(xyzt, vis))
        pos = self.decoder_pos(torch.cat([take(xyzt, vis), take(xyzt, msk)], 1))
        x = torch.cat([self.decoder_embed(enc), self.mask_token.expand(b, t - n_vis, -1)], 1) + pos
        out = self.decoder_norm(self.decoder(x))[:, n_vis:]                       # (B, M, d) masked tubes
        points, card = self.targets(take(neigh, msk), take(index, msk), take(xyzt, msk))
        pred_points = self.points_head(out).view(*points.shape)                    # (B, M, tk, k, 3)
        pred_card = self.card_head(out).view(*card.shape[:-2], self.tk - 1, card.shape[-1])
        return mast_pre_losses(pred_points, pred_card, points, card)

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
        groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]  # decay: the optimizer's own weight_decay
        return optimizers(self.hp.optimizer, self.hp.scheduler, groups, self.total_steps,
                          self.hp.warmup_steps(self.total_steps))


class MaSTPre(PointVideoPretraining):
    """MaST-Pre pretraining (module docstring), ``conf/method/mast_pre.yaml``; saves ``encoder.pt``.

    Fields: ``encoder`` (P4Transformer settings; its ``dropout`` also the decoder's, as the
    reference's single ``dropout1``), decoder width/depth/heads, ``mask_ratio``, ``target``
    (``absolute``: the reference's point targets, or ``displacement`` from the anchor),
    ``cardinality`` (the targets of Sec. 3.4: ``reference``, :func:`cardinality_descriptor`, or
    ``fraction``, :func:`soft_cardinality`; module docstring), ``optimizer`` (its weight decay on
    the weight matrices only, none on biases, norms and the mask token) and ``scheduler``, ``epochs``
    with a ``warmup_fraction`` of warmup steps;
    ``probe``: the linear-probe evaluation (pretrained vs random encoder).
    """

    decoder_dim: PositiveInt
    decoder_depth: PositiveInt
    decoder_heads: PositiveInt
    mask_ratio: Fraction
    target: Literal["absolute", "displacement"]
    cardinality: Literal["reference", "fraction"]

    def check(self, ctx: RunContext) -> None:
        if self.encoder.dim % self.encoder.heads or self.decoder_dim % self.decoder_heads:
            raise ConfigError("method.encoder.dim / decoder_dim must be divisible by their heads")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")

    def pretext(self, encoder: P4Encoder, steps: int) -> MaSTPreModule:
        return MaSTPreModule(encoder, self, steps)
