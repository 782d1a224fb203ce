"""Expert trajectories for trajectory matching (MTT, arXiv 2203.11932, Sec. 3.1).

An expert is a network trained on the real training set with plain SGD (``lr_teacher``, no
momentum, no weight decay, DSA on every batch, as in the reference buffer code), whose flat
parameters are recorded before training and after every epoch: a trajectory ``(E+1, P)``.

Experts are cached on disk, one file per expert, under a directory keyed by everything that
determines them (data set and preprocessing, network, lr, epochs, batch size, augmentation,
seed); a changed value gives a new directory, and asking for more experts reuses the ones
already trained. Files are written atomically with a checksum (:func:`lightning_dd.io.save_cache`);
a truncated or corrupted expert file is reported, deleted and retrained, never used
(:func:`lightning_dd.io.load_cache`). ``python train.py stage=experts ...`` trains them alone.

An expert in training is checkpointed after every epoch (``<bank>/partial/expert_XXX/last.ckpt``:
weights, optimizer, trajectory so far, global RNG states, loader shuffle position); a killed run,
started again with the same settings, continues that expert at its last finished epoch and ends
with the trajectory an uninterrupted run gives (bitwise on the same machine).

Under DDP (``trainer.devices=2 trainer.strategy=ddp``) an expert is one DDP fit: each process trains
on its part of every batch (:func:`lightning_dd.data.batches.shard_batch`; the parts together are
the one-process batch), the gradients are averaged, every process records the same trajectory,
and rank 0 alone writes it to the cache. The number of processes is not part of the cache key.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from lightning_dd.augment.dsa import DSA
from lightning_dd.data.batches import batch_loader
from lightning_dd.core.config import PositiveFloat, PositiveInt, Typed
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.io import atomic_write_text, cache_key, load_cache, safe_fit_kwargs, save_cache
from lightning_dd.losses import label_loss
from lightning_dd.methods.base import RunContext
from lightning_dd.nets import FlatParams, build_net_cfg, maybe_compile
from lightning_dd.quiet import quiet_lightning
from lightning_dd.training.metrics import accuracy

log = logging.getLogger(__name__)


class ExpertModule(L.LightningModule):
    """One expert: SGD on real batches with DSA; records its flat parameters every epoch."""

    def __init__(self, net: torch.nn.Module, lr: float, momentum: float, weight_decay: float, dsa: DSA | None,
                 compile: bool = False, lr_milestones: tuple[int, ...] = ()):
        super().__init__()
        self.lr, self.momentum, self.weight_decay, self.dsa = lr, momentum, weight_decay, dsa
        self.lr_milestones = tuple(lr_milestones)
        self.flat = FlatParams(net)  # the uncompiled module: same parameters
        self.net = maybe_compile(net, compile)
        self.trajectory: list[torch.Tensor] = []

    def on_train_start(self):
        if not self.trajectory:  # a resumed fit has the epochs done (on_load_checkpoint)
            self.trajectory = [self.flat.flatten().cpu()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["expert_trajectory"] = torch.stack(self.trajectory)  # (epochs done + 1, P)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.trajectory = list(checkpoint["expert_trajectory"].unbind(0))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.dsa is not None and self.dsa.enabled:
            x = self.dsa(x, self.dsa.sample(x.shape[0], x.shape[-2:], device=x.device))
        loss = label_loss(self.net(x), y)
        self.log("expert/train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self):
        self.trajectory.append(self.flat.flatten().cpu())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        if not self.lr_milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.lr_milestones), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class EpochResume(L.Callback):
    """Makes a fit over a :class:`lightning_dd.data.batches.TensorBatches` loader, checkpointed at
    epoch ends, resume exactly: every checkpoint stores the global RNG states (CPU, and CUDA when
    initialized; DSA and kornia draw from them) and the loader's shuffle pass count; a resumed fit
    gets both back, so its next epoch draws and shuffles what the uninterrupted fit's did. Lightning
    restores weights, optimizer, scheduler and loop counters itself, but neither of these.

    Args:
        batches: the loader's dataset (``batch_loader(...).dataset``).
    """

    def __init__(self, batches):
        self.batches = batches

    def state_dict(self) -> dict:
        st = {"passes": int(self.batches._passes), "cpu_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda_rng"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, state: dict) -> None:
        # restored before the fit loop first iterates the loader, which draws the DataLoader's base
        # seed from the global RNG, as the uninterrupted fit did right after this checkpoint
        self.batches._passes = int(state["passes"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def epoch_checkpoints(ckpt_dir: Path, batches, what: str) -> tuple[list, str | None]:
    """The callbacks of an epoch-checkpointed, exactly resumable fit (:class:`EpochResume` and
    a ``ModelCheckpoint`` keeping one file, ``ckpt_dir/last.ckpt``, rewritten atomically after
    every epoch) and the checkpoint to resume from
    (``ckpt_dir/last.ckpt`` when it is a readable checkpoint; an unreadable one is reported and
    deleted, and the fit starts over). ``what`` names the fit in the log."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = Path(ckpt_dir) / "last.ckpt"
    resume = None
    if ckpt.is_file():
        try:
            epoch = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["epoch"])
            resume = str(ckpt)
            log.info("%s: resuming from %s (%d epochs done)", what, ckpt, epoch + 1)
        except Exception as e:  # truncated / not a checkpoint: start over
            log.warning("%s: checkpoint %s is unreadable (%s: %s); starting over", what, ckpt, type(e).__name__, e)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    cbs = [EpochResume(batches), ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", save_top_k=1,
                                                 every_n_epochs=1, enable_version_counter=False)]
    return cbs, resume


