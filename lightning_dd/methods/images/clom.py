"""CLoM: guidance of dataset distillation by a pool of trained models (Lu et al., "Can pre-trained
models assist in dataset distillation?", arXiv 2310.03295; the paper's DDInterpreter study).

The distillation loss gets an extra term computed with a *pooled* model (a network trained on the
real data): ``L = L_DD + alpha * L_CLoM``. Two kinds (``kind``):

* ``ce`` (CE-CLoM): ``CE(f(S), y_S)``, the pooled model's cross-entropy on the synthetic images.
* ``cos`` (cosine CLoM): with ``D_ij = 1 - cos(phi(s_i), phi(r_j))`` between the pooled model's
  penultimate features of synthetic image ``i`` and real image ``j`` and ``M_ij = [y_i = y_j]``,
  ``sum(M * D) / sum(D)``: the share of the feature distance that lies within a class (pulls
  synthetic images towards their class's real images relative to the other classes).

The pool (:class:`ModelPool`): architectures x seeds x checkpoints per epoch (the paper's study
axes: sub-optimal, early-epoch models and a diverse pool can help). Each iteration draws one member
uniformly. By default it is the authors' (``train_original_models.py`` and the README's
``--model_num 1 --epoch 150``): one ConvNet trained 150 epochs with SGD lr 0.01, momentum 0.9,
weight decay 5e-3, batch 256, no augmentation, its epoch-150 weights drawn. The members are expert
trajectories of :mod:`lightning_dd.methods.images.experts` (parameters recorded after every epoch), so
the pool is trained once, cached
under a directory keyed by everything that determines it, written atomically with a checksum,
loaded with ``weights_only=True`` (a corrupted member file is reported and retrained:
:meth:`lightning_dd.methods.images.experts.ExpertBank.load`), and shared with trajectory matching and the
feature coresets when the settings agree (e.g. the CIFAR-10 ``scale=cpu`` experts).

Deviations from the reference code (yaolu-zjut/DDInterpreter):

* Pooled models are trained by the framework (no downloadable pretrained weights here), with the
  authors' recipe including their ``MultiStepLR`` (lr x0.1 after epochs 50 and 100, ``lr_milestones``).
* The CPU presets (``conf/scale_preset/dm_clom_cifar10/cpu.yaml``) keep the earlier short pool,
  set there only: 3 models, plain SGD (momentum 0, weight decay 0) with DSA
  (``augment: true``), checkpoints after epochs 2-5 drawn; it is the trajectory-matching CPU
  experts' cache, and the authors' 150 epochs would take ~80 min per model on one CPU core.
* Members must be buffer-free (instance norm, no BatchNorm): an expert trajectory stores the flat
  parameters only. :meth:`ClomConfig.check_archs` says so before any work.

Hook for another distillation loop (e.g. trajectory matching): build ``pool = ModelPool.build(...)``
and ``term = ClomTerm(hp, pool)`` once, then in each iteration, before the optimizer step,
``term(images, labels, generator, real=(x, y)).backward()`` accumulates ``alpha * L_CLoM`` into
the images' gradient.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator

from lightning_dd.core.config import ConfigError, Fraction, NonNegFloat, PositiveFloat, PositiveInt, Typed
from lightning_dd.evaluate.images import eval_net_cfg
from lightning_dd.losses import label_loss
from lightning_dd.methods.base import RunContext
from lightning_dd.methods.images.experts import ExpertBank
from lightning_dd.nets import FlatParams, build_net_cfg

log = logging.getLogger(__name__)


class ClomConfig(Typed):
    """``method.clom``: the CLoM term and its pool (arXiv 2310.03295, Sec. 4-5); the defaults, the
    authors' pool recipe with the term off, are in ``conf/clom/default.yaml``.

    Attributes:
        enabled: add the term.
        kind: ``ce`` (CE-CLoM) or ``cos`` (cosine CLoM).
        alpha: weight of the term.
        archs: pool architectures (names of :data:`lightning_dd.nets.ARCHITECTURES`; the run's own
            ``net`` config when the name is the run's net, else that architecture's defaults).
        seeds: models per architecture (seeds ``seed .. seed + seeds - 1``).
        epochs: the checkpoints drawn from (epoch numbers >= 1; each model trains ``max(epochs)``).
        lr, batch, momentum, weight_decay: the pool models' SGD (the authors'
            ``train_original_models.py``: 0.01, 256, 0.9, 5e-3).
        lr_milestones: epochs after which the pool's lr is multiplied by 0.1 (the authors'
            ``MultiStepLR``, ``--lr_decay_step 50,100``, stepped per epoch); empty: constant lr.
        augment: train the pool models with the run's DSA on every batch (the authors train them
            without augmentation; the CPU presets keep DSA to share the trajectory-matching experts).
        on_augmented: compute the term on the DSA-augmented synthetic batch (false: on ``S``).
        real_batch: real images the cosine term contrasts against, drawn uniformly with replacement
            from the training set each iteration (the authors' ``CLoM_batch_size``, README 8196;
            :func:`uniform_real_batch`; used by DM, trajectory matching draws its own).
    """

    enabled: bool
    kind: Literal["ce", "cos"]
    alpha: NonNegFloat
    archs: list[str]
    seeds: PositiveInt
    epochs: list[PositiveInt]
    lr: PositiveFloat
    batch: PositiveInt
    momentum: Fraction
    weight_decay: NonNegFloat
    lr_milestones: list[PositiveInt]
    augment: bool
    on_augmented: bool
    real_batch: PositiveInt

    @field_validator("archs", "epochs")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("must not be empty")
        return v

    def check_archs(self, run_net: dict) -> None:
        """Raises :class:`ConfigError` for an unknown or a BatchNorm (buffered) pool architecture."""
        for name in self.archs:
            try:
                net = build_net_cfg(eval_net_cfg(run_net, name), 3, 10, (32, 32))
            except ValueError as e:
                raise ConfigError(f"method.clom.archs: {e}") from None
            if any(True for _ in net.buffers()):
                raise ConfigError(f"method.clom.archs: {name} has buffers (BatchNorm); pool members are stored as "
                                  "flat parameters: use an instance-norm architecture")


@dataclass
class PoolMember:
    """One pooled model: architecture index, seed index, epoch and its flat parameters ``(P,)``."""

    arch: int
    seed: int
    epoch: int
    theta: torch.Tensor


class ModelPool:
    """Trained models drawn by CLoM: ``archs x seeds x epochs`` members.

    Args:
        flats: one :class:`FlatParams` template per architecture.
        members: the members (parameters on the device they will run on).
        test_acc: ``{arch name: [test accuracy after max(epochs), per seed]}`` (or empty).
    """

    def __init__(self, flats: list[FlatParams], names: list[str], members: list[PoolMember],
                 test_acc: dict | None = None, dirs: list[Path] | None = None):
        if not members:
            raise ValueError("empty model pool")
        self.flats, self.names, self.members = flats, names, members
        self.test_acc, self.dirs = test_acc or {}, dirs or []

    def __len__(self) -> int:
        return len(self.members)

    @classmethod
    def build(cls, hp: ClomConfig, ctx: RunContext) -> "ModelPool":
        """Train the missing pool models (cached) and load all of them, on ``ctx.dm``'s training set.

        The cache is the expert bank's (``ctx.cache_dir/experts/<key>``), keyed by the data,
        augmentation, architecture config, lr, momentum, weight decay, ``max(epochs)``, batch and
        ``seed``: a change of any of them trains a new pool, anything else reuses it.
        """
        dm = ctx.dm
        dsa = ctx.augment.enabled_dsa() if hp.augment else None
        spec = {"data": dm.identity(), "dsa": ctx.augment.model_dump() if dsa else "none"}
        train_epochs = max(hp.epochs)
        flats, members, accs, dirs = [], [], {}, []
        for a, name in enumerate(hp.archs):
            net_cfg = eval_net_cfg(ctx.net, name)
            bank = ExpertBank(Path(ctx.cache_dir) / "experts", spec, net_cfg, hp.lr, train_epochs, hp.batch,
                              momentum=hp.momentum, weight_decay=hp.weight_decay, dsa=dsa, seed=int(ctx.seed),
                              make_trainer=ctx.make_trainer, lr_milestones=tuple(hp.lr_milestones))
            t0 = time.perf_counter()
            recs = bank.ensure(hp.seeds, dm.train_images, dm.train_labels, dm.num_classes,
                               test=(dm.test_images, dm.test_labels))
            log.info("CLoM pool %s: %d models in %s (%.1fs)", name, len(recs), bank.dir, time.perf_counter() - t0)
            flats.append(FlatParams(build_net_cfg(net_cfg, dm.train_images.shape[1], dm.num_classes,
                                                  dm.image_shape[1:]).eval()))
            accs[name] = [r["test_acc"] for r in recs]
            dirs.append(bank.dir)
            for s, r in enumerate(recs):
                members += [PoolMember(a, s, e, r["trajectory"][e].clone()) for e in hp.epochs]
        return cls(flats, list(hp.archs), members, accs, dirs)

    def to(self, device) -> "ModelPool":
        for m in self.members:
            m.theta = m.theta.to(device)
        for f in self.flats:
            f.module.to(device)
        return self

    def draw(self, generator: torch.Generator) -> PoolMember:
        """One member, uniformly (the paper samples one pooled model per iteration)."""
        return self.members[int(torch.randint(len(self.members), (1,), generator=generator))]

    def logits(self, member: PoolMember, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, K)`` logits of ``member``, differentiable in ``x``."""
        return self.flats[member.arch].call(member.theta, x)

    def features(self, member: PoolMember, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, D)`` penultimate features of ``member`` (input of its last linear layer)."""
        flat = self.flats[member.arch]
        return penultimate(flat.module, lambda inp: flat.call(member.theta, inp), x)


def last_linear(net: torch.nn.Module) -> torch.nn.Linear:
    """The last :class:`torch.nn.Linear` of ``net`` (its classifier).

    Raises:
        ValueError: ``net`` has no linear layer.
    """
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no linear classifier to take penultimate features from")
    return linears[-1]


def penultimate(net: torch.nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features: the input of ``net``'s last linear layer while ``forward(x)`` runs.

    ``forward`` is ``net`` itself or a functional call of it (:meth:`FlatParams.call`). For ConvNet
    this is the flattened conv features, DM's ``net.embed`` in the reference code.

    Shapes: ``x (N, C, H, W)`` -> ``(N, D)``.
    """
    feats = []
    hook = last_linear(net).register_forward_pre_hook(lambda m, inp: feats.append(inp[0].flatten(1)))
    try:
        forward(x)
    finally:
        hook.remove()
    return feats[0]


