"""Several evaluation seeds trained at once: the ``eval.num_eval`` students of one set stacked along a
leading seed dimension and run as one batched network (``torch.func.stack_module_state`` +
``functional_call`` + ``vmap``), under one Lightning Trainer from the run's factory.

Seed ``i`` of the batch draws what the sequential run with seed ``seed + i`` draws
(:func:`lightning_dd.evaluate.student.evaluate_set`): the same initial weights (each net is built
right after ``seed_everything(seed + i)``), the same batch order (the same seeded
:class:`~lightning_dd.data.batches.TensorBatches` loader, iterated from the same global RNG state)
and the same augmentation parameters (each seed keeps its own copy of the global CPU/CUDA generator
states, swapped in around its augmentation call, so the DSA/kornia draws continue exactly the
stream the sequential run would consume). The optimizer is the same SGD (momentum, weight decay,
lr x0.1 at half) applied to the stacked parameters, which is elementwise and so per seed the same
update.

What is *not* bit-identical: the batched forward/backward. ``vmap`` turns S convolutions into one
grouped convolution and S linear layers into one batched matmul, whose kernels sum in another
order, so per-step losses agree to float32 rounding (about 1e-6 relative) and the trajectories
drift apart slowly. Observed on CPU in fp32: identical per-seed test accuracies on digits
(ConvNet-32, 5 seeds x 300 epochs, per-step loss differences up to 0.4% late in training) and on a
CIFAR-10 IPC-10 subset (ConvNet-64, 5 seeds x 10 epochs); guaranteed they are not. With
``bf16-mixed`` the rounding is coarser: up to 3 of 450 digits test images apart over 30 epochs.

Speed: on CPU a stacked step is compute-bound and slower than the S separate steps (2.2x on 2
cores, ``benchmarks/eval_seeds.py``: vmap's grouped convolutions, its decomposed GroupNorm affine
and the layout copies between them), so ``eval.parallel_seeds=auto`` stacks on CUDA devices only,
where one small student leaves the device mostly idle.

Supported: every network whose forward is ``vmap``-able without randomness (ConvNet in every norm,
AlexNet, VGG11, ResNet18; BatchNorm nets keep one set of running statistics per seed as stacked
buffers). :func:`batched_support` probes a net on two images and says why not otherwise.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, IterableDataset


class SeedRng:
    """One seed's private copy of the global RNG streams (CPU, and CUDA when ``cuda``).

    ``with rng.active(): ...`` runs the block on this seed's streams (so code that draws from the
    global generators, such as :meth:`lightning_dd.augment.dsa.DSA.sample` without a generator or
    kornia, continues this seed's sequence), then stores the advanced state and restores the
    outer one.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state() if cuda else None

    @contextmanager
    def active(self):
        outer_cpu = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state() if self.cuda else None
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self.cuda:
                self.cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(outer_cuda)

    def make_global(self) -> None:
        """Leave the global generators in this seed's current state."""
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state)


class ZippedBatches(IterableDataset):
    """Per-step stacks of S seeds' batches: ``(x (S, B, ...), y (S, B, ...))``.

    Args:
        iterators: S already-started iterators over ``(x, y)`` batches of equal shapes (one
            seeded loader per seed; starting them is what consumes the global RNG, see module doc).
        steps: number of stacked batches to yield (all iterators must last that long).
    """

    def __init__(self, iterators: list, steps: int):
        self.iterators, self.steps = iterators, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            parts = [next(it) for it in self.iterators]
            yield tuple(torch.stack(t) for t in zip(*parts))


