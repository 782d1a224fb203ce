"""Variation-aware bin regularization and oscillation tracking (QAT-ViT, Huang et al., arXiv
2307.00331, Sec. 4.3 "variation-aware weight regularization"; reference ``util_loss.py``
``BinReg.dampening_loss``).

For a weight ``w`` with step ``s`` and range ``[Qn, Qp]``, in weight units, the clipped weight
``c = s * clamp(w/s, Qn, Qp)``, its quantized value ``w_q = s * round(w/s clamped)`` and the bins
``q = round(clamp(w/s))`` (one bin per integer level, ``2^b`` of them)::

    R(w) = mean((c - sg(w_q))^2) + sum over bins with >= 2 weights of var(c in bin)

with the unbiased variance (``torch.var``). The step keeps its gradient through ``c`` (scaled by
the weight quantizer's step-gradient factor ``g``, as the reference's ``get_quant_weight`` does).
The loss adds ``lambda(epoch) * sum over quantized layers R(w)`` with the reference's cosine ramp
:func:`ramp` (``CosineTempDecay(t_max=epochs, temp_range=(0, 0.01), rel_decay_start=0.25)``).
Vectorized: the bin sums, counts and variances are segment reductions (``bincount`` /
``index_add``), one pass per layer, whatever the number of bins.

Deviation from the reference: the reference finds a weight's bin by ``(w_q / s) == level`` in
floating point, which misses a weight when ``(level * s) / s`` does not round back to ``level``
exactly; here the bin is the integer code itself (the parity test measures the difference).

Oscillation (Nagel et al., "Overcoming Oscillations in QAT", arXiv 2203.11086; reference
``oscillation_tracking_utils.TrackOscillation``): a weight oscillates at a step when its integer
code changes in the direction opposite to its previous change; :class:`OscillationTracker` reports
the share of weights that do so per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from lightning_dd.methods.quantization.qat_vit.quantizer import MIN_STEP, grad_scale


def bin_stats(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int,
              g: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin counts, means and unbiased variances of the clipped weights
    ``c = s * clamp(w / s, Qn, Qp)`` (weight units; ``s`` = ``step`` with its gradient scaled by ``g``).

    Shapes: ``w`` any shape, ``step`` 0-dim -> three ``(Qp - Qn + 1,)`` tensors (bin ``i`` holds
    integer level ``Qn + i``); means are 0 for empty bins, variances 0 for bins of fewer than two
    weights; variances are differentiable in ``w`` and ``step``."""
    s = grad_scale(step.clamp(min=MIN_STEP), g)
    u = (w / s).clamp(qn, qp).flatten()
    c = u * s
    idx = (u.detach().round() - qn).long()
    nb = qp - qn + 1
    cnt = torch.bincount(idx, minlength=nb).to(c.dtype)
    mean = torch.zeros(nb, dtype=c.dtype, device=c.device).index_add(0, idx, c) / cnt.clamp(min=1)
    ss = torch.zeros(nb, dtype=c.dtype, device=c.device).index_add(0, idx, (c - mean[idx]) ** 2)
    return cnt, mean, torch.where(cnt > 1, ss / (cnt - 1).clamp(min=1), 0.0)


def bin_regularizer(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int, g: float = 1.0) -> torch.Tensor:
    """``R(w)`` of the module docstring: ``mean((c - sg(w_q))^2) + sum_bins var(c in bin)``.

    Args:
        g: the step-gradient factor of the layer's weight quantizer
            (:meth:`~lightning_dd.methods.quantization.qat_vit.quantizer.Quantizer.grad_factor`).

    Shapes: ``w`` any shape, ``step`` 0-dim -> 0-dim (weight units squared)."""
    s = grad_scale(step.clamp(min=MIN_STEP), g)
    u = (w / s).clamp(qn, qp)
    mse = (u * s - (u.round() * s).detach()).pow(2).mean()
    return mse + bin_stats(w, step, qn, qp, g)[2].sum()


def within_bin_variance(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> float:
    """The mean squared distance of the clipped weights to their bin's mean, in integer units
    squared (divided by ``step^2``, so that layers of different weight scales compare). A logged
    measure of variation."""
    with torch.no_grad():
        cnt, _, var = bin_stats(w, step, qn, qp)
        ss = var * (cnt - 1).clamp(min=0)
        return float(ss.sum() / cnt.sum().clamp(min=1) / step.clamp(min=MIN_STEP) ** 2)


def ramp(progress: float, peak: float = 0.01, start: float = 0.25) -> float:
    """The regularizer weight at training progress ``progress = epoch / epochs`` (the reference
    evaluates it at the epoch a pass starts): 0 before ``start``, then ``peak * (1 - cos(pi * p)) / 2``
    with ``p = (progress - start) / (1 - start)``, reaching ``peak`` at the end."""
    if progress < start or peak == 0:
        return 0.0
    p = min(1.0, (progress - start) / max(1e-12, 1 - start))
    return peak * 0.5 * (1 - math.cos(math.pi * p))


class OscillationTracker:
    """Counts weights whose integer code flips back and forth between optimizer steps.

    ``update()`` after every optimizer step: with the current codes ``c`` and the previous ones,
    ``d = c - prev``; a weight oscillates when ``d != 0`` and its last non-zero change had the other
    sign. Per layer, the rate is the mean share of oscillating weights per step since the last
    :meth:`reset`.

    Args:
        layers: ``{name: layer}`` with ``layer.weight`` and ``layer.wq`` (a weight quantizer).
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.prev = {n: lay.wq.integers(lay.weight).to(torch.int16) for n, lay in layers.items()}
        self.last_dir = {n: torch.zeros_like(p, dtype=torch.int8) for n, p in self.prev.items()}
        self.flips = {n: 0.0 for n in layers}
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        for n, lay in self.layers.items():
            cur = lay.wq.integers(lay.weight).to(torch.int16)
            d = torch.sign(cur - self.prev[n]).to(torch.int8)
            osc = (d != 0) & (d == -self.last_dir[n])
            self.flips[n] += float(osc.float().mean())
            self.last_dir[n] = torch.where(d != 0, d, self.last_dir[n])
            self.prev[n] = cur
        self.steps += 1

    def reset(self) -> None:
        """Start a new averaging window (codes and directions are kept)."""
        self.flips = {n: 0.0 for n in self.layers}
        self.steps = 0

    def rates(self) -> dict[str, float]:
        """``{layer: share of its weights oscillating per step}`` over the current window."""
        return {n: f / max(1, self.steps) for n, f in self.flips.items()}