def ce_clom(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE-CLoM: the pooled model's cross-entropy on the synthetic set (hard or soft labels).

    Shapes: ``logits (N, K)``, ``labels (N,)`` int64 or ``(N, K)`` soft -> scalar.
    """
    return label_loss(logits, labels)


def cos_clom(f_syn: torch.Tensor, y_syn: torch.Tensor, f_real: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """Cosine CLoM ``sum(M * D) / sum(D)`` with ``D = 1 - cos(f_syn_i, f_real_j)``, ``M = [y_syn_i == y_real_j]``.

    Shapes: ``f_syn (S, D)``, ``y_syn (S,)``, ``f_real (R, D)``, ``y_real (R,)`` -> scalar in ``[0, 1]``.
    """
    d = 1 - F.normalize(f_syn, dim=1) @ F.normalize(f_real, dim=1).T  # (S, R)
    m = (y_syn.view(-1, 1) == y_real.view(1, -1)).to(d.dtype)
    return (m * d).sum() / d.sum().clamp_min(1e-12)


def uniform_real_batch(x: torch.Tensor, y: torch.Tensor, n: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real images drawn uniformly with replacement (the authors' ``np.random.randint`` in
    ``CLoM.__get_images_randomly``), for the cosine term.

    Shapes: ``x (N, C, H, W)``, ``y (N,)`` -> ``(n, C, H, W)``, ``(n,)`` on ``x``'s device.
    """
    idx = torch.randint(len(y), (n,), generator=generator)
    return x[idx.to(x.device)], y[idx.to(y.device)].to(x.device)


def clom_term(hp: ClomConfig, ctx: RunContext, timings: dict, metrics: dict) -> "ClomTerm":
    """Build (train or load, :meth:`ModelPool.build`) the pool of ``hp`` and its :class:`ClomTerm`;
    records ``timings["pool_s"]``, ``metrics["clom/pool_size"]`` and each architecture's mean test
    accuracy ``metrics["clom/<arch>/test_acc_mean"]``. The one way methods add CLoM."""
    t0 = time.perf_counter()
    pool = ModelPool.build(hp, ctx)
    timings["pool_s"] = time.perf_counter() - t0
    metrics["clom/pool_size"] = len(pool)
    for name, accs in pool.test_acc.items():
        if accs and None not in accs:
            metrics[f"clom/{name}/test_acc_mean"] = sum(accs) / len(accs)
    return ClomTerm(hp, pool)


class ClomTerm:
    """``alpha * L_CLoM`` with one member drawn per call.

    Args:
        hp: the config; pool: the built pool (on the images' device).
    """

    def __init__(self, hp: ClomConfig, pool: ModelPool):
        self.hp, self.pool = hp, pool

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 real: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, PoolMember]:
        """``(alpha * loss, the member used)``.

        Shapes: ``images (N, C, H, W)``, ``labels (N,)`` (hard; ``(N, K)`` soft for ``ce``),
        ``real = (x (R, C, H, W), y (R,))`` (needed by ``cos``).

        Raises:
            ValueError: ``cos`` without ``real``, or with soft labels.
        """
        member = self.pool.draw(generator)
        if self.hp.kind == "ce":
            loss = ce_clom(self.pool.logits(member, images), labels)
        else:
            if real is None or labels.dim() != 1:
                raise ValueError("cosine CLoM needs a real batch and hard labels")
            with torch.no_grad():
                f_real = self.pool.features(member, real[0])
            loss = cos_clom(self.pool.features(member, images), labels, f_real, real[1])
        return self.hp.alpha * loss, member
