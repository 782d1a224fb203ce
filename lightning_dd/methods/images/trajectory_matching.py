"""Trajectory matching: DATM (Guo et al., ICLR 2024, arXiv 2310.05773) on top of MTT
(Cazenavette et al., CVPR 2022, arXiv 2203.11932).

Algorithm (one distillation iteration, :meth:`TrajectoryMatching.training_step`):

1. sample an expert trajectory ``theta*`` and a start epoch ``t`` in the matching window
   ``[min_start_epoch, upper)``; with DATM's sequential generation the upper bound grows linearly
   from ``current_max_start_epoch`` to ``max_start_epoch`` over ``expansion_end_epoch`` iterations
   (difficulty alignment: easy, early trajectory segments first, DATM Sec. 3.2);
2. start a student at ``theta*_t`` and unroll ``syn_steps`` SGD steps with the learnable lr
   ``alpha`` on minibatches of ``batch_syn`` synthetic images, each augmented by DSA;
3. minimize ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` (``M = expert_epochs``)
   over the images, the learnable soft labels (DATM Sec. 3.3) and ``alpha``; skip the update when
   the loss exceeds ``threshold`` (DATM's reference code).

Initialization (DATM): real images the experts classify correctly (``pix_init =
samples_predicted_correctly``), soft labels = expert logits averaged over the experts that classify
each image correctly. MTT is the same module with ``soft_labels=false``, ``pix_init=real`` and a
fixed window (``sequential_generation=false``).

``method.clom.*`` (off by default) adds the CLoM term of a trained model pool (Lu et al., arXiv
2310.03295; :mod:`lightning_dd.methods.images.clom`) to the images' gradient after the matching
meta-gradient, before the step (:meth:`TrajectoryMatching.clom_backward`).

Parity (``tests/parity/test_parity_trajectory_matching.py``): from the same expert, images, labels,
lr and generator state, one iteration equals MTT's ``distill.py`` (hard labels) and DATM's
``distill/DATM.py`` (soft labels), DSA off and on: the loss and the gradients w.r.t. images, lr and
soft labels, in every ``meta_grad`` mode (relative error ~3e-7).

Deviations from the reference code (MTT ``distill.py``, DATM ``distill/DATM.py`` and its configs):

* **Experts** are trained with plain SGD as MTT's ``buffer.py`` (lr 0.01, no momentum, DSA), also
  for DATM, whose README trains them with ``buffer_FTD.py``: GSAM (FTD, arXiv 2211.11004,
  ``rho 0.01``, ``alpha 0.3``) for 100 epochs. Not implemented (a flat-minimum optimizer for the
  experts); ``experiment=datm_*`` uses DATM's 100 epochs, with SGD.
* **Expert order**: each iteration draws its expert uniformly (MTT's ``--load_all`` path); without
  ``--load_all`` the scripts walk a shuffled list, file of 10 experts by file. Same marginal
  distribution per iteration; ours is keyed by (seed, iteration) so that resumed and sharded runs
  make the same choices.
* **Soft-label init fallback**: an image no expert classifies correctly gets the mean logits of
  all experts (the reference divides by zero; its image selection makes that case unreachable
  with ``samples_predicted_correctly``).
* **Too few correct images** for ``samples_predicted_correctly``: the class is filled with random
  images and a warning (the reference loops over the experts forever).
* **Per draw threshold** with ``expert_draws > 1`` (one draw is the reference's single skip).

Fixed to the reference: the window bound's arithmetic (``int(diff * it / end)``; ours had rounded
``diff * (it / end)``, 4 iterations in 10^5 off by one), soft labels for ``pix_init=real`` from one
expert's logits (``buffer[0][-1]``; ours averaged all experts), and in :mod:`lightning_dd.augment.dsa`
the draw order and rotation direction, so the same RNG state gives the reference's augmentations.

Several devices (``trainer.devices=2 trainer.strategy=ddp``; gloo on CPU, NCCL on GPUs): DDP cannot
synchronize the double backward of an unrolled student (its reducer would fire on every partial
backward of ``recompute`` and never on the unused template net), so the expert draws are sharded
instead. Each iteration makes ``method.expert_draws`` draws (expert, start epoch, minibatches, DSA),
draw ``d`` from its own generator keyed by (seed, iteration, d), all for the same synthetic set; rank
``r`` of ``W`` computes draws ``r, r + W, ...``; one ``all_reduce`` (sum) of the draws' losses and
summed gradients (images, soft labels, lr) gives every rank the same mean gradient over the kept
draws, then each steps its identical copy. A draw whose loss exceeds ``threshold`` is dropped
(DATM's skip, per draw; no step when all are dropped), decided from the all-reduced losses so that
every rank agrees. One process with ``expert_draws=1`` is the single-draw algorithm, number for
number. Lightning's ``DDPStrategy`` still wraps the module (and broadcasts rank 0's synthetic set at
start), but in manual optimization its reducer only runs for ``manual_backward``, which is never
called here; so the module runs under ``ddp``, ``ddp_spawn`` and the single-device strategies, others
are refused (:meth:`TrajectoryMatching.check_strategy`). A whole run (experts, distillation,
evaluation) needs ``ddp``: the spawn/fork strategies hand back only rank 0's weights from each fit.
"""
from __future__ import annotations

