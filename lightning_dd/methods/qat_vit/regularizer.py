"""Variation-aware bin regularization and oscillation tracking (QAT-ViT, Huang et al., arXiv
2307.00331, Sec. 4.3 "variation-aware weight regularization" and its reference code).

For a weight ``w`` with step ``s`` and range ``[Qn, Qp]``, in integer units ``u = clamp(w/s, Qn, Qp)``
and bins ``q = round(u)`` (one bin per integer level, ``2^b`` of them)::

    R(w) = mean((u - sg(q))^2) + sum_bins var(u in bin)

(population variance; a bin with fewer than two weights contributes 0). The loss adds
``lambda(t) * sum over quantized layers R(w)`` with the cosine ramp :func:`ramp`. Vectorized: the
bin sums, counts and variances are segment reductions (``bincount`` / ``index_add``), one pass per
layer, whatever the number of bins.

Choices the reference code leaves open or makes differently (reasons):

* Integer units (``w/s``) rather than weight units: the same ``lambda`` then means the same thing in
  every layer, whatever its weight scale (in weight units a ViT's ``~0.02``-sized weights make the
  term vanish at ``lambda = 0.01``).
* The step is detached in ``R``: the regularizer moves the weights towards their bin centres; the
  step is learned by the task loss alone.
* Layers are summed (not averaged).

Oscillation (Nagel et al., "Overcoming Oscillations in QAT", arXiv 2203.11086): a weight oscillates
at a step when its integer code changes in the direction opposite to its previous change;
:class:`OscillationTracker` reports the share of weights that do so per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def bin_stats(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin counts, means and population variances of ``u = clamp(w / sg(step), Qn, Qp)``.

    Shapes: ``w`` any shape, ``step`` 0-dim -> three ``(Qp - Qn + 1,)`` tensors (bin ``i`` holds
    integer level ``Qn + i``); means and variances are 0 for empty bins; variances are
    differentiable in ``w``."""
    u = (w / step.detach().clamp(min=1e-8)).clamp(qn, qp).flatten()
    idx = (u.detach().round() - qn).long()
    nb = qp - qn + 1
    cnt = torch.bincount(idx, minlength=nb).to(u.dtype)
    denom = cnt.clamp(min=1)
    mean = torch.zeros(nb, dtype=u.dtype, device=u.device).index_add(0, idx, u) / denom
    var = torch.zeros(nb, dtype=u.dtype, device=u.device).index_add(0, idx, (u - mean[idx]) ** 2) / denom
    return cnt, mean, var


def bin_regularizer(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """``R(w)`` of the module docstring: ``mean((u - sg(round u))^2) + sum_bins var(u in bin)``.

    Shapes: ``w`` any shape, ``step`` 0-dim -> 0-dim (integer units squared)."""
    u = (w / step.detach().clamp(min=1e-8)).clamp(qn, qp)
    mse = (u - u.detach().round()).pow(2).mean()
    return mse + bin_stats(w, step, qn, qp)[2].sum()


def within_bin_variance(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> float:
    """Weight-count-weighted mean of the within-bin variances (integer units squared): the mean
    squared distance of ``u`` to its bin's mean. A logged measure of variation."""
    with torch.no_grad():
        cnt, _, var = bin_stats(w, step, qn, qp)
        return float((cnt * var).sum() / cnt.sum().clamp(min=1))


def ramp(progress: float, peak: float = 0.01, start: float = 0.25) -> float:
    """The regularizer weight at training progress ``progress`` in ``[0, 1]``: 0 before ``start``,
    then ``peak * (1 - cos(pi * p)) / 2`` with ``p = (progress - start) / (1 - start)``, reaching
    ``peak`` at the end."""
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
