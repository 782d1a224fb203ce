"""P4Transformer (Fan, Yang & Kankanhalli, "Point 4D Transformer Networks for Spatio-Temporal
Modeling in Point Cloud Videos", CVPR 2021), the backbone of MaST-Pre (ICCV 2023) and PointCPSC
(ICCV 2023), in pure PyTorch (point ops from :mod:`lightning_dd.nets.point_ops`).

* :class:`P4DConv`, the point-tube embedding (Sec. 3.1): anchors by farthest point sampling on every
  ``ts``-th frame (after replicate-padding ``padding`` frames at the start/end), a temporal kernel of
  ``tk`` frames around each anchor frame, in each of them the ball query (radius ``r``, ``k``
  neighbours, pointnet2 semantics) around the anchor; a shared bias-free linear map of
  (dx, dy, dz, dt), max over the neighbours and then over the kernel frames (the reference's
  ``operator='+'`` with ``in_planes=0``, one plane, no BN/activation, ``bias=False``, ``max``
  spatial and temporal pooling). Equal to the reference's ``P4DConv`` given the same FPS
  (``tests/parity/test_parity_point_video.py``).
* :class:`P4Encoder`: tube features + a linear (x, y, z, t) position embedding (t = token frame
  index + 1), a pre-norm transformer, a final LayerNorm (MaST-Pre's encoder).
* :class:`P4Classifier`: a cls token (with its own learned position) prepended, the encoder, then
  [cls output, max over the other tokens] -> MLP head (MaST-Pre's fine-tuning head: 256-256-C with
  BatchNorm, ReLU, dropout).

Deviations: the transformer is ``torch.nn.TransformerEncoderLayer`` (pre-norm, GELU), whose head
width is ``dim / heads`` (the reference lets ``heads * dim_head`` differ from ``dim``); the P4DConv
kernel loop keeps a running max over kernel frames instead of stacking them (same result, a third
of the memory), and takes the max over neighbours of the xyz part of the shared linear map with
:func:`max_of_linear` (the dt term is the same for every neighbour of a frame, so it is added after the max;
same result, a backward that never builds the ``(rows, k, dim)`` gradient).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lightning_dd.nets.point_ops import ball_query, farthest_point_sample, gather_points


class _MaxOfLinear(torch.autograd.Function):
    """``max_j (x_j @ w.T)`` with a backward through the argmax only (see :func:`max_of_linear`)."""

    @staticmethod
    def forward(ctx, x, w):
        out, idx = torch.matmul(x, w.t()).max(1)                              # (R, dim), (R, dim)
        ctx.save_for_backward(x, w, idx)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, idx = ctx.saved_tensors
        at = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])                    # (R, dim, c)
        grad_w = torch.einsum("rd,rdc->dc", g, x.gather(1, at)) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x).scatter_add_(1, at, g.unsqueeze(-1) * w)
        return grad_x, grad_w


def max_of_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The max over neighbours of a shared bias-free linear map, ``max_j x[r, j] @ w.T`` (P4DConv's
    spatial max pooling).

    Same value and, up to how exact ties share the gradient, the same gradients as
    ``(x @ w.T).amax(1)``, but the backward gathers each output channel's argmax neighbour
    (``(R, dim, c)``) instead of scattering into and multiplying out the ``(R, k, dim)`` tensor; ties
    between equal neighbours (the ball query's padding repeats the first hit) give equal gradients
    either way.

    Shapes:
        x: ``(R, k, c)``; w: ``(dim, c)``. Returns ``(R, dim)``.
    """
    return _MaxOfLinear.apply(x, w)


