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

``auto`` (the default, :func:`resolve_meta_grad`) picks one of them once per fit: compiled
``recompute`` where compile is verified for the student (:data:`lightning_dd.nets.FLAT_COMPILE_VERIFIED`,
images of at least 32x32 pixels) -- on 2 CPU cores at ConvNet-128, syn_steps 20 it took 0.53x the
reference loop's time at a seventh of its memory; else ``unroll`` when its predicted peak memory
(:func:`unroll_memory_bytes`) fits the free memory of the device; else ``recompute``. All three
give the same gradient.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, vjp

from lightning_dd.augment.dsa import DSA, DSAParams
from lightning_dd.losses import label_loss
from lightning_dd.nets import FLAT_COMPILE_VERIFIED, FlatParams, arch_name, worth_compiling

log = logging.getLogger(__name__)

#: The exact modes :func:`matching_loss_and_grads` runs; ``method.meta_grad`` may also be ``auto``.
MODES = ("unroll", "recompute")


@dataclass
class StudentStep:
    """What one unrolled student step sees: ``idx`` (B,) indices into the synthetic set and the
    DSA parameters of its batch (``None`` = no augmentation)."""

    idx: torch.Tensor
    aug: DSAParams | None = None


def draw_student_steps(n: int, batch: int, syn_steps: int, generator: torch.Generator, dsa: DSA | None,
                       size: tuple[int, int], device: torch.device | str = "cpu") -> list[StudentStep]:
    """The ``syn_steps`` minibatches of one unrolled student, drawn as MTT's ``distill.py`` draws
    them (arXiv 2203.11932): a fresh ``randperm(n)`` split into chunks of ``batch`` whenever the
    chunks run out, each step taking the *last* remaining chunk, then (DSA on) that step's
    augmentation parameters -- all from ``generator`` in this order, so a generator in the state of
    the reference's global RNG reproduces its indices and DSA draws.

    Returns:
        ``syn_steps`` :class:`StudentStep` (``idx (B,)`` int64 on ``device``, DSA parameters or ``None``).
    """
    steps, chunks = [], []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(batch))
        idx = chunks.pop()
        aug = dsa.sample(len(idx), size, generator=generator, device=device) \
            if dsa is not None and dsa.enabled else None
        steps.append(StudentStep(idx.to(device), aug))
    return steps


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


