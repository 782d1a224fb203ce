"""Rigid augmentation of point-cloud video clips: a random rotation about the vertical axis and a
random translation, one per clip (the same for all its frames, so the motion is kept), with the
inverse map, so that positions seen by an encoder can be brought back to the clip's own frame.

Vertical is the camera's y axis (Kinect camera space: x right, y up, z depth), as in the
MSR-Action3D data of :mod:`lightning_dd.data.point_video`.
"""
from __future__ import annotations

import math

import torch


def vertical_rigid(clip: torch.Tensor, max_angle: float, max_shift: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate each clip about the vertical (y) axis through its centroid by an angle drawn from
    U(-``max_angle``, ``max_angle``) (degrees), then translate it by a shift drawn per axis from
    U(-``max_shift``, ``max_shift``) (the clip's units).

    Shapes:
        clip: ``(B, L, N, 3)``. Returns ``(augmented (B, L, N, 3), rot (B, 3, 3), offset (B, 3))``
        with ``augmented = clip @ rot^T + offset``; :func:`undo_rigid` inverts it on any positions.
    """
    b = clip.shape[0]
    dev, dt = clip.device, clip.dtype
    angle = (torch.rand(b, generator=generator) * 2 - 1).to(dev, dt) * math.radians(max_angle)
    c, s = angle.cos(), angle.sin()
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    rot = torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
                       torch.stack([-s, zero, c], -1)], 1)                              # (B, 3, 3)
    shift = (torch.rand(b, 3, generator=generator) * 2 - 1).to(dev, dt) * max_shift
    centre = clip.reshape(b, -1, 3).mean(1)                                               # (B, 3)
    offset = centre - torch.einsum("bij,bj->bi", rot, centre) + shift
    out = torch.einsum("blnj,bij->blni", clip, rot) + offset[:, None, None]
    return out, rot, offset


def undo_rigid(xyz: torch.Tensor, rot: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Positions ``xyz`` ``(B, ..., 3)`` of an augmented clip back in the clip's own frame (the
    inverse of :func:`vertical_rigid`: ``(xyz - offset) @ rot``)."""
    shape = xyz.shape
    flat = xyz.reshape(shape[0], -1, 3) - offset[:, None]
    return torch.einsum("bpi,bij->bpj", flat, rot).reshape(shape)