class P4DConv(nn.Module):
    """Point-tube embedding (P4Transformer Sec. 3.1; module docstring).

    Args:
        dim: output channels. radius: ball query radius (input units, reference: mm / 300).
        k: neighbours per kernel frame. spatial_stride: anchors = N // spatial_stride per anchor frame.
        tk: temporal kernel size (odd). ts: temporal stride. padding: replicate-padded frames (start, end).
    """

    def __init__(self, dim: int, radius: float, k: int, spatial_stride: int, tk: int = 3, ts: int = 2,
                 padding: tuple[int, int] = (1, 0)):
        super().__init__()
        if tk % 2 != 1:
            raise ValueError(f"P4DConv: the temporal kernel size must be odd, got {tk}")
        self.radius, self.k, self.spatial_stride, self.tk, self.ts = radius, k, spatial_stride, tk, ts
        self.padding = tuple(padding)
        self.conv_d = nn.Linear(4, dim, bias=False)                                 # the reference's bias=False

    def anchor_frames(self, length: int) -> list[int]:
        """Indices (into the padded clip) of the anchor frames of a ``length``-frame clip."""
        r = self.tk // 2
        return list(range(r, length + sum(self.padding) - r, self.ts))

    def forward(self, xyz: torch.Tensor, return_neighbours: bool = False):
        """Shapes:
            xyz: ``(B, L, N, 3)``. Returns anchors ``(B, L', M, 3)``, features ``(B, L', M, dim)``
            and, with ``return_neighbours``, the neighbours' coordinates ``(B, L', M, tk, k, 3)``
            (absolute, as the reference's ``xyzs_neighbors``: MaST-Pre's targets) and their indices
            into their frame's points ``(B, L', M, tk, k)`` long (the ball query's, padding
            included). ``L'`` = len(:meth:`anchor_frames`), ``M = N // spatial_stride``.

        Raises:
            ValueError: the clip has no anchor frame.
        """
        b, length, n, _ = xyz.shape
        p0, p1 = self.padding
        xyz = torch.cat([xyz[:, :1].expand(-1, p0, -1, -1), xyz, xyz[:, -1:].expand(-1, p1, -1, -1)], 1)
        frames = torch.tensor(self.anchor_frames(length), device=xyz.device)
        if len(frames) == 0:
            raise ValueError(f"P4DConv: a {length}-frame clip has no anchor frame (tk={self.tk}, padding={self.padding})")
        lp, m = len(frames), max(1, n // self.spatial_stride)
        centre = xyz[:, frames].reshape(b * lp, n, 3)
        anchors = gather_points(centre, farthest_point_sample(centre, m))            # (B*L', M, 3)
        feats, neigh, index = None, [], []
        for o in range(-(self.tk // 2), self.tk // 2 + 1):
            other = xyz[:, frames + o].reshape(b * lp, n, 3)
            idx = ball_query(self.radius, self.k, other, anchors)                   # (B*L', M, k)
            points = gather_points(other, idx)                                      # (B*L', M, k, 3)
            disp = points - anchors.unsqueeze(2)
            w = self.conv_d.weight                                                  # (dim, 4): dx dy dz dt
            f = max_of_linear(disp.flatten(0, 1), w[:, :3]).view(b * lp, m, -1)    # max over neighbours
            f = f + w[:, 3] * float(o)                                              # + the dt term
            feats = f if feats is None else torch.maximum(feats, f)                 # max over the kernel
            if return_neighbours:
                neigh.append(points)
                index.append(idx)
        out = anchors.view(b, lp, m, 3), feats.view(b, lp, m, -1)
        if return_neighbours:
            return (*out, torch.stack(neigh, 2).view(b, lp, m, self.tk, self.k, 3),
                    torch.stack(index, 2).view(b, lp, m, self.tk, self.k))
        return out


def transformer(dim: int, depth: int, heads: int, mlp_dim: int, dropout: float) -> nn.TransformerEncoder:
    """A pre-norm GELU transformer encoder (batch first)."""
    layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class P4Encoder(nn.Module):
    """P4DConv tubes + (x, y, z, t) position embedding + transformer + LayerNorm (module docstring).

    Args: as :class:`P4DConv` plus ``depth``, ``heads``, ``mlp_dim``, ``dropout`` of the transformer.
    """

    def __init__(self, dim: int = 1024, depth: int = 5, heads: int = 8, mlp_dim: int = 2048, radius: float = 0.7,
                 k: int = 32, spatial_stride: int = 32, tk: int = 3, ts: int = 2, padding: tuple[int, int] = (1, 0),
                 dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.tube = P4DConv(dim, radius, k, spatial_stride, tk, ts, padding)
        self.pos = nn.Linear(4, dim)
        self.transformer = transformer(dim, depth, heads, mlp_dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def tokens(self, clip: torch.Tensor, return_neighbours: bool = False):
        """The tube tokens of ``clip`` ``(B, L, N, 3)``: positions ``(B, T, 4)`` (x, y, z, t),
        features ``(B, T, dim)``, ``T = L' * M`` (frame-major), and with ``return_neighbours`` the
        neighbours' absolute coordinates ``(B, T, tk, k, 3)`` and ball-query indices ``(B, T, tk, k)``
        (:meth:`P4DConv.forward`)."""
        out = self.tube(clip, return_neighbours)
        anchors, feats = out[0], out[1]
        b, lp, m, _ = anchors.shape
        t = torch.arange(1, lp + 1, device=clip.device, dtype=anchors.dtype).view(1, lp, 1, 1).expand(b, lp, m, 1)
        xyzt = torch.cat([anchors, t], -1).reshape(b, lp * m, 4)
        res = (xyzt, feats.reshape(b, lp * m, -1))
        if return_neighbours:
            res = (*res, *(x.reshape(b, lp * m, *x.shape[3:]) for x in out[2:]))
        return res

    def encode(self, feats: torch.Tensor, xyzt: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer over ``feats + pos(xyzt)`` ``(B, T, dim)``, with optional ``prefix`` tokens
        ``(B, P, dim)`` (already position-embedded) in front. Returns ``(B, P + T, dim)``."""
        x = feats + self.pos(xyzt)
        if prefix is not None:
            x = torch.cat([prefix, x], 1)
        return self.norm(self.transformer(x))


class P4Classifier(nn.Module):
    """cls token + :class:`P4Encoder` + [cls, max-pool] MLP head (MaST-Pre fine-tuning).

    Shapes:
        forward: clip ``(B, L, N, 3)`` -> logits ``(B, num_classes)``; :meth:`features` -> ``(B, 2 dim)``.
    """

    def __init__(self, encoder: P4Encoder, num_classes: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.encoder = encoder
        d = encoder.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.head = nn.Sequential(nn.Linear(2 * d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        xyzt, feats = self.encoder.tokens(clip)
        prefix = (self.cls_token + self.cls_pos).expand(len(clip), -1, -1)
        out = self.encoder.encode(feats, xyzt, prefix)
        return torch.cat([out[:, 0], out[:, 1:].amax(1)], -1)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clip))