import logging
import time
from typing import ClassVar, Literal

import lightning as L
import torch
from pydantic import model_validator

from lightning_dd.augment.dsa import DSA
from lightning_dd.core.config import ConfigError, Fraction, NonNegInt, PositiveFloat, PositiveInt
from lightning_dd.data.protocols import ImageData
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.images.base import ImageMethod
from lightning_dd.methods.images.clom import ClomConfig, ClomTerm, clom_term
from lightning_dd.methods.images.experts import ExpertSettings, expert_bank
from lightning_dd.methods.images.meta_grad import (MetaGradChoice, StudentFunctions, StudentStep, compile_verified,
                                                   draw_student_steps, matching_loss_and_grads, resolve_meta_grad,
                                                   unroll_memory_bytes)
from lightning_dd.nets import FlatParams, build_net_cfg
from lightning_dd.results import DistilledSet
from lightning_dd.training.devices import planned_world_size, require_ddp
from lightning_dd.training.fit import fit_steps

log = logging.getLogger(__name__)


def window_upper_bound(iteration: int, min_start_epoch: int, current_max_start_epoch: int, max_start_epoch: int,
                       expansion_end_epoch: int, sequential_generation: bool) -> int:
    """Exclusive upper bound of the start epoch at ``iteration`` (DATM Sec. 3.2, sequential generation).

    Grows linearly from ``current_max_start_epoch`` (iteration 0) to ``max_start_epoch`` (at
    ``expansion_end_epoch`` iterations and after); fixed at ``max_start_epoch`` without sequential
    generation. Always ``> min_start_epoch``.
    """
    if sequential_generation:  # DATM's arithmetic (distill/DATM.py): int(diff * it / end), then the cap
        upper = current_max_start_epoch + int((max_start_epoch - current_max_start_epoch) * iteration
                                              / expansion_end_epoch)
        upper = min(upper, max_start_epoch)
    else:
        upper = max_start_epoch
    return max(upper, min_start_epoch + 1)


