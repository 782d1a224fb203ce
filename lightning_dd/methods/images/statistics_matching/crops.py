"""The one augmentation pipeline of statistics matching: jitter (roll), random-resized crop, flip.

Recovery's per-step views (:meth:`~.recover.RecoverModule.augment`) and the fixed views that
measure the BN loss before and after recovery (:func:`~.statistics.bn_loss_views`) both call
:func:`jitter_crop_flip`, with explicit ``torch.Generator`` streams so that every view can be drawn
again (a resumed fit draws what an uninterrupted one would). CDA's curriculum on the crop scale
is :func:`crop_scale_min`.

The reference code's views (one box and one flip for the batch) are torchvision's own transforms
on the batch tensor (:func:`batch_crop_flip`); per-image crops (``crop_per_image``) are
:func:`crop_resize`, one batched ``affine_grid`` + ``grid_sample`` (bilinear,
``align_corners=True``, the sampling of kornia's ``crop_and_resize`` at about half its cost on
CPU). The roll is ``torch.roll``.
"""
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


def batch_crop_flip(images: torch.Tensor, seed: int, *, scale: tuple[float, float], flip: bool,
                    pad: int = 0) -> torch.Tensor:
    """One crop box and one horizontal flip for the whole batch, drawn and applied by torchvision's own
    transforms as the reference code calls them on the batch tensor (SRe2L's ``data_synthesis.py``,
    CDA's ``recover_cda_in1k.py``: ``RandomResizedCrop(size, scale)`` then ``RandomHorizontalFlip()``;
    G-VBSM's CIFAR recovery: ``RandomCrop(size, padding=4)`` then the flip), on the global torch RNG
    seeded ``seed`` inside :func:`torch.random.fork_rng` (the caller's RNG state is left as it was):
    the same ``seed`` gives the view the reference's ``aug_function(images)`` gives after
    ``torch.manual_seed(seed)``.

    Args:
        scale: ``(min, max)`` area fraction of the random-resized crop (aspect ratio 3/4-4/3,
            bilinear resize back to ``(H, W)``); ignored when ``pad > 0``.
        flip: append ``RandomHorizontalFlip()`` (p = 1/2, one draw for the batch).
        pad: ``> 0``: a ``RandomCrop((H, W), padding=pad)`` (zero padding) instead of the
            random-resized crop.

    Shapes:
        images: ``(N, C, H, W)``; returns ``(N, C, H, W)`` (differentiable in ``images``).
    """
    from torchvision import transforms as T

    size = tuple(images.shape[-2:])
    crop = T.RandomCrop(size, padding=pad) if pad > 0 else T.RandomResizedCrop(size, scale=tuple(scale))
    aug = T.Compose([crop, T.RandomHorizontalFlip()] if flip else [crop])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return aug(images)


def jitter_crop_flip(images: torch.Tensor, generator: torch.Generator, *, jitter: int,
                     scale: tuple[float, float], flip: bool, per_image: bool = False, pad: int = 0,
                     draw_unused_flips: bool = False) -> torch.Tensor:
    """One augmented view of a batch (SRe2L Sec. 3.2's "multi-crop optimization"), in the reference
    code's order: crop and flip, then roll the whole batch by ``(off_h, off_w) ~ U{0, ..., jitter}^2``
    pixels (circular, ``torch.roll(x, (off_h, off_w), (2, 3))`` as ``random.randint(0, jitter)``
    there). Differentiable in ``images``.

    The crop and flip: ``per_image=False`` (the reference's): one box and one flip for the batch,
    :func:`batch_crop_flip` with a seed drawn from ``generator``; skipped (no draw) when it cannot
    change the images (``scale == (1, 1)``, ``pad == 0``, no flip: SRe2L's CIFAR recovery is the roll
    alone). ``per_image=True``: every image its own random-resized crop of area fraction in
    ``scale`` (:func:`sample_crops`, :func:`crop_resize`) and, where ``flip``, its own flip with
    probability 1/2 (``pad`` is not supported there).

    Random draws from ``generator``, in this order (recovery's checkpoints rely on it): the crop
    (``per_image``: the boxes, then the ``N`` flip uniforms when ``flip`` or ``draw_unused_flips``;
    else one int64 seed), then the two roll offsets (``torch.randint``, only when ``jitter > 0``).
    ``draw_unused_flips=True`` draws the per-image flips even when they are not applied, so that
    the views that follow do not depend on ``flip``.

    Shapes:
        images: ``(N, C, H, W)``; returns ``(N, C, H, W)``.

    Raises:
        ValueError: ``scale`` not within ``(0, 1]`` or decreasing; ``pad > 0`` with ``per_image``.
    """
    n, _, h, w = images.shape
    lo, hi = float(scale[0]), float(scale[1])
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    x = images
    if per_image:
        if pad > 0:
            raise ValueError("per-image crops are random-resized crops: pad must be 0")
        boxes = sample_crops(n, h, w, scale, generator)
        flips = torch.rand(n, generator=generator) < 0.5 if (flip or draw_unused_flips) else None
        x = crop_resize(x, boxes, flips if flip else None)
    elif flip or pad > 0 or lo < 1:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        x = batch_crop_flip(x, seed, scale=scale, flip=flip, pad=pad)
    if jitter > 0:
        off_h, off_w = torch.randint(0, jitter + 1, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(off_h, off_w), dims=(2, 3))
    return x


_CURRICULA = {
    "cosine": lambda p, start, end: end + (start - end) * 0.5 * (1 + math.cos(math.pi * p)),
    "linear": lambda p, start, end: end + (start - end) * (1 - p),
    "step": lambda p, start, end: start,
}


def crop_scale_min(iteration: int, iterations: int, schedule: str, start: float = 1.0, end: float = 0.08,
                   milestone: float = 1.0) -> float:
    """CDA's easy-to-hard curriculum (arXiv 2311.18838, Sec. 3.2) on the lower bound of the
    random-resized crop's scale, as CDA's code computes it (``recover_cda_in1k.py``): while
    ``iteration < milestone * iterations`` the progress is ``p = iteration / (milestone *
    iterations)`` and the bound goes from ``start`` (large crops, easy) towards ``end`` (0.08,
    hard); from ``milestone * iterations`` on it is ``end``. With ``milestone=1`` the last
    iteration is one step short of ``end``, as in CDA.

    Args:
        schedule: ``cosine`` (``end + (start - end) * (1 + cos(pi p)) / 2``), ``linear``
            (``end + (start - end) * (1 - p)``), ``step`` (``start`` until the milestone, then
            ``end``), or ``none`` (always ``end``: SRe2L). Validated by
            :class:`~.config.RecoverConfig` (``crop_schedule``).
        milestone: fraction of the iterations in ``(0, 1]`` (``RecoverConfig.milestone``).

    Returns:
        the crop scale's lower bound (area fraction) at ``iteration``.

    Raises:
        KeyError: an unknown ``schedule`` (reached only by direct calls: the config rejects it).
    """
    span = milestone * iterations
    if schedule == "none" or iteration >= span:
        if schedule != "none":
            _CURRICULA[schedule]  # an unknown name fails past the milestone too
        return end
    return _CURRICULA[schedule](iteration / span, start, end)
