"""LSQ-style per-tensor uniform quantizers with learnable step sizes (Esser et al., "Learned Step
Size Quantization", arXiv 1902.08153), as QAT-ViT uses them (Huang et al., arXiv 2307.00331,
Sec. 3 and its reference code, ``quantization/lsq_layer.py``), plus the quantized Linear / Conv2d
that carry one for the weight and (optionally) one for the input.

Forward: ``x_q = s * round(clamp((x - beta) / s, Qn, Qp)) + beta`` with a straight-through
estimator for ``round``; ``beta`` is a learned offset (only for the unsigned GELU-output quantizer),
otherwise 0. ``[Qn, Qp]`` is ``[-2^(b-1), 2^(b-1)-1]`` signed or ``[0, 2^b-1]`` unsigned. Gradients
(``u = (x - beta) / s``, ``inside = Qn < u < Qp``): ``dx = dy * inside``,
``ds = g * sum(dy * (round(clamp(u)) - u * inside))``, ``dbeta = sum(dy * (1 - inside))`` (not
scaled by ``g``, as the reference).

Step-gradient scale ``g`` (the step's gradient is multiplied by ``g``, its value is unchanged):

* ``grad_scale="reference"`` (default, the QAT-ViT reference code): ``1/sqrt(sum|w| * Qp)`` for
  weights (``QuantLinear``) and ``1/(sqrt(numel(x)) * Qp)`` for activations (``QuantAct``; ``numel``
  of the whole batch tensor, ``Qp`` of the quantizer's own range).
* ``grad_scale="lsq"`` (LSQ paper): ``1/sqrt(N * Qp)`` with ``N`` the number of weights, or the
  number of features per sample for activations.

Initialization (reference): weight steps by the MSE fixed-point fit :func:`mse_step` started at
``max|w| / Qp`` (``quantize_by_mse``); activation steps from the first batch that reaches them,
``2 * mean|x| / sqrt(2^(b-1) - 1)`` (LSQ's init with the signed ``Qp`` for every quantizer, as
``QuantAct.forward``), offsets at 0. Steps are kept ``>= 1e-4``: clamped in place before every
forward, as the reference (a step an AdamW update drove below it, e.g. an 8-bit weight step of
~1e-3 at lr 5e-4, restarts at 1e-4 and keeps learning).

PyTorch's fused learnable fake-quantize kernel (``torch._fake_quantize_learnable_per_tensor_affine``)
rounds before it clamps: its values are the same, its gradients differ for ``u`` within half a step
outside ``[Qn, Qp]`` (there it passes the input gradient and gives the step ``round(u) - u``, the
reference 0 and ``Qn``/``Qp``; ``tests/test_qat_vit.py`` compares the two). At exact ties
``u = Qn`` or ``u = Qp`` the reference's ``torch.minimum``/``maximum`` split the gradient in
halves; here the tie counts as outside (a measure-zero set for real inputs).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

GradScale = Literal["reference", "lsq"]
MIN_STEP = 1e-4  # the reference's ``alpha.data.clamp_(min=1e-4)``


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range ``(Qn, Qp)`` of ``bits``-bit values: ``(-2^(b-1), 2^(b-1)-1)`` signed,
    ``(0, 2^b-1)`` unsigned.

    Raises:
        ValueError: ``bits`` not in 1..16 (1 bit only unsigned)."""
    if not 1 <= bits <= 16 or (bits == 1 and signed):
        raise ValueError(f"quantizer bits must be 1..16 (2..16 signed), got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


class _LSQ(torch.autograd.Function):
    """``s * round(clamp((x - beta) / s, qn, qp)) + beta`` with the reference's gradients (module
    docstring); ``g`` scales the step's gradient only. One pass forward, one backward."""

    @staticmethod
    def forward(ctx, x, s, beta, qn, qp, g):
        u = (x - beta) / s
        q = u.clamp(qn, qp).round()
        ctx.save_for_backward(u, q)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return q * s + beta

    @staticmethod
    def backward(ctx, dy):
        u, q = ctx.saved_tensors
        inside = (u > ctx.qn) & (u < ctx.qp)
        dx = torch.where(inside, dy, 0.0)
        ds = (dy * torch.where(inside, q - u, q)).sum() * ctx.g
        dbeta = (dy - dx).sum() if ctx.needs_input_grad[2] else None
        return dx, ds.reshape(()), dbeta, None, None, None


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward (exactly), ``g * dL/dx`` in the backward (LSQ's ``grad_scale``)."""
    return _GradScale.apply(x, g)


@torch.no_grad()
def mse_step(w: torch.Tensor, qn: int, qp: int, tol: float = 1e-5, max_iters: int = 100) -> torch.Tensor:
    """The step ``s`` minimizing ``||w - s * round(clamp(w/s, qn, qp))||^2`` by the reference's
    fixed-point iteration (``quantize_by_mse``): start at ``max|w| / qp``; given the integers ``q``,
    the best step is ``<w, q> / <q, q>``; repeat until the relative change is below ``tol`` (or
    ``max_iters``). A local optimum of that start.

    Shapes: ``w`` any shape -> 0-dim float tensor (``> 0``; ``1e-8`` for an all-zero ``w``).
    """
    w = w.detach().double().flatten()  # float64 sums: the same step whatever the torch thread count
    s = (w.abs().max() / max(qp, 1)).clamp(min=1e-8)
    for _ in range(max_iters):
        q = (w / s).clamp(qn, qp).round()
        new = ((w @ q) / (q @ q).clamp(min=1e-12)).clamp(min=1e-8)
        done = bool((new - s).abs() < tol * new)
        s = new
        if done:
            break
    return s.float()


class Quantizer(nn.Module):
    """Per-tensor uniform fake quantizer with a learnable step (and optional learnable offset).

    Args:
        bits: bit width ``b``. signed: signed or unsigned range (:func:`qrange`).
        kind: ``"weight"`` (step from :meth:`init_weight`) or ``"act"`` (step from the first
            batch in :meth:`forward`); also selects the gradient-scale formula.
        offset: learn an offset ``beta`` (the unsigned GELU output, whose minimum is about -0.17).
        grad_scale: ``"reference"`` | ``"lsq"`` (module docstring).

    Attributes:
        step: ``()`` parameter. beta: ``()`` parameter (``offset``) or ``None``.
        initialized: ``()`` bool buffer. A quantizer that is not initialized and not ``enabled``
            passes its input through unchanged.

    Shapes: ``x`` any shape -> same shape, same dtype.
    """

    def __init__(self, bits: int, signed: bool, kind: Literal["weight", "act"] = "act", offset: bool = False,
                 grad_scale: GradScale = "reference"):
        super().__init__()
        self.bits, self.signed, self.kind, self.grad_mode = bits, signed, kind, grad_scale
        self.qn, self.qp = qrange(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0)) if offset else None
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("_zero", torch.zeros(1), persistent=False)
        self.enabled = True

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, signed={self.signed}, offset={self.beta is not None}"

    def grad_factor(self, x: torch.Tensor) -> float:
        """The step-gradient scale ``g`` for input ``x`` (module docstring)."""
        if self.grad_mode == "lsq":
            n = x.numel() if self.kind == "weight" else x[0].numel() if x.dim() > 1 else x.numel()
            return 1.0 / math.sqrt(max(n, 1) * self.qp)
        if self.kind == "weight":
            return 1.0 / math.sqrt(max(float(x.detach().abs().sum()), 1e-12) * self.qp)
        return 1.0 / (math.sqrt(max(x.numel(), 1)) * self.qp)

    @torch.no_grad()
    def init_weight(self, w: torch.Tensor) -> None:
        """Set the step by the MSE fixed-point fit :func:`mse_step` of ``w`` and mark initialized."""
        self.step.copy_(mse_step(w, self.qn, self.qp))
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_act(self, x: torch.Tensor) -> None:
        """Activation init from a batch (reference ``QuantAct``): ``step = 2 * mean|x| /
        sqrt(2^(b-1) - 1)`` (the signed ``Qp`` whatever the range), ``beta`` left at 0; mark
        initialized. The mean is accumulated in float64 (float32's parallel sum depends on the
        number of torch threads)."""
        mean_abs = x.abs().mean(dtype=torch.float64)  # float64: the same step whatever the torch thread count
        self.step.copy_((2 * mean_abs / math.sqrt(max(1, 2 ** (self.bits - 1) - 1))).clamp(min=MIN_STEP))
        self.initialized.fill_(True)

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes ``round(clamp((x - beta)/s, Qn, Qp))`` (float dtype, no gradient)."""
        beta = self.beta.detach() if self.beta is not None else 0.0
        return ((x.detach() - beta) / self.step.detach().clamp(min=MIN_STEP)).clamp(self.qn, self.qp).round()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if self.kind == "weight":
                self.init_weight(x)
            else:
                self.init_act(x)
        g = self.grad_factor(x) if torch.is_grad_enabled() and self.step.requires_grad else 1.0
        with torch.no_grad():  # the reference's in-place clamp: a step an update drove below it restarts there
            self.step.clamp_(min=MIN_STEP)
        beta = self.beta if self.beta is not None else self._zero.reshape(())
        return _LSQ.apply(x, self.step, beta, self.qn, self.qp, g)


class QLinear(nn.Module):
    """``nn.Linear`` with a quantized weight (signed, ``weight_bits``) and a quantized input
    (``act``: signed, or unsigned with offset after GELU; ``None``: the input comes quantized, as
    q/k/v's from the attention's shared input quantizer); same parameter names as ``nn.Linear``
    (``weight``, ``bias``; the bias stays in floating point).

    Shapes: ``(..., in_features)`` -> ``(..., out_features)``."""

    def __init__(self, linear: nn.Linear, weight_bits: int, act: Quantizer | None, grad_scale: GradScale = "reference"):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.wq = Quantizer(weight_bits, True, "weight", grad_scale=grad_scale)
        self.aq = act if act is not None else nn.Identity()
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