@torch.no_grad()
def select_correct_samples(images: torch.Tensor, labels: torch.Tensor, num_classes: int, ipc: int,
                           predictors: list, generator: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """Per class, ``ipc`` random training images that the first predictor classifies correctly
    (DATM's ``samples_predicted_correctly``); falls back to the next predictors, then to any image.

    Args:
        images: ``(N, C, H, W)``; labels: ``(N,)``.
        predictors: callables ``x -> logits``.

    Returns:
        ``(num_classes * ipc,)`` indices into ``images``, class-major.
    """
    chosen = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        picked: list[int] = []
        for predict in predictors:
            for part in idx.split(chunk):
                part = part[~torch.isin(part, torch.tensor(picked, dtype=part.dtype))]
                ok = part[predict(images[part]).argmax(1).cpu() == c]
                picked += ok[: ipc - len(picked)].tolist()
                if len(picked) == ipc:
                    break
            if len(picked) == ipc:
                break
        if len(picked) < ipc:
            log.warning("class %d: only %d correctly classified images; filling with random ones", c, len(picked))
            rest = idx[~torch.isin(idx, torch.tensor(picked, dtype=idx.dtype))]
            picked += rest[: ipc - len(picked)].tolist()
        chosen.append(torch.tensor(picked, dtype=torch.long))
    return torch.cat(chosen)


@torch.no_grad()
def expert_soft_labels(images: torch.Tensor, labels: torch.Tensor, predictors: list) -> torch.Tensor:
    """DATM's soft-label initialization: ``(N, K)`` logits averaged, per image, over the experts
    that classify it correctly (over all experts for an image none gets right)."""
    logits = torch.stack([p(images).cpu() for p in predictors])  # (E, N, K)
    correct = (logits.argmax(2) == labels.view(1, -1)).float().unsqueeze(2)  # (E, N, 1)
    n = correct.sum(0)
    avg_correct = (logits * correct).sum(0) / n.clamp(min=1)
    return torch.where(n > 0, avg_correct, logits.mean(0))


class TrajectoryMatching(L.LightningModule):
    """The distillation loop (manual optimization); see the module docstring.

    Args:
        images: ``(N, C, H, W)`` initial synthetic images (model space).
        labels: ``(N,)`` int64 hard labels or ``(N, K)`` soft-label logits (learned iff
            ``soft_labels``).
        trajectories: expert trajectories, each ``(E+1, P)``.
        net: the student architecture (its parameters are only a template).
        hp: the method (:class:`TrajectoryMatchingMethod`: syn_steps, expert_epochs, window, lrs, ...).
        dsa: augmentation of synthetic minibatches.
        clom: optional CLoM term (arXiv 2310.03295) added to the images' gradient each iteration;
            ``clom_real``: ``(x (N_r, C, H, W), y (N_r,))`` real images it draws real batches from
            (cosine CLoM only).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, trajectories: list[torch.Tensor],
                 net: torch.nn.Module, hp: "TrajectoryMatchingMethod", dsa: DSA | None, seed: int = 0,
                 clom: ClomTerm | None = None, clom_real: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.clom, self.clom_real = clom, clom_real
        self.register_buffer("hard_labels", labels.argmax(1) if labels.dim() == 2 else labels.clone(), persistent=False)
        self.automatic_optimization = False
        self.hp, self.dsa, self.seed = hp, dsa, seed
        self.images = torch.nn.Parameter(images.clone())
        if hp.soft_labels:
            self.labels = torch.nn.Parameter(labels.clone().float())
        else:
            self.register_buffer("labels", labels.clone())
        self.syn_lr = torch.nn.Parameter(torch.tensor(hp.lr_teacher))
        self.trajectories = trajectories
        self.net = net
        self.fns = None
        self.meta_grad: MetaGradChoice | None = None  # resolved in on_fit_start

    def on_fit_start(self):
        if self._trainer is not None:
            self.check_strategy()
        self.trajectories = [t.to(self.device) for t in self.trajectories]
        flat = FlatParams(self.net)
        self.meta_grad = self.resolve_meta_grad(flat)
        self.fns = StudentFunctions(flat, compile=self.meta_grad.compile)
        if self.clom is not None:
            self.clom.pool.to(self.device)

    def resolve_meta_grad(self, flat: FlatParams) -> MetaGradChoice:
        """``method.meta_grad`` / ``method.compile`` as run on this device (``auto`` resolved, see
        :func:`lightning_dd.methods.images.meta_grad.resolve_meta_grad`), logged with the reason."""
        hp, n = self.hp, self.images.shape[0]
        batch = min(hp.batch_syn or n, n)

        def predict() -> int:  # one real unrolled step of a batch_syn batch
            aug = self.dsa.sample(batch, self.images.shape[-2:], generator=torch.Generator().manual_seed(0),
                                  device=self.device) if self.dsa is not None and self.dsa.enabled else None
            step = StudentStep(torch.arange(batch, device=self.device), aug)
            return unroll_memory_bytes(StudentFunctions(flat), self.images, self.labels, self.syn_lr, step, self.dsa,
                                       hp.syn_steps)

        choice = resolve_meta_grad(hp.meta_grad, hp.compile, compile_verified(self.net, self.images.shape[1:]),
                                   predict, self.device)
        log.info("method.meta_grad=%s runs %s: %s", hp.meta_grad, choice.label, choice.reason)
        return choice

    def clom_backward(self, iteration: int) -> dict:
        """Add ``alpha * L_CLoM`` of one pooled model to the images' gradient (the labels and lr
        get none: the term guides the images). Its own generator, keyed by (seed, iteration), leaves
        the expert/window/batch draws of :meth:`sample_iteration` unchanged. Returns log entries."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration + 7_777_777)
        real = None
        if self.clom.hp.kind == "cos":
            x, y = self.clom_real
            idx = torch.randperm(len(y), generator=g)[: min(len(y), 32 * int(y.max() + 1))]
            real = (x[idx].to(self.device), y[idx].to(self.device))
        labels = self.labels.detach() if self.clom.hp.kind == "ce" else self.hard_labels
        term, member = self.clom(self.images, labels, g, real=real)
        term.backward()
        return {"distill/loss_clom": term.detach(), "distill/clom_epoch": float(member.epoch)}

    def configure_optimizers(self):
        """One SGD, three parameter groups (images, lr, soft labels) with the papers' lrs and
        momenta, so that Lightning's ``global_step`` counts distillation iterations."""
        hp = self.hp
        groups = [{"params": [self.images], "lr": hp.lr_img, "momentum": 0.5},
                  {"params": [self.syn_lr], "lr": hp.lr_lr, "momentum": 0.5}]
        if hp.soft_labels:
            groups.append({"params": [self.labels], "lr": hp.lr_y, "momentum": hp.momentum_y})
        return torch.optim.SGD(groups)

    def sample_iteration(self, iteration: int, draw: int = 0):
        """The random choices of draw ``draw`` of one iteration, from a generator keyed by (seed,
        iteration, draw), so a resumed run, and any split of the draws over processes, makes the same
        choices (draw 0's key is the single-draw one; the CPU generator keeps 32 bits of a seed, so
        draws are offset by an odd 32-bit constant). Returns ``(expert, start_epoch, upper, steps)``."""
        hp = self.hp
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + iteration + draw * 2_654_435_761) % 2**63)
        expert = int(torch.randint(len(self.trajectories), (1,), generator=g))
        upper = window_upper_bound(iteration, hp.min_start_epoch, hp.current_max_start_epoch, hp.max_start_epoch,
                                   hp.expansion_end_epoch, hp.sequential_generation)
        start = int(torch.randint(hp.min_start_epoch, upper, (1,), generator=g))
        n = self.images.shape[0]
        batch = min(hp.batch_syn or n, n)
        steps = draw_student_steps(n, batch, hp.syn_steps, g, self.dsa, self.images.shape[-2:], self.device)
        return expert, start, upper, steps

    def local_draws(self) -> range:
        """The global indices of the expert draws this process computes: ``rank, rank + W, ...``
        below ``expert_draws`` (all of them on one process)."""
        rank, world = (self._trainer.global_rank, self._trainer.world_size) if self._trainer is not None else (0, 1)
        return range(rank, self.hp.expert_draws, world)

    def check_strategy(self) -> None:
        """Refuse a strategy the draw sharding does not support, or more processes than draws.

        Raises:
            ConfigError: naming ``trainer.strategy`` or ``method.expert_draws``.
        """
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy, world = self.trainer.strategy, self.trainer.world_size
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ConfigError(f"trainer.strategy: trajectory matching runs on one device or under DDP (ddp, ddp_spawn, "
                              f"...: expert draws sharded over ranks), not {type(strategy).__name__}")
        if world > self.hp.expert_draws:
            raise ConfigError(f"method.expert_draws: {self.hp.expert_draws} expert draw(s) per iteration cannot be "
                              f"split over {world} processes; set method.expert_draws={world} (or a multiple)")

    def all_reduce_draws(self, losses: torch.Tensor, grads: list[torch.Tensor]):
        """Sum ``losses (E,)`` and the gradient sums ``grads`` over the processes, in one ``all_reduce``
        (identity on one process). Returns ``(losses, grads)``."""
        if self._trainer is None or self.trainer.world_size == 1:
            return losses, grads
        flat = self.trainer.strategy.reduce(torch.cat([losses, *(g.reshape(-1) for g in grads)]), reduce_op="sum")
        parts = flat.split([losses.numel(), *(g.numel() for g in grads)])
        return parts[0], [t.view_as(g) for t, g in zip(parts[1:], grads)]

    def training_step(self, batch, batch_idx):
        hp = self.hp
        it = self.global_step  # = iterations done, also after a resume
        opt = self.optimizers()
        opt.zero_grad()
        t0 = time.perf_counter()
        leaves = [p for p in (self.images, self.syn_lr, self.labels) if p.requires_grad]
        losses = torch.zeros(hp.expert_draws, device=self.device)
        sums = [torch.zeros_like(p) for p in leaves]  # gradients summed over this process's kept draws
        first = None
        for d in self.local_draws():
            expert, start, upper, steps = self.sample_iteration(it, d)
            traj = self.trajectories[expert]
            if start + hp.expert_epochs >= traj.shape[0]:
                raise ValueError(f"start epoch {start} + expert_epochs {hp.expert_epochs} exceeds the expert "
                                 f"trajectory ({traj.shape[0] - 1} epochs): lower method.max_start_epoch or train "
                                 f"longer experts")
            first = first or (start, upper)
            for p in leaves:
                p.grad = None
            losses[d] = matching_loss_and_grads(self.fns, self.images, self.labels, self.syn_lr, traj[start],
                                                traj[start + hp.expert_epochs], steps, self.dsa,
                                                mode=self.meta_grad.mode)
            if torch.isfinite(losses[d]) and not losses[d] > hp.threshold:
                for s, p in zip(sums, leaves):
                    s += p.grad
        losses, sums = self.all_reduce_draws(losses, sums)  # every rank now holds every draw's loss
        if not torch.isfinite(losses).all():
            raise FloatingPointError(f"iteration {it}: matching loss is {losses.tolist()} (per draw); lower "
                                     f"method.lr_img / lr_lr")
        kept = int((losses <= hp.threshold).sum())  # DATM skips a draw whose loss exceeds the threshold
        for s, p in zip(sums, leaves):
            p.grad = s / kept if kept else None  # the mean over kept draws; SGD skips parameters without .grad
        clom_logs = self.clom_backward(it) if self.clom is not None else {}
        if not kept:
            opt.zero_grad(set_to_none=True)
        opt.step()
        start, upper = first
        loss = losses.mean()
        self.log_dict({**clom_logs, "distill/loss": loss, "distill/syn_lr": self.syn_lr.detach(),
                       "distill/start_epoch": float(start), "distill/window_upper": float(upper),
                       "distill/draws_kept": kept / hp.expert_draws,
                       "distill/iter_seconds": time.perf_counter() - t0}, prog_bar=False)
        self.log("loss", loss, prog_bar=True, logger=False)

    def current_set(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(), float(self.syn_lr.detach())


def _expert_predictors(flat: FlatParams, trajectories, epoch: int):
    def make(theta):
        return lambda x: flat.call(theta, x)
    return [make(t[epoch]) for t in trajectories]


class TrajectoryMatchingMethod(ExpertSettings, ImageMethod):
    """DATM / MTT as a method (``conf/method/datm.yaml``, ``mtt.yaml``): experts -> initialization ->
    distillation (:class:`TrajectoryMatching`); see the module docstring for the algorithm.

    Stages: ``experts`` (train and cache the expert trajectories only), ``distill`` (no
    evaluation), ``all``.
    """

    stages: ClassVar[tuple[str, ...]] = ("all", "experts", "distill")
    syn_steps: PositiveInt
    expert_epochs: PositiveInt
    min_start_epoch: NonNegInt
    current_max_start_epoch: PositiveInt
    max_start_epoch: PositiveInt
    expansion_end_epoch: PositiveInt
    sequential_generation: bool
    batch_syn: PositiveInt | None
    iterations: PositiveInt
    lr_img: PositiveFloat
    lr_lr: PositiveFloat
    lr_y: PositiveFloat
    momentum_y: Fraction
    soft_labels: bool
    pix_init: Literal["samples_predicted_correctly", "real"]
    label_init_epoch: int
    threshold: PositiveFloat
    expert_draws: PositiveInt
    meta_grad: Literal["auto", "unroll", "recompute"]
    compile: bool | None
    ckpt_every: PositiveInt
    clom: ClomConfig

    @model_validator(mode="after")
    def _window(self):
        if not self.min_start_epoch < self.max_start_epoch:
            raise ValueError(f"min_start_epoch ({self.min_start_epoch}) must be below max_start_epoch "
                             f"({self.max_start_epoch})")
        if self.max_start_epoch - 1 + self.expert_epochs > self.expert_train_epochs:
            raise ValueError(f"the last start epoch (max_start_epoch - 1 = {self.max_start_epoch - 1}) + expert_epochs "
                             f"({self.expert_epochs}) exceeds the experts' expert_train_epochs "
                             f"({self.expert_train_epochs})")
        return self

    def check(self, ctx: RunContext) -> None:
        world = planned_world_size(ctx.make_trainer)
        if world is not None and world > self.expert_draws:
            raise ConfigError(f"method.expert_draws: {self.expert_draws} expert draw(s) per iteration cannot be split "
                              f"over {world} processes (trainer.devices x trainer.num_nodes); set "
                              f"method.expert_draws={world} (or a multiple)")
        require_ddp(ctx.make_trainer, "trajectory matching")  # experts and the distillation state pass between fits
        if ctx.net.get("norm") == "batchnorm":
            raise ConfigError("net.norm: trajectory matching unrolls a buffer-free student; use instancenorm, "
                              "not batchnorm")
        if self.clom.enabled:
            self.clom.check_archs(ctx.net)

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        dm, seed = ctx.dm, ctx.seed
        dsa = ctx.augment.enabled_dsa()
        timings, metrics = {}, {}

        # 1. expert trajectories (cached)
        t0 = time.perf_counter()
        bank = expert_bank(ctx, self)
        experts = bank.ensure(self.num_experts, dm.train_images, dm.train_labels, dm.num_classes,
                              test=(dm.test_images, dm.test_labels))
        trajectories = [e["trajectory"] for e in experts]
        timings["experts_s"] = time.perf_counter() - t0
        accs = [e["test_acc"] for e in experts if e["test_acc"] is not None]
        if accs:
            metrics["experts/test_acc_mean"] = sum(accs) / len(accs)
        metrics["experts/n"] = len(experts)
        log.info("experts: %d in %s (%.1fs)", len(experts), bank.dir, timings["experts_s"])
        if ctx.stage == "experts":
            return MethodOutput(timings=timings, metrics=metrics)

        # 2. initialization
        t0 = time.perf_counter()
        net = build_net_cfg(ctx.net, dm.train_images.shape[1], dm.num_classes, dm.image_shape[1:])
        flat = FlatParams(net)
        g = torch.Generator().manual_seed(seed)
        label_epoch = self.label_init_epoch if self.label_init_epoch >= 0 else trajectories[0].shape[0] + self.label_init_epoch
        predictors = _expert_predictors(flat, trajectories, label_epoch)
        if self.pix_init == "samples_predicted_correctly":
            idx = select_correct_samples(dm.train_images, dm.train_labels, dm.num_classes, self.ipc, predictors, g)
        else:
            idx = torch.cat([i[torch.randperm(len(i), generator=g)[: self.ipc]] for i in dm.class_indices()])
        images, hard = dm.train_images[idx].clone(), dm.train_labels[idx].clone()
        # DATM: logits averaged over the experts that classify an image correctly; with real init, the
        # logits of one expert (its buffer[0]) as they are
        label_predictors = predictors[:1] if self.pix_init == "real" else predictors
        labels = expert_soft_labels(images, hard, label_predictors) if self.soft_labels else hard
        init = DistilledSet(images.clone(), labels.clone(), float(self.lr_teacher), dm.classes,
                            dm.preprocessing.state(), method=f"{self.name}-init", ipc=self.ipc)
        timings["init_s"] = time.perf_counter() - t0

        # 3. distillation (+ the optional CLoM term of a trained model pool)
        clom = clom_term(self.clom, ctx, timings, metrics) if self.clom.enabled else None
        t0 = time.perf_counter()
        module = TrajectoryMatching(images, labels, trajectories, net, self, dsa, seed=seed, clom=clom,
                                    clom_real=(dm.train_images, dm.train_labels))
        ckpt_dir = ctx.out_dir / "checkpoints"
        trainer = fit_steps(module, ctx.make_trainer, "distill", self.iterations, ckpt_dir, self.ckpt_every,
                            ctx.resume_from(ckpt_dir / "last.ckpt", "distillation"), ctx.loggers,
                            self.callbacks(ctx), log_every_n_steps=1)
        timings["distill_s"] = time.perf_counter() - t0
        metrics.update({"distill/iterations": trainer.global_step, "distill/meta_grad_mode": module.meta_grad.label})
        x, y, lr = module.current_set()
        result = DistilledSet(x, y, lr, dm.classes, dm.preprocessing.state(), method=self.name, ipc=self.ipc,
                              meta={"iterations": metrics["distill/iterations"]})
        return MethodOutput(result=result, init=init, timings=timings, metrics=metrics)
