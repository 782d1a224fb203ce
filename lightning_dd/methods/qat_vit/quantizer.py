"""LSQ-style per-tensor uniform quantizers with learnable step sizes (Esser et al., "Learned Step
Size Quantization", arXiv 1902.08153), as QAT-ViT uses them (Huang et al., arXiv 2307.00331,
Sec. 3 and its reference code), plus the quantized Linear / Conv2d that carry one for the weight
and one for the input.

Forward: ``x_q = s * clamp(round((x - beta) / s), Qn, Qp) + beta`` with a straight-through
estimator for ``round``; ``beta`` is a learned offset (only for the unsigned GELU-output quantizer,
LSQ+ style), otherwise 0. ``[Qn, Qp]`` is ``[-2^(b-1), 2^(b-1)-1]`` signed or ``[0, 2^b-1]``
unsigned.

Step-gradient scale ``g`` (the step's gradient is multiplied by ``g``, its value is unchanged):

* ``grad_scale="reference"`` (default, the QAT-ViT reference code): ``1/sqrt(sum|w| * Qp)`` for
  weights and ``1/sqrt(numel(x) * Qp)`` for activations (``numel`` of the whole batch tensor).
* ``grad_scale="lsq"`` (LSQ paper): ``1/sqrt(N * Qp)`` with ``N`` the number of weights, or the
  number of features per sample for activations.

Initialization: weight steps by the MSE fixed-point fit :func:`mse_step` (alternating the
rounding assignment and the least-squares step, as the reference code's MSE init); activation
steps from the first batch that reaches them, ``2 * mean|x - beta| / sqrt(Qp)`` (LSQ), with
``beta`` initialized to ``min(x)`` of that batch when learned (and clamped to ``<= 0``).

Deviations from the reference code (reasons):

* ``round`` is applied before ``clamp`` (``clamp(round(x/s))``, not ``round(clamp(x/s))``): the
  forward values are the same, and the gradients then equal PyTorch's learnable fake-quantize op
  (``torch._fake_quantize_learnable_per_tensor_affine``) exactly, which the tests use as an oracle;
  the two conventions differ only for ``x/s`` within half a step outside the range.
* The step is kept positive by ``clamp(min=1e-8)`` in the forward (the reference code does not
  guard it; a step that a large update drove negative would flip the sign of the layer).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

GradScale = Literal["reference", "lsq"]


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range ``(Qn, Qp)`` of ``bits``-bit values: ``(-2^(b-1), 2^(b-1)-1)`` signed,
    ``(0, 2^b-1)`` unsigned.

    Raises:
        ValueError: ``bits`` not in 1..16 (1 bit only unsigned)."""
    if not 1 <= bits <= 16 or (bits == 1 and signed):
        raise ValueError(f"quantizer bits must be 1..16 (2..16 signed), got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.g, None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, dy):
        return dy


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward (exactly), ``g * dL/dx`` in the backward (LSQ's ``grad_scale``)."""
    return _GradScale.apply(x, g)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even, exactly) in the forward, identity in the backward."""
    return _RoundSTE.apply(x)


@torch.no_grad()
def mse_step(w: torch.Tensor, qn: int, qp: int, iters: int = 12, starts: int = 8) -> torch.Tensor:
    """The step ``s`` minimizing ``||w - s * clamp(round(w/s), qn, qp)||^2`` by fixed-point
    iteration (given the integers ``q``, the best step is ``<w, q> / <q, q>``; repeat), run from
    ``starts`` initial steps ``max|w| / qp * linspace(1/starts, 1, starts)`` at once (the iteration
    finds a local optimum of its start); the step with the lowest error is returned.

    Shapes: ``w`` any shape -> 0-dim float tensor (``> 0``; ``1e-8`` for an all-zero ``w``).
    """
    w = w.detach().float().flatten()
    s = (w.abs().max() / max(qp, 1) * torch.linspace(1 / starts, 1, starts, device=w.device)).clamp(min=1e-8)
    for _ in range(iters):
        q = (w / s[:, None]).round().clamp(qn, qp)
        new = ((w * q).sum(1) / (q * q).sum(1).clamp(min=1e-12)).clamp(min=1e-8)
        done = torch.allclose(new, s, rtol=1e-7, atol=0)
        s = new
        if done:
            break
    err = ((w / s[:, None]).round().clamp(qn, qp) * s[:, None] - w).pow(2).sum(1)
    return s[err.argmin()]


class Quantizer(nn.Module):
    """Per-tensor uniform fake quantizer with a learnable step (and optional learnable offset).

    Args:
        bits: bit width ``b``. signed: signed or unsigned range (:func:`qrange`).
        kind: ``"weight"`` (step from :meth:`init_weight`) or ``"act"`` (step from the first
            batch in :meth:`forward`); also selects the gradient-scale formula.
        offset: learn an offset ``beta`` (the unsigned GELU output, whose minimum is about -0.17).
        grad_scale: ``"reference"`` | ``"lsq"`` (module docstring).
        impl: ``"fused"`` (default): PyTorch's fused learnable fake-quantize kernel
            (``torch._fake_quantize_learnable_per_tensor_affine``, one pass forward and backward,
            the offset subtracted before and added after it); ``"explicit"``: :meth:`explicit`, the
            same computation written out (the tests check that both agree in values and gradients).
            The fused kernel is the faster of the two on CPU (benchmarks/qat_step.py).

    Attributes:
        step: ``()`` parameter. beta: ``()`` parameter (``offset``) or ``None``.
        initialized: ``()`` bool buffer. A quantizer that is not initialized and not ``enabled``
            passes its input through unchanged.

    Shapes: ``x`` any shape -> same shape, same dtype.
    """

    def __init__(self, bits: int, signed: bool, kind: Literal["weight", "act"] = "act", offset: bool = False,
                 grad_scale: GradScale = "reference", impl: Literal["fused", "explicit"] = "fused"):
        super().__init__()
        self.bits, self.signed, self.kind, self.grad_mode = bits, signed, kind, grad_scale
        self.qn, self.qp = qrange(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0)) if offset else None
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("_zero", torch.zeros(1), persistent=False)
        self.enabled = True
        self.impl = impl

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, signed={self.signed}, offset={self.beta is not None}"

    def grad_factor(self, x: torch.Tensor) -> float:
        """The step-gradient scale ``g`` for input ``x`` (module docstring)."""
        if self.grad_mode == "lsq":
            n = x.numel() if self.kind == "weight" else x[0].numel() if x.dim() > 1 else x.numel()
        elif self.kind == "weight":
            n = float(x.detach().abs().sum())
        else:
            n = x.numel()
        return 1.0 / math.sqrt(max(n, 1e-12) * self.qp)

    @torch.no_grad()
    def init_weight(self, w: torch.Tensor) -> None:
        """Set the step by the MSE fixed-point fit :func:`mse_step` of ``w`` and mark initialized."""
        self.step.copy_(mse_step(w, self.qn, self.qp))
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_act(self, x: torch.Tensor) -> None:
        """Activation init from a batch: ``beta = min(min(x), 0)`` when learned, then
        ``step = 2 * mean|x - beta| / sqrt(Qp)`` (LSQ); mark initialized."""
        if self.beta is not None:
            self.beta.copy_(x.min().clamp(max=0))
        centered = x - (self.beta if self.beta is not None else 0.0)
        self.step.copy_((2 * centered.abs().mean() / math.sqrt(self.qp)).clamp(min=1e-8))
        self.initialized.fill_(True)

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round((x - beta)/s), Qn, Qp)`` (float dtype, no gradient)."""
        beta = self.beta.detach() if self.beta is not None else 0.0
        return ((x.detach() - beta) / self.step.detach().clamp(min=1e-8)).round().clamp(self.qn, self.qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if self.kind == "weight":
                self.init_weight(x)
            else:
                self.init_act(x)
        g = self.grad_factor(x) if torch.is_grad_enabled() and self.step.requires_grad else 1.0
        if self.impl == "fused":
            beta = grad_scale(self.beta, g) if self.beta is not None else None
            xc = x - beta if beta is not None else x
            y = torch._fake_quantize_learnable_per_tensor_affine(
                xc, self.step.clamp(min=1e-8).reshape(1), self._zero, self.qn, self.qp, g)
            return y + beta if beta is not None else y
        return self.explicit(x, g)

    def explicit(self, x: torch.Tensor, g: float = 1.0) -> torch.Tensor:
        """The quantizer written out (module docstring): ``s * clamp(round_ste((x - beta)/s)) + beta``
        with ``s``, ``beta`` gradient-scaled by ``g``. Same values and gradients as the fused path."""
        s = grad_scale(self.step.clamp(min=1e-8), g)
        if self.beta is None:
            return s * self._clamp(round_ste(x / s))
        beta = grad_scale(self.beta, g)
        return s * self._clamp(round_ste((x - beta) / s)) + beta

    def _clamp(self, r: torch.Tensor) -> torch.Tensor:
        """``clamp(r, Qn, Qp)`` passing the gradient where ``Qn <= r <= Qp`` (boundaries included;
        ``torch.clamp`` blocks it at the boundaries)."""
        inside = (r >= self.qn) & (r <= self.qp)
        return torch.where(inside, r, r.detach().clamp(self.qn, self.qp))


class QLinear(nn.Module):
    """``nn.Linear`` with a quantized weight (signed, ``weight_bits``) and a quantized input
    (``act``: signed, or unsigned with offset after GELU); same parameter names as ``nn.Linear``
    (``weight``, ``bias``; the bias stays in floating point).

    Shapes: ``(..., in_features)`` -> ``(..., out_features)``."""

    def __init__(self, linear: nn.Linear, weight_bits: int, act: Quantizer, grad_scale: GradScale = "reference"):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.wq = Quantizer(weight_bits, True, "weight", grad_scale=grad_scale)
        self.aq = act
        self.wq.init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.aq(x), self.wq(self.weight), self.bias)


class QConv2d(nn.Module):
    """``nn.Conv2d`` (the patch embedding) with a quantized weight and a quantized input, both
    ``bits`` (8 in QAT-ViT); same parameter names as ``nn.Conv2d``.

    Shapes: ``(B, C, H, W)`` -> ``(B, C', H', W')``."""

    def __init__(self, conv: nn.Conv2d, bits: int, grad_scale: GradScale = "reference"):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.wq = Quantizer(bits, True, "weight", grad_scale=grad_scale)
        self.aq = Quantizer(bits, True, "act", grad_scale=grad_scale)
        self.wq.init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.aq(x), self.wq(self.weight), self.bias, self.stride, self.padding)
