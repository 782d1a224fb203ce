"""Random-resized crops of a batch, every image its own box and flip: :func:`sample_crops` draws the
boxes (torchvision's ``RandomResizedCrop.get_params`` vectorized, from an explicit
``torch.Generator``), :func:`crop_resize` applies them with one batched ``affine_grid`` +
``grid_sample`` (bilinear, ``align_corners=True``, the sampling of kornia's ``crop_and_resize`` at
about half its cost on CPU). Statistics matching's per-image views (SRe2L arXiv 2306.13092 with
``crop_per_image``) and QAT-ViT's multi-crop KD views (FKD arXiv 2112.01528) use them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crops(n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), trials: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes, torchvision's ``RandomResizedCrop.get_params`` vectorized over
    ``n`` images: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), the first of
    ``trials`` draws that fits, else the whole image. Draws ``n * trials * 4`` uniforms from
    ``generator`` (one ``torch.rand`` call), whatever is accepted.

    Args:
        scale: ``(min, max)`` area fraction, ``0 < min <= max <= 1``.

    Returns:
        ``(n, 4)`` float32 boxes ``(x0, y0, x1, y1)`` in pixels, inclusive corners.

    Raises:
        ValueError: ``scale`` not within ``(0, 1]`` or decreasing.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    area = height * width
    u = torch.rand(n, trials, 4, generator=generator)
    target = area * (lo + (hi - lo) * u[..., 0])
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(logr)
    w = torch.sqrt(target * ar).round()
    h = torch.sqrt(target / ar).round()
    ok = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    x0 = (u[rows, pick, 2] * (width - w + 1)).floor().clamp(max=width - w)
    y0 = (u[rows, pick, 3] * (height - h + 1)).floor().clamp(max=height - h)
    full = first < 0
    w, h = torch.where(full, float(width), w), torch.where(full, float(height), h)
    x0, y0 = torch.where(full, 0.0, x0), torch.where(full, 0.0, y0)
    return torch.stack([x0, y0, x0 + w - 1, y0 + h - 1], 1).float()


def _whole(boxes: torch.Tensor, height: int, width: int) -> bool:
    """Whether every box of :func:`sample_crops` is the whole image (always so at scale 1)."""
    return bool((boxes == torch.tensor([0.0, 0.0, width - 1.0, height - 1.0])).all())


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box and resize it back to ``(H, W)`` (bilinear), mirrored where
    ``flips``: one batched ``affine_grid`` + ``grid_sample`` (differentiable in ``images``; the
    same sampling as kornia's ``crop_and_resize`` with ``align_corners=True`` at about half its
    cost on CPU).

    Shapes:
        images: ``(N, C, H, W)``. boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` pixels (see
        :func:`sample_crops`). flips: ``(N,)`` bool, or ``None`` (no image mirrored).
        Returns ``(N, C, H, W)``: ``images`` itself when no image is flipped and every box is the
        whole image (scale 1, SRe2L's CIFAR setting: nothing to resample).
    """
    n, c, h, w = images.shape
    if flips is None and _whole(boxes, h, w):
        return images
    x0, y0, x1, y1 = boxes.to(images).unbind(1)
    sx = (x1 - x0) / max(w - 1, 1)
    if flips is not None:  # mirroring = sampling the crop right to left
        sx = torch.where(flips.to(images.device), -sx, sx)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (x0 + x1) / max(w - 1, 1) - 1
    theta[:, 1, 1] = (y1 - y0) / max(h - 1, 1)
    theta[:, 1, 2] = (y0 + y1) / max(h - 1, 1) - 1
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
