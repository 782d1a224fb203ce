"""Distribution matching (DM; Zhao & Bilen, "Dataset Condensation with Distribution Matching",
WACV 2023, arXiv 2110.04181), optionally guided by a model pool (CLoM, arXiv 2310.03295;
:mod:`lightning_dd.methods.images.clom`).

Algorithm (one iteration, :meth:`DistributionMatching.training_step`; DM Sec. 3, Eq. 4-5):

1. build a freshly, randomly initialized embedding network ``psi`` (the run's ``net``; the
   embedding is its penultimate features, the reference's ``net.embed``), frozen;
2. per class ``c``, draw ``batch_real`` real images of ``c`` and take the class's synthetic
   images; augment both with one DSA draw (one family and one parameter value per class, shared
   by all real and synthetic images of the class, as the reference's shared seed does:
   :func:`siamese_dsa`);
3. ``L = sum_c || mean psi(A(R_c)) - mean psi(A(S_c)) ||^2`` and one SGD step (momentum 0.5) on the
   synthetic pixels;
4. with ``clom.enabled``, ``+ alpha * L_CLoM`` from one pooled model, on the un-augmented synthetic
   set (the authors' DDInterpreter ``main_DM.py``); the cosine term against ``clom.real_batch``
   real images drawn uniformly from the training set.

Synthetic images start from a random real subset per class (the reference's ``init=real``);
labels are hard.

Data (``experiment=dm_cifar10``): CIFAR-10 normalized by channel mean/std, no ZCA, as the
reference's ``utils.get_dataset``. The CPU preset (``conf/scale_preset/dm_cifar10/cpu.yaml``) sets
``data.zca: true``: at 200 iterations and 2000 images per class it measured 44.62 +- 0.43 vs
41.20 +- 0.38 without (experiments/dm/README.md).

Deviations from the reference code (VICO-UoE/DatasetCondensation, ``main_DM.py``):

* All classes go through the embedding network in one forward (real under ``no_grad``, then the
  synthetic set): the same loss and gradient as the per-class loop for networks without batch
  statistics, and what the reference itself does for BatchNorm nets.
* Random choices come from a generator keyed by ``(seed, iteration)`` (the reference uses the
  clock for DSA seeds), so a resumed run repeats the same iterations.
* The loop is a Lightning fit (checkpointing every ``ckpt_every`` iterations, ``resume=true``);
  the reference's periodic evaluation is ``logger.eval_every``. ``iterations`` updates are made;
  the reference's loop runs ``Iteration + 1`` times but evaluates (and reports) the set before the
  last update, i.e. after ``Iteration`` updates, which is what ours returns.
* The channel mean/std are fitted on the training images (``conf/data/cifar10.yaml``); the
  reference uses the constants ``(0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010)``, whose std
  is about 0.8x the fitted per-pixel std, so its model-space images are ~1.2x ours in scale
  (lr_img and the DSA brightness act relative to it).
* A real batch is ``min(batch_real, smallest class)`` images of every class (the reference caps each
  class at its own size; equal on CIFAR-10).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import ClassVar

import lightning as L
import torch

from lightning_dd.augment.dsa import DSA, DSAParams
from lightning_dd.core.config import ConfigError, Fraction, PositiveFloat, PositiveInt
from lightning_dd.data.protocols import ImageData
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.images.base import ImageMethod
from lightning_dd.methods.images.clom import ClomConfig, ClomTerm, clom_term, penultimate, uniform_real_batch
from lightning_dd.nets import build_net_cfg
from lightning_dd.results import DistilledSet
from lightning_dd.training.fit import fit_steps

log = logging.getLogger(__name__)


def dm_loss(f_real: torch.Tensor, f_syn: torch.Tensor) -> torch.Tensor:
    """``sum_c || mean_b f_real[c, b] - mean_i f_syn[c, i] ||^2`` (DM Eq. 5, summed over classes).

    Shapes: ``f_real (C, B, D)``, ``f_syn (C, I, D)`` -> scalar.
    """
    return (f_real.mean(1) - f_syn.mean(1)).pow(2).sum()


def class_table(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table (C, Nmax) int64, counts (C,))``: per class, the indices of its samples, padded with 0.

    Raises:
        ValueError: a class without samples.
    """
    per = [(labels == c).nonzero().squeeze(1) for c in range(num_classes)]
    counts = torch.tensor([len(p) for p in per])
    if (counts == 0).any():
        raise ValueError(f"classes without training images: {(counts == 0).nonzero().squeeze(1).tolist()}")
    table = torch.zeros(num_classes, int(counts.max()), dtype=torch.long)
    for c, p in enumerate(per):
        table[c, : len(p)] = p
    return table, counts


