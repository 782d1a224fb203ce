"""The one augmentation pipeline of statistics matching: jitter (roll), random-resized crop, flip.

Recovery's per-step views (:meth:`~.recover.RecoverModule.augment`) and the fixed views that
measure the BN loss before and after recovery (:func:`~.statistics.bn_loss_views`) both call
:func:`jitter_crop_flip`, with explicit ``torch.Generator`` streams so that every view can be drawn
again (a resumed fit draws what an uninterrupted one would). CDA's curriculum on the crop scale
is :func:`crop_scale_min`.

The reference code's views (one box and one flip for the batch) are torchvision's own transforms
on the batch tensor (:func:`batch_crop_flip`); per-image crops (``crop_per_image``) are
:func:`lightning_dd.augment.crops.sample_crops` and :func:`lightning_dd.augment.crops.crop_resize`.
The roll is ``torch.roll``.
"""
from __future__ import annotations

import math

import torch

from lightning_dd.augment.crops import crop_resize, sample_crops


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