class ExpertBank:
    """A cached set of expert trajectories.

    Args:
        root: cache root (``paths.cache_dir/experts``).
        spec: everything that determines the trajectories (becomes the cache key and is saved
            beside them as ``spec.json``).
        net_cfg: ``{"name": ..., **kwargs}`` for :func:`build_net`.
        lr_teacher, epochs, batch_size, momentum, weight_decay: expert SGD settings (momentum and
            weight decay 0: MTT's plain SGD; the CLoM pool sets the authors' values).
        dsa: augmentation of real batches (``None`` = none).
        seed: expert ``i`` uses seed ``seed + i``.
        make_trainer: the run's Trainer factory (its ``compile`` flag compiles the network: speed
            only, not part of the key; its precision is part of the key when not ``32-true``).
    """

    def __init__(self, root: str | Path, spec: dict, net_cfg: dict, lr_teacher: float, epochs: int, batch_size: int,
                 *, make_trainer: TrainerFactory, momentum: float = 0.0, weight_decay: float = 0.0,
                 dsa: DSA | None = None, seed: int = 0, lr_milestones: tuple[int, ...] = ()):
        if str(make_trainer.precision) not in ("32-true", "32"):
            spec = {**spec, "precision": str(make_trainer.precision)}
        self.spec = {**spec, "net": dict(net_cfg), "lr_teacher": lr_teacher, "epochs": epochs,
                     "batch_size": batch_size, "momentum": momentum, "weight_decay": weight_decay, "seed": seed}
        if lr_milestones:  # only when set: the keys of every earlier cache entry stay valid
            self.spec["lr_milestones"] = list(lr_milestones)
        self.lr_milestones = tuple(lr_milestones)
        self.dir = Path(root) / cache_key(self.spec)
        self.net_cfg, self.lr, self.epochs, self.batch_size = dict(net_cfg), lr_teacher, epochs, batch_size
        self.momentum, self.weight_decay, self.dsa, self.seed = momentum, weight_decay, dsa, seed
        self.make_trainer = make_trainer

    def path(self, i: int) -> Path:
        return self.dir / f"expert_{i:03d}.pt"

    def load(self, i: int) -> dict | None:
        """Expert ``i`` from the cache (``weights_only=True``, checksum verified), or ``None`` when
        it is missing or was unusable (truncated, corrupted, not a ``(E+1, P)`` trajectory of
        ``epochs + 1`` rows: reported and deleted, so it is retrained).

        Raises:
            lightning_dd.io.UnsafeFileError: the file needs arbitrary unpickling (refused)."""
        def check(rec):
            t = rec["trajectory"]
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != self.epochs + 1:
                raise ValueError(f"trajectory of shape {tuple(getattr(t, 'shape', ()))}, expected "
                                 f"({self.epochs + 1}, P)")

        return load_cache(self.path(i), "cached expert trajectory", check)

    def ensure(self, n: int, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               test: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
        """Train the missing experts among ``0..n-1`` on ``(images, labels)``; return all ``n``.

        Each returned dict has ``trajectory (E+1, P)``, ``test_acc`` (or None) and ``seconds``.
        """
        quiet_lightning()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.spec, indent=1, sort_keys=True, default=str), self.dir / "spec.json")
        out = []
        for i in range(n):
            rec = self.load(i)
            if rec is not None:
                out.append(rec)
                continue
            t0 = time.perf_counter()
            L.seed_everything(self.seed + i, verbose=False)
            net = build_net_cfg(self.net_cfg, images.shape[1], num_classes, images.shape[2:])
            module = ExpertModule(net, self.lr, self.momentum, self.weight_decay, self.dsa, self.make_trainer.compile,
                                  self.lr_milestones)
            loader = batch_loader(images, labels, batch_size=self.batch_size, epochs=1, seed=self.seed + i)
            part = self.dir / "partial" / f"expert_{i:03d}"
            callbacks, resume = epoch_checkpoints(part, loader.dataset, f"expert {i}")
            trainer = self.make_trainer("experts", max_epochs=self.epochs, callbacks=callbacks,
                                        enable_checkpointing=True)
            trainer.fit(module, loader, ckpt_path=resume, **safe_fit_kwargs())
            acc = accuracy(net, *test, batch_size=1000) if test is not None else None
            rec = {"trajectory": torch.stack(module.trajectory), "test_acc": acc,
                   "seconds": time.perf_counter() - t0}
            if trainer.is_global_zero:  # under DDP every rank holds the same trajectory: rank 0 writes it
                save_cache(rec, self.path(i))
                shutil.rmtree(part, ignore_errors=True)  # after the expert's file: a kill between keeps one
                log.info("expert %d written to %s", i, self.path(i))
            log.info("expert %d: %d epochs in %.1fs, test acc %s", i, self.epochs, rec["seconds"], acc)
            out.append(rec)
        return out


class ExpertSettings(Typed):
    """The expert-trajectory fields a method config shares (MTT Sec. 3.1; ``conf/method/datm.yaml``)."""

    num_experts: PositiveInt
    expert_train_epochs: PositiveInt
    expert_batch: PositiveInt
    lr_teacher: PositiveFloat


def expert_bank(ctx: RunContext, hp: ExpertSettings) -> ExpertBank:
    """The run's expert bank: ``hp``'s expert settings, the run's ``net``, ``augment`` (DSA),
    ``seed`` and the DataModule's identity as the cache key (under ``ctx.cache_dir/experts``);
    shared by trajectory matching and the coreset selectors' feature network, so both reuse the
    same cached trajectories."""
    spec = {"data": ctx.dm.identity(), "dsa": ctx.augment.model_dump()}
    return ExpertBank(Path(ctx.cache_dir) / "experts", spec, dict(ctx.net), hp.lr_teacher, hp.expert_train_epochs,
                      hp.expert_batch, dsa=ctx.augment.enabled_dsa(), seed=int(ctx.seed),
                      make_trainer=ctx.make_trainer)