def sample_per_class(table: torch.Tensor, counts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct random samples of every class (all of them, ``min(n, min count)``), vectorized.

    Shapes: ``table (C, Nmax)``, ``counts (C,)`` -> ``(C, n')`` indices, ``n' = min(n, counts.min())``.
    """
    n = min(n, int(counts.min()))
    keys = torch.rand(table.shape, generator=generator)
    keys[torch.arange(table.shape[1]).view(1, -1) >= counts.view(-1, 1)] = 2.0  # padding sorts last
    return table.gather(1, keys.argsort(1)[:, :n])


def siamese_dsa(dsa: DSA, real: torch.Tensor, syn: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment each class's real and synthetic batch with one DSA draw shared by all its images.

    Per class one family (mode ``S``) and one parameter value, applied to every real and every
    synthetic image of the class: the reference calls ``DiffAugment`` on the class's real batch and
    on its synthetic batch with the same seed, and with a seed (``param.Siamese``) each DSA
    function copies the first image's parameters to the whole batch (DSA arXiv 2102.08259, Sec. 3;
    ``utils.py`` ``rand_*``). Classes that drew the same family are augmented together.

    Shapes: ``real (C, B, ch, H, W)``, ``syn (C, I, ch, H, W)`` -> the same shapes; differentiable
    in ``syn``.
    """
    C, B = real.shape[:2]
    I = syn.shape[1]
    params = [dsa.sample(1, real.shape[-2:], generator=generator, device=real.device) for _ in range(C)]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for c, p in enumerate(params):
        groups[p.ops].append(c)
    out_r, out_s = [None] * C, [None] * C
    for ops, cs in groups.items():
        per_class = {k: torch.cat([params[c].values[k] for c in cs]) for k in params[cs[0]].values}  # (len(cs), ...)
        pr = DSAParams(ops, {k: v.repeat_interleave(B, 0) for k, v in per_class.items()})
        ps = DSAParams(ops, {k: v.repeat_interleave(I, 0) for k, v in per_class.items()})
        ar = dsa.apply(real[cs].flatten(0, 1), pr).unflatten(0, (len(cs), B))
        as_ = dsa.apply(syn[cs].flatten(0, 1), ps).unflatten(0, (len(cs), I))
        for j, c in enumerate(cs):
            out_r[c], out_s[c] = ar[j], as_[j]
    return torch.stack(out_r), torch.stack(out_s)


class DistributionMatching(L.LightningModule):
    """The DM loop; the only parameter is the synthetic set.

    Args:
        images: ``(C * ipc, ch, H, W)`` initial synthetic images, class-major.
        labels: ``(C * ipc,)`` hard labels (``c`` for block ``c``).
        train_images, train_labels: the real training set ``(N, ch, H, W)``, ``(N,)`` (not saved in
            checkpoints).
        net_cfg: the embedding network's config (built fresh every iteration).
        hp: the method (:class:`DMMethod`).
        dsa: augmentation (``None`` = none).
        clom: the optional CLoM term.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train_images: torch.Tensor,
                 train_labels: torch.Tensor, num_classes: int, net_cfg: dict, hp: "DMMethod", dsa: DSA | None,
                 clom: ClomTerm | None = None, seed: int = 0):
        super().__init__()
        self.images = torch.nn.Parameter(images.clone())
        self.register_buffer("labels", labels.clone())
        self.num_classes, self.ipc = num_classes, images.shape[0] // num_classes
        self.real_x, self.real_y = train_images, train_labels
        self.table, self.counts = class_table(train_labels, num_classes)
        self.net_cfg, self.hp, self.dsa, self.clom, self.seed = net_cfg, hp, dsa, clom, seed

    def on_fit_start(self):
        self.real_x = self.real_x.to(self.device)
        if self.clom is not None:
            self.clom.pool.to(self.device)

    def configure_optimizers(self):
        return torch.optim.SGD([self.images], lr=self.hp.lr_img, momentum=self.hp.momentum)

    def embedding_net(self, iteration: int) -> torch.nn.Module:
        """A freshly initialized, frozen network (seeded by ``(seed, iteration)``), train mode as the reference."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + iteration)
            net = build_net_cfg(self.net_cfg, self.images.shape[1], self.num_classes, self.images.shape[2:])
        return net.to(self.device).train().requires_grad_(False)

    def dm_step_loss(self, iteration: int) -> tuple[torch.Tensor, dict]:
        """The iteration's loss (DM + optional CLoM) and the logged values."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        net = self.embedding_net(iteration)
        idx = sample_per_class(self.table, self.counts, self.hp.batch_real, g).to(self.device)
        real = self.real_x[idx]  # (C, B, ch, H, W)
        syn = self.images.view(self.num_classes, self.ipc, *self.images.shape[1:])
        if self.dsa is not None and self.dsa.enabled:
            real, syn_aug = siamese_dsa(self.dsa, real, syn, g)
        else:
            syn_aug = syn
        C, B = real.shape[:2]
        with torch.no_grad():
            f_real = penultimate(net, net, real.flatten(0, 1)).unflatten(0, (C, B))
        f_syn = penultimate(net, net, syn_aug.flatten(0, 1)).unflatten(0, (C, self.ipc))
        loss_dm = dm_loss(f_real, f_syn)
        logs = {"distill/loss_dm": loss_dm.detach()}
        loss = loss_dm
        if self.clom is not None:
            x = syn_aug.flatten(0, 1) if self.clom.hp.on_augmented else self.images
            real_pair = (uniform_real_batch(self.real_x, self.real_y, self.clom.hp.real_batch, g)
                         if self.clom.hp.kind == "cos" else None)
            term, member = self.clom(x, self.labels, g, real=real_pair)
            loss = loss + term
            logs.update({"distill/loss_clom": term.detach(), "distill/clom_epoch": float(member.epoch)})
        return loss, logs

    def training_step(self, batch, batch_idx):
        it = self.global_step
        t0 = time.perf_counter()
        loss, logs = self.dm_step_loss(it)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"iteration {it}: DM loss is {loss.item()}; lower method.lr_img")
        logs["distill/iter_seconds"] = time.perf_counter() - t0
        self.log_dict({"distill/loss": loss.detach(), **logs})
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def current_set(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        return self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(), None


class DMMethod(ImageMethod):
    """Distribution matching as a method (``conf/method/dm.yaml``); see the module docstring.

    Fields (defaults in ``conf/method/dm.yaml``: the reference's, CIFAR-10 IPC 10): ``iterations``,
    ``lr_img``, ``momentum`` (SGD on the pixels), ``batch_real`` real images per class and iteration,
    ``ckpt_every``; ``clom``: :class:`lightning_dd.methods.images.clom.ClomConfig`.

    Stages: ``pool`` (train and cache the CLoM pool only), ``distill`` (no evaluation), ``all``.
    """

    stages: ClassVar[tuple[str, ...]] = ("all", "pool", "distill")
    iterations: PositiveInt
    lr_img: PositiveFloat
    momentum: Fraction
    batch_real: PositiveInt
    ckpt_every: PositiveInt
    clom: ClomConfig

    def check(self, ctx: RunContext) -> None:
        if self.clom.enabled:
            self.clom.check_archs(ctx.net)
        elif ctx.stage == "pool":
            raise ConfigError("stage=pool needs method.clom.enabled=true")

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        dm, seed = ctx.dm, ctx.seed
        dsa = ctx.augment.enabled_dsa()
        timings, metrics = {}, {}

        clom = None
        if self.clom.enabled:
            clom = clom_term(self.clom, ctx, timings, metrics)
            if ctx.stage == "pool":
                return MethodOutput(timings=timings, metrics=metrics)

        x, y = dm.random_subset(self.ipc, seed)  # class-major, the reference's init=real
        init = DistilledSet(x.clone(), y.clone(), None, dm.classes, dm.preprocessing.state(),
                            method=f"{self.name}-init", ipc=self.ipc)

        t0 = time.perf_counter()
        module = DistributionMatching(x, y, dm.train_images, dm.train_labels, dm.num_classes, dict(ctx.net), self, dsa,
                                      clom, seed=seed)
        ckpt_dir = ctx.out_dir / "checkpoints"
        trainer = fit_steps(module, ctx.make_trainer, "distill", self.iterations, ckpt_dir, self.ckpt_every,
                            ctx.resume_from(ckpt_dir / "last.ckpt", "distillation"), ctx.loggers,
                            self.callbacks(ctx), log_every_n_steps=10)
        timings["distill_s"] = time.perf_counter() - t0
        metrics["distill/iterations"] = trainer.global_step
        images, labels, _ = module.current_set()
        result = DistilledSet(images, labels, None, dm.classes, dm.preprocessing.state(), method=self.name,
                              ipc=self.ipc, meta={"iterations": trainer.global_step,
                                                  "clom": self.clom.model_dump() if self.clom.enabled else None})
        return MethodOutput(result=result, init=init, timings=timings, metrics=metrics)
