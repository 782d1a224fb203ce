"""Meta-gradients of the trajectory-matching loss through an unrolled student.

The student starts at an expert checkpoint ``theta_0 = theta*_t`` and takes ``syn_steps`` SGD
steps on synthetic minibatches, ``theta_{k+1} = theta_k - alpha * grad_theta l(theta_k; x_k, y_k)``,
and the loss is (MTT, arXiv 2203.11932, Eq. 2)::

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

with gradients wanted for the synthetic images, their (soft) labels and the learnable lr alpha.

Two ways to get them, with the same result:

* ``unroll``: keep the whole autograd graph of the ``syn_steps`` updates (``create_graph=True``)
  and back-propagate once. Memory grows linearly with ``syn_steps`` (all activations of all
  steps) -- the reference code's known limit.
* ``recompute``: the constant-memory meta-gradient in the spirit of TESLA (arXiv 2211.10586).
  The forward pass keeps only the parameter vectors ``theta_k`` (``syn_steps x P`` floats, tiny
  next to activations); the backward pass walks the steps in reverse, recomputes each step's
  gradient and carries the adjoint ``G_k = dL/dtheta_k`` with one vector-Jacobian product of the
  step gradient::

      G_k = G_{k+1} - alpha * H_k G_{k+1},   dL/dx_k = -alpha * (d g_k / d x_k)^T G_{k+1},
      dL/dalpha = -sum_k g_k . G_{k+1}

  Unlike TESLA's published formula, which drops the Hessian term ``H_k G_{k+1}``, this keeps it,
  so the gradient equals the unrolled one exactly (tested), at the peak memory of a single step.
  The per-step functions are built with :mod:`torch.func` (``grad`` and ``vjp``) and can be
  compiled with ``torch.compile`` (``compile=True``), which fuses the elementwise work of the
  double backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, vjp

from lightning_dd.augment.dsa import DSA, DSAParams
from lightning_dd.losses import label_loss
from lightning_dd.nets import FlatParams


@dataclass
class StudentStep:
    """What one unrolled student step sees: ``idx`` (B,) indices into the synthetic set and the
    DSA parameters of its batch (``None`` = no augmentation)."""

    idx: torch.Tensor
    aug: DSAParams | None = None


class StudentFunctions:
    """Per-step functions of the functional student ``theta (P,), x (B, C, H, W), y -> ...``.

    ``grad(theta, x, y) -> (P,)``: gradient of the label loss.
    ``step_vjp(theta, x, y, v) -> (g, v^T dg/dtheta, v^T dg/dx, v^T dg/dy | None)``.
    """

    def __init__(self, flat: FlatParams, compile: bool = False):
        self.flat = flat

        def loss(theta, x, y):
            return label_loss(flat.call(theta, x), y)

        grad_fn = grad(loss)

        def step_vjp_soft(theta, x, y, v):
            g, back = vjp(grad_fn, theta, x, y)
            return (g, *back(v))

        def step_vjp_hard(theta, x, y, v):
            g, back = vjp(lambda t, xx: grad_fn(t, xx, y), theta, x)
            return (g, *back(v), None)

        self.grad = grad_fn
        self._vjp_soft, self._vjp_hard = step_vjp_soft, step_vjp_hard
        if compile:
            self.grad = torch.compile(grad_fn, dynamic=False)
            self._vjp_soft = torch.compile(step_vjp_soft, dynamic=False)
            self._vjp_hard = torch.compile(step_vjp_hard, dynamic=False)

    def step_vjp(self, theta, x, y, v):
        if y.is_floating_point():
            return self._vjp_soft(theta, x, y, v)
        return self._vjp_hard(theta, x, y, v)


def _batch(images, labels, step: StudentStep, dsa: DSA | None):
    x = images[step.idx]
    if dsa is not None and step.aug is not None:
        x = dsa(x, step.aug)
    return x, labels[step.idx]


def matching_loss_and_grads(fns: StudentFunctions, images: torch.Tensor, labels: torch.Tensor,
                            syn_lr: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor,
                            steps: list[StudentStep], dsa: DSA | None = None, mode: str = "unroll") -> torch.Tensor:
    """Normalized trajectory-matching loss; accumulates its gradient into the leaves' ``.grad``.

    Args:
        fns: the functional student (:class:`StudentFunctions`).
        images: ``(N, C, H, W)`` synthetic images (leaf, ``requires_grad``).
        labels: ``(N,)`` int64 hard labels or ``(N, K)`` soft-label logits (leaf or constant).
        syn_lr: scalar learnable student lr (leaf).
        theta_start, theta_target: ``(P,)`` expert parameters at epochs t and t+M.
        steps: the ``syn_steps`` minibatches (and their DSA parameters).
        mode: ``"unroll"`` or ``"recompute"`` (see module docstring; same gradient).

    Returns:
        The loss (a detached scalar).

    Raises:
        ValueError: unknown ``mode``.
    """
    denom = (theta_start - theta_target).pow(2).sum()
    if mode == "unroll":
        theta = theta_start.detach().requires_grad_(True)
        for st in steps:
            x, y = _batch(images, labels, st, dsa)
            g, = torch.autograd.grad(label_loss(fns.flat.call(theta, x), y), theta, create_graph=True)
            theta = theta - syn_lr * g
        loss = (theta - theta_target).pow(2).sum() / denom
        loss.backward()
        return loss.detach()
    if mode != "recompute":
        raise ValueError(f"method.meta_grad must be 'unroll' or 'recompute', got {mode!r}")

    lr = syn_lr.detach()
    thetas = []
    theta = theta_start.detach()
    with torch.no_grad():
        for st in steps:
            x, y = _batch(images.detach(), labels.detach(), st, dsa)
            thetas.append(theta)
            theta = theta - lr * fns.grad(theta, x, y)
    loss = (theta - theta_target).pow(2).sum() / denom
    adj = 2 * (theta - theta_target) / denom  # G_N
    lr_grad = torch.zeros_like(lr)
    for st, theta_k in zip(reversed(steps), reversed(thetas)):
        x, y = _batch(images, labels, st, dsa)  # graph back to the leaves (indexing + DSA)
        g, hv, dx, dy = fns.step_vjp(theta_k, x.detach(), y.detach(), -lr * adj)
        lr_grad -= torch.dot(g.detach(), adj)
        pairs = [(o, c) for o, c in ((x, dx), (y, dy)) if c is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
        adj = adj + hv.detach()
    if syn_lr.requires_grad:
        syn_lr.grad = lr_grad if syn_lr.grad is None else syn_lr.grad + lr_grad
    return loss.detach()
