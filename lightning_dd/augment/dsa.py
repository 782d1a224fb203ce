"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, arXiv 2102.08259).

DSA augments images with transforms that are differentiable with respect to the pixels, so a
distillation loss can be back-propagated through them, and *siamese*: the same sampled
parameters can be applied to several batches (real and synthetic). Here the parameters are an
explicit object (:class:`DSAParams`), sampled once by :meth:`DSA.sample` (one draw per image, as
the reference's ``DiffAugment(x, strategy)`` used by MTT/DATM's experts, inner loop and evaluation)
or :meth:`DSA.sample_siamese` (one transform per batch from a seed, as ``DiffAugment(x, strategy,
seed=s)`` in DC/DM) and applied any number of times by :meth:`DSA.apply`; this is also what lets
the constant-memory meta-gradient replay the exact augmentation of each unrolled step.

Families and magnitudes follow the reference strategy ``color_crop_cutout_flip_scale_rotate``
(``ParamDiffAug``): brightness ±0.5, saturation ×[0, 2], contrast ×[0.5, 1.5]; translation by up to
12.5% of the side with zero padding; a cutout square of half the side; horizontal flip with
probability 0.5; anisotropic scale in [1/1.2, 1.2]; rotation within ±15°. In mode ``"S"`` one
family is drawn per batch (as the reference does), in mode ``"M"`` all are applied in order.

