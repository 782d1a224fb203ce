"""Point-level contrastive pretraining in the manner of PointCPSC: Sheng et al., "Point Contrastive
Prediction with Semantic Clustering for Self-Supervised Learning on Point Cloud Videos", ICCV 2023
(arXiv 2308.09247), on the P4Transformer encoder.

Per training clip two views (independent point resampling and per-axis scale U(0.9, 1.1), the
data module's training augmentation) are encoded; a projector maps every output token (point
tube) to a unit vector. Then, per batch:

1. **Correspondence**: each token of view 1 is paired with the token of view 2 nearest in (x, y, z)
   on the same anchor frame, positions standardized per clip and axis (which undoes the scale).
2. **Point-level InfoNCE** (temperature ``temperature``): the pair is the positive; the negatives are
   the other tokens of view 2 in the batch, *selected*: the tokens of the positive's own superpoint
   are not negatives (they are the same body part, likely false negatives), and tokens of *other*
   clips whose similarity to the anchor (no gradient) is among the ``supplement`` highest and above
   ``supplement_threshold`` are added as extra positives ("high-similarity positive supplements");
   the multi-positive loss is ``-log(sum_pos exp / sum_all exp)``.
3. **Superpoints** (semantic clustering): per clip, k-means (``kmeans_iters`` Lloyd steps, k-means++
   -like farthest init) of view 1's token features (no gradient) into ``superpoints`` clusters,
   carried to view 2 through the correspondence; the mean projected feature of each superpoint in
   either view forms a pair for a superpoint-level InfoNCE against the batch's other superpoints
   (semantic alignment), weighted ``superpoint_weight``.

**Rigid view augmentation** (``rotation``, ``translation``; off by default): each view is also
rotated about the vertical axis and shifted, per clip (:func:`lightning_dd.augment.point_cloud.vertical_rigid`);
the correspondence is computed in the clip's own frame (the transform undone on the anchors). The
tokens carry their (x, y, z, t) position embedding, so without it the two views' positives share
their absolute positions and the point-level task can be solved from position alone. On the
skeleton-rendered MSR-Action3D CPU preset (3 seeds) the linear probe's gain over a random encoder
rose from +9.8 +- 1.0 to +14.8 +- 1.7 points with ``rotation=30, translation=1.0`` (the preset's).
The paper-size config keeps them off, as the paper trains.

Deviations from the paper: this implements PointCPSC's two views, point-level InfoNCE, superpoint
alignment, negative selection and positive supplements on our encoder; the
paper's prediction branch over future frames, its clustering details and its schedules are not
reproduced. No momentum encoder (both views share the weights, gradients through both).
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.augment.point_cloud import undo_rigid, vertical_rigid
from lightning_dd.core.config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt
from lightning_dd.data.point_video import ClipDataset
from lightning_dd.data.protocols import PointVideoData
from lightning_dd.training.optim import optimizers
from lightning_dd.methods.point_video.pretraining import PointVideoPretraining
from lightning_dd.nets.p4transformer import P4Encoder


def match_tokens(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """For each token of view 1 the index of the nearest view-2 token on the same frame (standardized xyz).

    Shapes:
        x1, x2: ``(B, T, 4)`` positions (x, y, z, t). Returns ``(B, T)`` long.
    """
    def std(x):
        xyz = x[..., :3]
        return (xyz - xyz.mean(1, keepdim=True)) / xyz.std(1, keepdim=True).clamp_min(1e-6)

    d = torch.cdist(std(x1), std(x2))
    d = d + 1e6 * (x1[..., 3:4] != x2[..., 3].unsqueeze(1))  # other frames never match
    return d.argmin(-1)


def kmeans(x: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Cluster ids ``(B, T)`` of batched k-means on ``x`` ``(B, T, D)`` (farthest-point init)."""
    b, t, _ = x.shape
    k = min(k, t)
    first = torch.zeros(b, dtype=torch.long, device=x.device)
    idx = [first]
    mind = (x - x[torch.arange(b), first].unsqueeze(1)).pow(2).sum(-1)
    for _ in range(k - 1):
        nxt = mind.argmax(1)
        idx.append(nxt)
        mind = torch.minimum(mind, (x - x[torch.arange(b), nxt].unsqueeze(1)).pow(2).sum(-1))
    c = torch.gather(x, 1, torch.stack(idx, 1).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)
        one = F.one_hot(assign, k).to(x.dtype)                              # (B, T, k)
        c = torch.where(one.sum(1).unsqueeze(-1) > 0, one.transpose(1, 2) @ x / one.sum(1).clamp_min(1).unsqueeze(-1), c)
    return torch.cdist(x, c).argmin(-1)