def _unrolled_step(fns, theta, images, labels, syn_lr, step: StudentStep, dsa):
    """One differentiable student step ``theta - alpha * grad l(theta; x, y)`` (graph kept)."""
    x, y = _batch(images, labels, step, dsa)
    g, = torch.autograd.grad(label_loss(fns.flat.call(theta, x), y), theta, create_graph=True)
    return theta - syn_lr * g


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
        mode: ``"unroll"`` or ``"recompute"`` (see module docstring; same gradient); ``auto`` is
            resolved before, by :func:`resolve_meta_grad`.

    Returns:
        The loss (a detached scalar).

    Raises:
        ValueError: unknown ``mode``.
    """
    denom = (theta_start - theta_target).pow(2).sum()
    if mode == "unroll":
        theta = theta_start.detach().requires_grad_(True)
        for st in steps:
            theta = _unrolled_step(fns, theta, images, labels, syn_lr, st, dsa)
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


# --- method.meta_grad=auto -------------------------------------------------------------------------

#: Measured peak / predicted ``(syn_steps + 1) x`` saved bytes of one step was 1.16-1.18 on CPU
#: (ConvNet-32 and -128, batch 100: allocator overhead, transient buffers); 1.25 keeps it an upper bound.
UNROLL_OVERHEAD = 1.25
#: ``unroll`` is chosen only when its prediction is below this fraction of the free memory.
MEMORY_MARGIN = 0.8


@dataclass(frozen=True)
class MetaGradChoice:
    """A resolved ``method.meta_grad``: ``mode`` (one of :data:`MODES`), ``compile`` (compile the
    per-step functions; used by ``recompute`` only) and ``reason`` (one line, logged)."""

    mode: str
    compile: bool
    reason: str

    @property
    def label(self) -> str:
        """``unroll``, ``recompute`` or ``recompute+compile`` (the benchmark's row names)."""
        return self.mode + ("+compile" if self.compile and self.mode == "recompute" else "")


def choose_meta_grad(compile_ok: bool, predicted_bytes: float | None, available_bytes: float | None,
                     margin: float = MEMORY_MARGIN) -> MetaGradChoice:
    """The ``auto`` rule, a pure function: compiled ``recompute`` when compile is verified for the
    student (on 2 CPU cores, ConvNet-128: 0.53x the reference loop's time against 0.85x for
    ``unroll``, at constant memory); else ``unroll`` when its ``predicted_bytes`` are at most
    ``margin x available_bytes``; else (too big, or either figure unknown = ``None``) eager
    ``recompute``, whose memory does not grow with ``syn_steps``."""
    if compile_ok:
        return MetaGradChoice("recompute", True, "compile is verified for this student")
    if predicted_bytes is None or available_bytes is None:
        return MetaGradChoice("recompute", False, "unroll's memory could not be predicted")
    need, have = predicted_bytes / 2**30, available_bytes / 2**30
    if predicted_bytes <= margin * available_bytes:
        return MetaGradChoice("unroll", False, f"no verified compile; unroll's predicted {need:.2f} GiB fits "
                                               f"{margin:.0%} of {have:.2f} GiB free")
    return MetaGradChoice("recompute", False, f"no verified compile; unroll's predicted {need:.2f} GiB exceeds "
                                              f"{margin:.0%} of {have:.2f} GiB free")


def unroll_memory_bytes(fns: StudentFunctions, images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                        step: StudentStep, dsa: DSA | None, syn_steps: int) -> int:
    """Predicted peak bytes that ``unroll`` adds for ``syn_steps`` steps: ``UNROLL_OVERHEAD x
    (syn_steps + 1) x`` the bytes one real step (``step``'s batch, its DSA, the net's parameters)
    keeps for the backward pass -- the distinct storages its autograd graph saves, counted with
    :func:`torch.autograd.graph.saved_tensors_hooks` (activations of the forward and of the
    create-graph backward, the parameter vector). Runs that one step; shapes as in
    :func:`matching_loss_and_grads`."""
    theta = fns.flat.flatten().detach().to(images.device).requires_grad_(True)
    step_bytes = saved_tensor_bytes(lambda: _unrolled_step(fns, theta, images, labels, syn_lr, step, dsa))
    return int(UNROLL_OVERHEAD * (syn_steps + 1) * step_bytes)


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages that autograd saves for the backward pass while ``fn()`` runs
    (what its graph keeps alive; counted with :func:`torch.autograd.graph.saved_tensors_hooks`)."""
    sizes: dict[tuple, int] = {}

    def pack(t):
        s = t.untyped_storage()
        sizes[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(sizes.values())


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: on CUDA the driver's free memory plus PyTorch's cached,
    unallocated blocks; on CPU ``MemAvailable`` (psutil, else ``/proc/meminfo``); ``None`` when
    unknown (another device type, or neither source)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compile_verified(net: torch.nn.Module, image_shape) -> bool:
    """Whether compiling the student's per-step functions is trusted and worth it: its class is in
    :data:`lightning_dd.nets.FLAT_COMPILE_VERIFIED` and the images have at least 32x32 pixels (below,
    compiling costs more than it saves, see :func:`lightning_dd.nets.worth_compiling`)."""
    return arch_name(net) in FLAT_COMPILE_VERIFIED and worth_compiling(tuple(image_shape))


def resolve_meta_grad(requested: str, compile: bool | None, verified: bool,
                      predict_unroll_bytes: Callable[[], int], device: torch.device) -> MetaGradChoice:
    """``method.meta_grad`` and ``method.compile`` as run.

    Args:
        requested: ``auto``, ``unroll`` or ``recompute``.
        compile: ``True``/``False`` forces compiling the per-step functions on/off; ``None`` =
            where ``verified``.
        verified: :func:`compile_verified` for the student and images.
        predict_unroll_bytes: called only when ``auto`` needs it (:func:`unroll_memory_bytes`).
        device: where the student runs (its free memory, :func:`available_memory_bytes`).

    Raises:
        ValueError: unknown ``requested``.
    """
    compile_ok = verified if compile is None else compile
    if requested == "unroll":
        return MetaGradChoice("unroll", False, "method.meta_grad=unroll")
    if requested == "recompute":
        return MetaGradChoice("recompute", compile_ok, "method.meta_grad=recompute")
    if requested != "auto":
        raise ValueError(f"method.meta_grad must be 'auto', 'unroll' or 'recompute', got {requested!r}")
    if compile_ok:
        choice = choose_meta_grad(True, None, None)
        return choice if compile is None else MetaGradChoice("recompute", True, "method.compile=true")
    try:
        predicted = predict_unroll_bytes()
    except torch.OutOfMemoryError:  # one step did not fit: unroll cannot
        return MetaGradChoice("recompute", False, "one unrolled step ran out of memory")
    choice = choose_meta_grad(False, predicted, available_memory_bytes(device))
    if compile is False and verified:
        reason = choice.reason.replace("no verified compile", "method.compile=false")
        choice = MetaGradChoice(choice.mode, False, reason)
    return choice