class StackedNets(nn.Module):
    """S networks of one architecture as stacked parameters/buffers, run with ``vmap``.

    Args:
        nets: S modules of identical structure (their current weights are copied).

    Shapes: :meth:`forward` ``x (S, B, ...)`` -> ``(S, B, K)``; :meth:`forward_shared`
    ``x (B, ...)`` (the same input to every seed) -> ``(S, B, K)``.

    Raises:
        ValueError: fewer than one net, or nets whose parameter names/shapes differ.
    """

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        if not nets:
            raise ValueError("StackedNets needs at least one network")
        params, buffers = stack_module_state(nets)  # raises if structures differ
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.params = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.param_names])
        for i, n in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{i}", buffers[n].clone())
        self.num = len(nets)
        # the structure on the meta device: not a submodule (no weights to move or to optimize)
        self._base = [copy.deepcopy(nets[0]).to("meta")]
        self._fwd = vmap(self._call, in_dims=(0, 0, 0))
        self._fwd_shared = vmap(self._call, in_dims=(0, 0, None))

    def _buffers_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"stacked_buffer_{i}") for i in range(len(self.buffer_names)))

    def _call(self, params, buffers, x):
        state = dict(zip(self.param_names, params))
        state.update(zip(self.buffer_names, buffers))
        return functional_call(self._base[0], state, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._base[0].train(self.training)
        return self._fwd(tuple(self.params), self._buffers_tuple(), x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        self._base[0].train(self.training)
        return self._fwd_shared(tuple(self.params), self._buffers_tuple(), x)


def batched_support(net: nn.Module, sample: torch.Tensor, num: int = 2) -> str | None:
    """Why ``net`` cannot be trained batched over seeds, or ``None`` when it can.

    Runs ``num`` stacked copies of ``net`` forward and backward (train mode) on two images of
    ``sample (N, C, H, W)`` (the copies' buffers and gradients are thrown away).
    """
    try:
        nets = [copy.deepcopy(net).train() for _ in range(num)]
        stacked = StackedNets(nets)
        x = sample[:2].unsqueeze(0).expand(num, *sample[:2].shape).contiguous()
        stacked(x).float().sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means "run the seeds one by one"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


class SeedEnsembleModule(L.LightningModule):
    """Trains S stacked students on S seeds' batches in one Lightning loop; tests all on one pass.

    The per-seed counterpart of :class:`lightning_dd.evaluate.student.StudentModule` (same loss,
    optimizer and schedule; see the module doc for what stays equal per seed).

    Args:
        nets: S freshly initialized networks (seed order).
        rngs: one :class:`SeedRng` per net, the streams its augmentation draws from.
        loss: ``(logits (B, K), targets) -> scalar``, a seed's training loss (targets: ``(B,)``
            labels, ``(B, K)`` soft-label logits, or the teacher's logits).
        lr, total_steps, momentum, weight_decay: SGD with lr x0.1 after ``total_steps // 2``.
        augment: per-batch augmentation ``x (B, ...) -> x`` drawing from the global RNG, or ``None``.
        teacher: targets = its logits on each seed's augmented batch (knowledge distillation).

    Attributes:
        accs: after ``trainer.test``: per-seed test accuracy (fractions), a list of S floats.
        last_losses: the last step's per-seed losses ``(S,)``, detached.
    """

    def __init__(self, nets: list[nn.Module], rngs: list[SeedRng], loss, lr: float, total_steps: int,
                 momentum: float = 0.9, weight_decay: float = 5e-4, augment=None, teacher: nn.Module | None = None):
        super().__init__()
        if len(nets) != len(rngs):
            raise ValueError(f"{len(nets)} nets but {len(rngs)} RNG streams")
        self.stacked = StackedNets(nets)
        self.rngs, self.loss, self.augment = rngs, loss, augment
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.lr, self.total_steps, self.momentum, self.weight_decay = lr, total_steps, momentum, weight_decay
        self.accs: list[float] = []
        self.last_losses: torch.Tensor | None = None

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment is None:
            return x
        out = []
        for i, rng in enumerate(self.rngs):
            with rng.active():
                out.append(self.augment(x[i]))
        return torch.stack(out)

    def _targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return y
        with torch.no_grad():
            return self.teacher(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._augmented(x)
        out = self.stacked(x)
        losses = torch.stack([self.loss(out[i], self._targets(x[i], y[i])) for i in range(len(self.rngs))])
        self.last_losses = losses.detach()
        return losses.sum()  # seed i's parameters only see seed i's loss: the sum's gradient is per seed

    def on_test_start(self):
        self._correct = torch.zeros(len(self.rngs), dtype=torch.long, device=self.device)
        self._total = 0

    def test_step(self, batch, batch_idx):
        x, y = batch
        pred = self.stacked.forward_shared(x).argmax(-1)  # (S, M)
        self._correct += (pred == y).sum(-1)
        self._total += y.numel()

    def on_test_end(self):
        # float32, as torchmetrics' accuracy of the sequential runs reports it
        self.accs = (self._correct.float() / max(self._total, 1)).tolist()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.stacked.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[self.total_steps // 2], gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def zipped_loader(iterators: list, steps: int) -> DataLoader:
    """A DataLoader over :class:`ZippedBatches` (whole stacked batches, no collation)."""
    return DataLoader(ZippedBatches(iterators, steps), batch_size=None)


PARALLEL_SEEDS = ("auto", "vmap", "sequential")


def trains_on_cuda(make_trainer) -> bool:
    """Whether the factory's Trainers run on a CUDA device (``auto`` picks one when present)."""
    acc = str(getattr(make_trainer, "accelerator", "auto")).lower()
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def seed_mode(requested: str, num_eval: int, make_trainer) -> tuple[str, str]:
    """``("vmap" | "sequential", reason)``: how the ``num_eval`` seeds of one set are trained.

    ``sequential``: one Trainer per seed. ``vmap``: all seeds stacked (raises if the run's
    Trainer settings rule it out). ``auto``: stacked on CUDA devices; one by one on CPUs, where a
    step is compute-bound and the stacked students were measured 2.2x slower than the S separate
    runs (see the module doc and ``benchmarks/eval_seeds.py``). The network itself is checked
    later (:func:`batched_support`).

    Raises:
        ValueError: ``requested`` not one of :data:`PARALLEL_SEEDS`, or ``vmap`` asked for with
            several devices/nodes, a distributed strategy, or fp16 mixed precision (one shared
            GradScaler: a single seed's overflow would skip every seed's step).
    """
    if requested not in PARALLEL_SEEDS:
        raise ValueError(f"eval.parallel_seeds must be one of {PARALLEL_SEEDS}, got {requested!r}")
    if requested == "sequential":
        return "sequential", "eval.parallel_seeds=sequential"
    if num_eval < 2:
        return "sequential", "one seed"
    blockers = []
    devices, strategy = getattr(make_trainer, "devices", 1), str(getattr(make_trainer, "strategy", "auto"))
    if devices not in (1, "1", [0]) or getattr(make_trainer, "num_nodes", 1) != 1:
        blockers.append(f"trainer.devices={devices}, num_nodes={getattr(make_trainer, 'num_nodes', 1)}")
    if strategy not in ("auto", "single_device"):
        blockers.append(f"trainer.strategy={strategy}")
    precision = str(getattr(make_trainer, "precision", "32-true"))
    if precision.startswith("16") or "fp16" in precision:
        blockers.append(f"precision={precision} (one GradScaler for all seeds)")
    if blockers:
        if requested == "vmap":
            raise ValueError(f"eval.parallel_seeds=vmap needs one device and no fp16 scaler; got {', '.join(blockers)} "
                             "(use eval.parallel_seeds=sequential or auto)")
        return "sequential", "; ".join(blockers)
    if requested == "vmap":
        return "vmap", "eval.parallel_seeds=vmap"
    if not trains_on_cuda(make_trainer):
        return "sequential", "CPU: stacked seeds are slower than one by one there (benchmarks/eval_seeds.py)"
    return "vmap", "CUDA device"