Parity (``tests/parity/test_parity_dsa.py``): with a generator in the state of the reference's
global RNG, every family, both modes and the siamese draw give the reference's images (DSA's own
``utils.py`` and MTT's copy). Deviations from the reference: none in what is computed. Fixed here
(they made the same seed give other images, same distribution): the rotation turned the other way
(``[[cos, sin], [-sin, cos]]``) and the scale factors were drawn as one interleaved ``rand(n, 2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator

from lightning_dd.core.config import Typed

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    """Sampled augmentation parameters for a batch of ``n`` images.

    ``ops``: the families to apply, in order. ``values``: per-family tensors of shape ``(n, ...)``.
    """

    ops: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def index(self, idx: torch.Tensor) -> "DSAParams":
        """The parameters of a sub-batch ``idx`` (so a split batch gets its own params)."""
        return DSAParams(self.ops, {k: v[idx] for k, v in self.values.items()})


class DSA:
    """Differentiable siamese augmentation with explicit parameters.

    Args:
        strategy: families joined by ``_`` (subset of ``color_crop_cutout_flip_scale_rotate``),
            or ``"none"``.
        mode: ``"S"`` draws one family per batch; ``"M"`` applies all.

    Raises:
        ValueError: an unknown family or mode.
    """

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", mode: str = "S",
                 brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5,
                 crop_ratio: float = 0.125, cutout_ratio: float = 0.5, flip_prob: float = 0.5,
                 scale_ratio: float = 1.2, rotate_deg: float = 15.0):
        self.families = () if strategy in ("none", "", None) else tuple(strategy.split("_"))
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown DSA families {sorted(unknown)}; known: {FAMILIES}")
        if mode not in ("S", "M"):
            raise ValueError(f"DSA mode must be 'S' or 'M', got {mode!r}")
        self.mode = mode
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast
        self.crop_ratio, self.cutout_ratio, self.flip_prob = crop_ratio, cutout_ratio, flip_prob
        self.scale_ratio, self.rotate_deg = scale_ratio, rotate_deg

    @property
    def enabled(self) -> bool:
        return bool(self.families)

    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> DSAParams:
        """Draw parameters for ``n`` images of spatial ``size = (H, W)``, one draw per image.

        The draws come from ``generator`` (the global RNG when ``None``) in the reference's order
        (``DiffAugment`` with ``seed=-1``): in mode ``S`` the family index (``randint(len)``), then per
        family brightness, saturation, contrast (``rand(n)`` each) | crop shift rows, columns
        (``randint``) | cutout centre rows, columns | flip (``rand(n)``) | scale x, y (``rand(n)``
        each) | rotation angle (``rand(n)``); so a generator in the state of the reference's global
        RNG draws the reference's parameters.
        """
        return self._sample(n, size, lambda: generator, device)

    def sample_siamese(self, n: int, size: tuple[int, int], seed: int, device: torch.device | str = "cpu") -> DSAParams:
        """DSA's siamese draw (arXiv 2102.08259, Sec. 3; ``DiffAugment(x, strategy, seed=seed)``): *one*
        transform for the whole batch, so that a real and a synthetic batch of any sizes drawn with
        the same ``seed`` get the same transform. As the reference, each draw of :meth:`sample`'s
        order comes from a generator re-seeded to ``seed``, ``seed + 1``, ... and the batch takes the
        first image's parameters.

        Shapes: every value ``(n, ...)`` with equal rows.
        """
        g, next_seed = torch.Generator(), [seed]

        def reseeded():
            g.manual_seed(next_seed[0])
            next_seed[0] += 1
            return g

        p = self._sample(n, size, reseeded, device)
        return DSAParams(p.ops, {k: v[:1].expand_as(v).clone() for k, v in p.values.items()})

    def _sample(self, n: int, size: tuple[int, int], gen, device) -> DSAParams:
        """:meth:`sample` with ``gen()`` called before each draw for the generator to draw from."""
        if not self.families:
            return DSAParams(())
        if self.mode == "S":
            pick = int(torch.randint(len(self.families), (1,), generator=gen()))
            ops = (self.families[pick],)
        else:
            ops = self.families
        h, w = size
        v: dict[str, torch.Tensor] = {}

        def rand(k):
            return torch.rand(k, generator=gen()).to(device)

        def randint(lo, hi):
            return torch.randint(lo, hi, (n,), generator=gen())

        for op in ops:
            if op == "color":
                v["brightness"] = (rand(n) - 0.5) * self.brightness
                v["saturation"] = rand(n) * self.saturation
                v["contrast"] = rand(n) + self.contrast
            elif op == "crop":
                sh, sw = int(h * self.crop_ratio + 0.5), int(w * self.crop_ratio + 0.5)
                v["shift"] = torch.stack([randint(-sh, sh + 1), randint(-sw, sw + 1)], 1).to(device)
            elif op == "cutout":
                ch, cw = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
                v["cutout"] = torch.stack([randint(0, h + (1 - ch % 2)), randint(0, w + (1 - cw % 2))], 1).to(device)
            elif op == "flip":
                v["flip"] = rand(n) < self.flip_prob
            elif op == "scale":
                r = self.scale_ratio  # sx (width) then sy (height), one draw of n each
                v["scale"] = torch.stack([rand(n), rand(n)], 1) * (r - 1.0 / r) + 1.0 / r
            elif op == "rotate":
                v["angle"] = (rand(n) - 0.5) * 2 * self.rotate_deg / 180 * math.pi
        return DSAParams(ops, v)

    def __call__(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        return self.apply(x, params)

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Augment ``x`` ``(N, C, H, W)`` with ``params`` (sampled for N images); differentiable in ``x``."""
        v = params.values
        n, _, h, w = x.shape
        for op in params.ops:
            if op == "color":
                x = x + v["brightness"].view(n, 1, 1, 1)
                m = x.mean(1, keepdim=True)
                x = (x - m) * v["saturation"].view(n, 1, 1, 1) + m
                m = x.mean((1, 2, 3), keepdim=True)
                x = (x - m) * v["contrast"].view(n, 1, 1, 1) + m
            elif op == "crop":
                x = _translate(x, v["shift"])
            elif op == "cutout":
                x = x * _cutout_mask(v["cutout"], h, w, self.cutout_ratio, x.dtype)
            elif op == "flip":
                x = torch.where(v["flip"].view(n, 1, 1, 1), x.flip(3), x)
            elif op == "scale":
                s = v["scale"].to(x.dtype)
                z = torch.zeros_like(s[:, 0])
                theta = torch.stack([torch.stack([s[:, 0], z, z], 1), torch.stack([z, s[:, 1], z], 1)], 1)
                x = _warp(x, theta)
            elif op == "rotate":
                a = v["angle"].to(x.dtype)
                z = torch.zeros_like(a)
                theta = torch.stack([torch.stack([a.cos(), -a.sin(), z], 1),
                                     torch.stack([a.sin(), a.cos(), z], 1)], 1)
                x = _warp(x, theta)
        return x


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of ``x (N, C, H, W)`` by the linear maps ``theta (N, 2, 3)`` (output -> input
    coordinates in [-1, 1], no translation), zeros outside. For such maps about the image centre
    ``align_corners`` True (MTT's, DATM's ``utils.py``) and False (DSA's own ``utils.py``, PyTorch's
    default) sample the same points; the parity test checks both references."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each image by integer ``shift (N, 2)`` pixels, filling with the zero border."""
    n, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    gy = (ar_h.view(1, h) + shift[:, :1] + 1).clamp(0, h + 1)  # (N, H)
    gx = (ar_w.view(1, w) + shift[:, 1:] + 1).clamp(0, w + 1)  # (N, W)
    rows = torch.gather(xp, 2, gy.view(n, 1, h, 1).expand(n, c, h, w + 2))
    return torch.gather(rows, 3, gx.view(n, 1, 1, w).expand(n, c, h, w))


def _cutout_mask(offset: torch.Tensor, h: int, w: int, ratio: float, dtype) -> torch.Tensor:
    """``(N, 1, H, W)`` mask that zeroes a square of side ``ratio*H`` centred at ``offset``."""
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ys = torch.arange(h, device=offset.device).view(1, h)
    xs = torch.arange(w, device=offset.device).view(1, w)
    y0 = (offset[:, :1] - ch // 2).clamp(0, h - 1)
    y1 = (offset[:, :1] - ch // 2 + ch - 1).clamp(0, h - 1)
    x0 = (offset[:, 1:] - cw // 2).clamp(0, w - 1)
    x1 = (offset[:, 1:] - cw // 2 + cw - 1).clamp(0, w - 1)
    iny = (ys >= y0) & (ys <= y1)
    inx = (xs >= x0) & (xs <= x1)
    return (~(iny.unsqueeze(2) & inx.unsqueeze(1))).unsqueeze(1).to(dtype)


class DSASettings(Typed):
    """The ``augment.dsa`` node: DSA's ``strategy`` (families joined by ``_``) and ``mode`` (S | M)."""

    strategy: str
    mode: Literal["S", "M"]

    @field_validator("strategy")
    @classmethod
    def _known_families(cls, strategy: str) -> str:
        DSA(strategy)  # raises ValueError naming the unknown family
        return strategy


class AugmentSettings(Typed):
    """The ``augment`` node (``conf/augment/dsa.yaml``): whether methods augment real and synthetic
    batches with DSA (``dsa_enabled``) and DSA's settings (``dsa``)."""

    dsa_enabled: bool
    dsa: DSASettings

    def build_dsa(self) -> DSA:
        """The :class:`DSA` of ``dsa`` (whether or not ``dsa_enabled``)."""
        return DSA(self.dsa.strategy, self.dsa.mode)

    def enabled_dsa(self) -> DSA | None:
        """:meth:`build_dsa` when ``dsa_enabled``, else ``None``."""
        return self.build_dsa() if self.dsa_enabled else None