def contrastive_losses(z1: torch.Tensor, z2: torch.Tensor, match: torch.Tensor, sp: torch.Tensor, temperature: float,
                       supplement: int, supplement_threshold: float) -> dict:
    """The point-level and superpoint losses (module docstring).

    Shapes:
        z1, z2: ``(B, T, D)`` unit vectors; match: ``(B, T)`` into view 2; sp: ``(B, T)`` superpoint
        ids of view-1 tokens. Returns ``{"point", "superpoint", "supplements"}``.
    """
    b, t, _ = z1.shape
    a = z1.reshape(b * t, -1)
    keys = z2.reshape(b * t, -1)
    logits = a @ keys.T / temperature                                          # (BT, BT)
    clip = torch.arange(b, device=z1.device).repeat_interleave(t)
    pos_col = (match + torch.arange(b, device=z1.device).unsqueeze(1) * t).reshape(-1)
    pos = F.one_hot(pos_col, b * t).bool()
    # superpoint of every view-2 token: carried from view 1 through the match (unmatched: -1)
    sp2 = torch.full((b, t), -1, dtype=torch.long, device=z1.device)
    sp2.scatter_(1, match, sp)
    sp2 = sp2.reshape(-1)
    same_sp = (clip.unsqueeze(1) == clip.unsqueeze(0)) & (sp.reshape(-1).unsqueeze(1) == sp2.unsqueeze(0)) & ~pos
    other_clip = clip.unsqueeze(1) != clip.unsqueeze(0)
    with torch.no_grad():
        sim = (a @ keys.T).masked_fill(~other_clip, -2.0)
        n_sup = min(supplement, int(other_clip.sum(1).min()))
        sup = torch.zeros_like(pos)
        if n_sup > 0:
            val, col = sim.topk(n_sup, dim=1)
            sup.scatter_(1, col, val > supplement_threshold)
    positives = pos | sup
    logits = logits.masked_fill(same_sp, float("-inf"))                        # not negatives
    point = -(torch.logsumexp(logits.masked_fill(~positives, float("-inf")), 1) - torch.logsumexp(logits, 1)).mean()
    # superpoint alignment
    k = int(sp.max()) + 1
    one1 = F.one_hot(sp, k).to(z1.dtype)                                        # (B, T, k)
    one2 = torch.zeros_like(one1).scatter_(1, match.unsqueeze(-1).expand(-1, -1, k), one1)
    s1 = F.normalize(one1.transpose(1, 2) @ z1, dim=-1).reshape(b * k, -1)
    s2 = F.normalize(one2.transpose(1, 2) @ z2, dim=-1).reshape(b * k, -1)
    present = (one1.sum(1) > 0).reshape(-1)
    s1, s2 = s1[present], s2[present]
    sp_loss = F.cross_entropy(s1 @ s2.T / temperature, torch.arange(len(s1), device=z1.device))
    return {"point": point, "superpoint": sp_loss, "supplements": sup.float().sum(1).mean()}


class PointContrastModule(L.LightningModule):
    """Encoder + projector + the point-level and superpoint losses (module docstring)."""

    def __init__(self, encoder: P4Encoder, hp: "PointContrast", steps: int):
        super().__init__()
        self.encoder, self.hp, self.total_steps = encoder, hp, steps
        d = encoder.dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, hp.proj_dim))

    def losses(self, views: torch.Tensor) -> dict:
        """``views`` ``(B, 2, L, N, 3)`` -> ``{"loss", "point", "superpoint", "supplements"}``."""
        out = []
        for v in (views[:, 0], views[:, 1]):
            rigid = self.hp.rotation > 0 or self.hp.translation > 0
            if rigid:
                v, rot, offset = vertical_rigid(v, self.hp.rotation, self.hp.translation)
            xyzt, f = self.encoder.tokens(v)
            z = F.normalize(self.projector(self.encoder.encode(f, xyzt)), dim=-1)
            if rigid:  # match in the clip's own frame
                xyzt = torch.cat([undo_rigid(xyzt[..., :3], rot, offset), xyzt[..., 3:]], -1)
            out.append((xyzt, z))
        (x1, z1), (x2, z2) = out
        with torch.no_grad():
            match = match_tokens(x1, x2)
            sp = kmeans(z1.detach(), self.hp.superpoints, self.hp.kmeans_iters)
        res = contrastive_losses(z1, z2, match, sp, self.hp.temperature, self.hp.supplement,
                                 self.hp.supplement_threshold)
        res["loss"] = res["point"] + self.hp.superpoint_weight * res["superpoint"]
        return res

    def training_step(self, batch, _):
        out = self.losses(batch[0])
        self.log_dict({f"pretrain/{k}": v for k, v in out.items()}, prog_bar=True, on_step=True, on_epoch=True)
        return out["loss"]

    def configure_optimizers(self):
        return optimizers(self.hp.optimizer, self.hp.scheduler, self.parameters(), self.total_steps,
                          self.hp.warmup_steps(self.total_steps))


class PointContrast(PointVideoPretraining):
    """Point-level contrastive pretraining (module docstring), ``conf/method/point_contrast.yaml``;
    saves ``encoder.pt``; evaluated like MaST-Pre (linear probes, pretrained vs random encoder)."""

    proj_dim: PositiveInt
    temperature: PositiveFloat
    superpoints: PositiveInt
    kmeans_iters: PositiveInt
    superpoint_weight: NonNegFloat
    supplement: NonNegInt
    supplement_threshold: float

    def train_clips(self, dm: PointVideoData) -> ClipDataset:
        """Two views of every training clip (items ``(2, L, N, 3)``)."""
        return dm.clips("train", views=2)

    def pretext(self, encoder: P4Encoder, steps: int) -> PointContrastModule:
        return PointContrastModule(encoder, self, steps)
