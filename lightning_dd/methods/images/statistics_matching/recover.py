"""Recover (SRe2L Sec. 3.2, Eq. 5-7; CDA; G-VBSM): optimize batches of synthetic images from noise
so that frozen BatchNorm teachers classify them as their class while their batch statistics match
the teachers' running statistics. Every batch is one Lightning fit of :class:`RecoverModule`
(under DDP: one fit per round of one batch per rank, :func:`recover_batches`), checkpointed and
resumable; finished batches and checkpoints record the settings that determine them
(:func:`recover_settings`) and a resume refuses others (:func:`check_settings`)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.batches import StepLoader
from lightning_dd.io import atomic_save, check_checkpoint, load_dict, safe_fit_kwargs
from lightning_dd.methods.images.statistics_matching.config import RecoverConfig
from lightning_dd.methods.images.statistics_matching.crops import crop_scale_min, jitter_crop_flip
from lightning_dd.methods.images.statistics_matching.statistics import (Backbone, backbone_weights, bn_loss_of,
                                                                        bn_loss_views, eigenvalue_loss)
from lightning_dd.quiet import quiet_lightning
from lightning_dd.training.devices import gather_objects
from lightning_dd.training.schedules import warmup_cosine

log = logging.getLogger(__name__)


class RecoverModule(L.LightningModule):
    """Recovers one batch of synthetic images (SRe2L Sec. 3.2; CDA; G-VBSM) -- or, under DDP, one
    batch per rank (a *round*, see below): the only trainable state is the images (so checkpoints
    hold just the images and Adam's moments). One optimizer step per (dummy) batch: loss ``CE +
    r_bn R_BN + r_conv R_conv + r_logit R_logit`` (SRe2L Eq. 7 plus G-VBSM's terms) on the step's
    augmented view, Adam (betas 0.5, 0.9), cosine lr, pixels clipped to ``[lo, hi]`` after every step.

    Args:
        images: ``(B, C, H, W)`` initial images in model space, or a list of them (one per batch of
            the round; ``B`` may differ). labels: ``(B,)`` int64 (or a list, one per batch).
        backbones: :class:`~.statistics.Backbone` list (not saved in checkpoints).
        hp: the ``recover`` settings.
        lo, hi: ``(C,)`` model-space bounds of valid pixels (clipping).
        seed, batch_index: every step's randomness of a batch is keyed by ``(seed, batch_index,
            step)``, so a resumed run draws what an uninterrupted one would, and a batch gets the
            same draws whichever rank recovers it (``batch_index``: a list with a list of images).
        settings: what determines this batch (:func:`recover_settings`; ``{"round": [...]}``, one
            per batch, for a round), saved in every checkpoint with the per-step history of every
            batch so far (a resumed fit checks the one and continues the other).

    Several processes (``trainer.strategy=ddp``, ``W`` ranks): the module holds a round of up to
    ``W`` batches, batch ``s`` in parameter ``images`` (``s = 0``) or ``images_<s>``, and rank
    ``r`` computes batch ``r``'s loss only (a rank past the round's last batch computes none). The
    loss it backpropagates is ``W x`` its batch's loss plus ``0 x`` the other batches' pixels
    (every parameter gets a gradient, as DDP's reducer requires), so DDP's gradient average (each
    rank's gradient times ``1/W``, summed) hands every rank every batch's own gradient -- exactly
    for ``W`` a power of two, to float rounding otherwise -- and every rank takes the same Adam
    step on every batch: at the end of the fit each rank holds the whole round, and each batch is
    what a one-process fit of that batch gives. The per-step history (and the logged losses) of
    every batch reach every rank through one small ``all_gather`` per step.
    """

    def __init__(self, images, labels, backbones: list[Backbone], hp: RecoverConfig,
                 lo: torch.Tensor, hi: torch.Tensor, seed: int = 0, batch_index=0,
                 settings: dict | None = None):
        super().__init__()
        many = isinstance(images, (list, tuple))
        images, labels = (list(images), list(labels)) if many else ([images], [labels])
        indices = [int(b) for b in batch_index] if many else [int(batch_index)]
        if not (len(images) == len(labels) == len(indices) >= 1):
            raise ValueError(f"RecoverModule: {len(images)} image batches, {len(labels)} label batches and "
                             f"{len(indices)} batch indices (one each, at least one)")
        self.slots, self.batch_indices = len(images), indices
        for s, (x, y) in enumerate(zip(images, labels)):
            self.register_parameter(self._name("images", s), nn.Parameter(x.clone()))
            self.register_buffer(self._name("labels", s), y.clone(), persistent=False)
        self.register_buffer("lo", lo.view(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("hi", hi.view(1, -1, 1, 1).clone(), persistent=False)
        self.backbones, self.hp, self.seed, self.batch_index = backbones, hp, seed, indices[0]
        self.histories: list[list[dict]] = [[] for _ in images]
        self.settings = settings
        self.slot_weights = [backbone_weights(backbones, x, hp) for x in images]  # from each batch's own init
        self.bn_weights, self.conv_weights = self.slot_weights[0]
        for b in backbones:  # G-VBSM's moving averages (stat_momentum) start afresh with every batch
            b.reset_ema()

    @staticmethod
    def _name(kind: str, slot: int) -> str:
        return kind if slot == 0 else f"{kind}_{slot}"

    def slot_images(self, slot: int = 0) -> nn.Parameter:
        """The ``(B_s, C, H, W)`` images of the round's batch ``slot``."""
        return getattr(self, self._name("images", slot))

    def slot_labels(self, slot: int = 0) -> torch.Tensor:
        return getattr(self, self._name("labels", slot))

    @property
    def history(self) -> list[dict]:
        """The per-step history of the (first) batch."""
        return self.histories[0]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recover_settings"] = self.settings
        if self.hp.stat_momentum > 0:  # this process's moving averages (one batch per process)
            checkpoint["recover_stat_ema"] = [b.ema_state() for b in self.backbones]
        checkpoint["recover_history"] = list(self.histories[0])
        if self.slots > 1:
            checkpoint["recover_histories"] = [list(h) for h in self.histories]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for b, state in zip(self.backbones, checkpoint.get("recover_stat_ema", [])):
            b.reset_ema(state)
        if "recover_histories" in checkpoint:
            self.histories = [list(h) for h in checkpoint["recover_histories"]]
        else:
            self.histories[0] = list(checkpoint.get("recover_history", []))

    def on_fit_start(self):
        for b in self.backbones:
            b.to(self.device)

    def generator(self, step: int, slot: int = 0) -> torch.Generator:
        """The CPU generator of ``step`` of batch ``slot``: seeded ``seed * 1_000_003 + batch_index *
        10_007 + step``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch_indices[slot] * 10_007 + step)

    def augment(self, step: int, slot: int = 0) -> tuple[torch.Tensor, float, list[int]]:
        """The step's augmented view ``(B, C, H, W)`` of batch ``slot``'s images
        (:func:`~.crops.jitter_crop_flip` with the crop scale ``[crop_scale_min(step),
        crop_scale[1]]``), that lower bound, and the sorted indices of the backbones the step uses
        (``backbones_per_iter`` of them, drawn from the same generator after the view; all of them,
        without a draw, when there are no more)."""
        hp, x = self.hp, self.slot_images(slot)
        g = self.generator(step, slot)
        smin = crop_scale_min(step, hp.iterations, hp.crop_schedule, hp.crop_scale[1], hp.crop_scale[0],
                              hp.milestone)
        x = jitter_crop_flip(x, g, jitter=hp.jitter, scale=(smin, hp.crop_scale[1]), flip=hp.flip,
                             per_image=hp.crop_per_image, pad=hp.crop_pad)
        n = len(self.backbones)
        k = min(hp.backbones_per_iter, n)
        if k == n:
            chosen = list(range(n))
        elif hp.backbone_sampling == "cycle":  # G-VBSM: model_teacher[counter % n], counter += 1 per step
            chosen = sorted({(step * k + j) % n for j in range(k)})
        else:
            chosen = sorted(torch.randperm(n, generator=g)[:k].tolist())
        return x, smin, chosen

    def conv_keep(self, step: int, slot: int = 0) -> list[list[bool] | None]:
        """Per backbone, which conv layers enter the conv loss at ``step`` (G-VBSM's ``--drop-rate``:
        each layer dropped with probability ``conv_drop``, independently per step); ``None`` for all
        (no drop, or no conv statistics). Drawn from its own stream, seeded from the step's
        generator seed + 1 (the views and backbone choices do not depend on it)."""
        p = self.hp.conv_drop
        if p <= 0:
            return [None] * len(self.backbones)
        g = torch.Generator().manual_seed(self.generator(step, slot).initial_seed() + 1)
        return [None if b.conv is None else (torch.rand(len(b.conv.layers), generator=g) >= p).tolist()
                for b in self.backbones]

    def losses(self, x: torch.Tensor, chosen: list[int], slot: int = 0,
               conv_keep: list[list[bool] | None] | None = None) -> dict[str, torch.Tensor]:
        """CE, BN, conv and logit losses (scalar tensors; zero where a term is off) of ``x``
        ``(B, C, H, W)`` with batch ``slot``'s labels and backbone weights, each the mean over the
        ``chosen`` backbones (G-VBSM sums; a constant factor Adam does not see, see the package doc),
        and G-VBSM's eigenvalue term of ``x`` itself (``nuc``, :func:`~.statistics.eigenvalue_loss`).
        ``conv_keep``: per backbone the conv layers that count this step (:meth:`conv_keep`)."""
        hp = self.hp
        labels = self.slot_labels(slot)
        bn_w, conv_w = self.slot_weights[slot]
        out = {"ce": 0.0, "bn": 0.0, "conv": 0.0, "logit": 0.0, "nuc": 0.0}
        for i in chosen:
            b = self.backbones[i]
            logits = b.net(x)
            out["ce"] = out["ce"] + F.cross_entropy(logits, labels)
            bn, conv = b.stat_losses(hp.first_bn_multiplier, hp.stat_momentum, conv_keep[i] if conv_keep else None)
            out["bn"] = out["bn"] + bn_w[i] * bn
            if conv is not None and hp.r_conv > 0:
                out["conv"] = out["conv"] + conv_w[i] * conv
            if b.class_logits is not None and hp.r_logit > 0:
                out["logit"] = out["logit"] + F.mse_loss(logits, b.class_logits[labels])
        zero = torch.zeros((), device=x.device)
        out = {k: (v / len(chosen) if torch.is_tensor(v) else zero) for k, v in out.items()}
        if hp.r_nuc > 0:
            out["nuc"] = eigenvalue_loss(x, labels, hp.nuc_tau)
        return out

    def total_loss(self, ls: dict[str, torch.Tensor]) -> torch.Tensor:
        """The recovery objective of one step from :meth:`losses`: ``CE + r_bn R_BN + r_conv R_conv +
        r_logit R_logit + r_nuc R_nuc`` (SRe2L Eq. 7; G-VBSM's ``loss_ce + nuc_norm * nuc + r_loss *
        loss_r_feature`` when ``r_conv = r_bn``)."""
        hp = self.hp
        return ls["ce"] + hp.r_bn * ls["bn"] + hp.r_conv * ls["conv"] + hp.r_logit * ls["logit"] + hp.r_nuc * ls["nuc"]

    def _record(self, slot: int, step: int, vals: dict, smin: float, chosen: list[int]) -> None:
        """Append batch ``slot``'s step to its history and log it (every 10th and the last step) at
        the run-wide step ``batch_index * iterations + step``: every round is its own fit (whose
        steps restart at 0), and a resumed run's logs replace only what they log again."""
        hp, b = self.hp, self.batch_indices[slot]
        if self.trainer.loggers and ((step + 1) % 10 == 0 or step + 1 == hp.iterations):
            row = {"recover/loss": vals["loss"], "recover/loss_ce": vals["ce"], "recover/loss_bn": vals["bn"],
                   "recover/crop_scale_min": smin, "recover/batch": float(b)}
            if hp.r_conv > 0:
                row["recover/loss_conv"] = vals["conv"]
            if hp.r_logit > 0:
                row["recover/loss_logit"] = vals["logit"]
            if hp.r_nuc > 0:
                row["recover/loss_nuc"] = vals["nuc"]
            for lg in self.trainer.loggers:
                lg.log_metrics(row, step=b * hp.iterations + step)
        self.histories[slot].append({"batch": b, "step": step, "loss_bn": vals["bn"], "crop_scale_min": smin,
                                     "backbones": chosen})

    def local_slot(self) -> int | None:
        """The batch of the round this process computes: its rank's (``None`` past the round's end).

        Raises:
            RuntimeError: a round of more batches than processes."""
        world = self.trainer.world_size
        if world == 1:
            return 0
        if self.slots > world:
            raise RuntimeError(f"a round of {self.slots} batches under {world} processes (one batch per rank)")
        return self.global_rank if self.global_rank < self.slots else None

    def training_step(self, batch, batch_idx):
        step, hp = self.global_step, self.hp
        slot, world = self.local_slot(), self.trainer.world_size
        keys = ("loss", "ce", "bn", "conv", "logit", "nuc")
        k = min(hp.backbones_per_iter, len(self.backbones))
        loss, row = None, torch.zeros(2 + len(keys) + k, dtype=torch.float64, device=self.device)
        if slot is not None:
            x, smin, chosen = self.augment(step, slot)
            ls = self.losses(x, chosen, slot, self.conv_keep(step, slot))
            loss = self.total_loss(ls)
            vals = {"loss": loss.detach(), **{n: ls[n].detach() for n in keys[1:]}}
            if world == 1:
                self._record(slot, step, {n: float(v) for n, v in vals.items()}, smin, chosen)
                return loss
            row = torch.tensor([1.0, smin, *(float(vals[n]) for n in keys), *chosen], dtype=torch.float64,
                               device=self.device)
        rows = self.all_gather(row)  # (W, ...): every batch's step on every rank
        for s in range(min(world, self.slots)):
            r = rows[s].tolist()
            self._record(s, step, dict(zip(keys, r[2:2 + len(keys)])), r[1], [int(i) for i in r[2 + len(keys):]])
        others = [self.slot_images(s) for s in range(self.slots) if s != slot]
        touch = sum(p.sum() for p in others) * 0.0  # every parameter in the graph (DDP's reducer)
        return touch if loss is None else loss * world + touch

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # keep pixels valid (SRe2L's clip), before any checkpoint of this step
            for s in range(self.slots):
                x = self.slot_images(s)
                x.copy_(torch.maximum(torch.minimum(x, self.hi), self.lo))

    def configure_optimizers(self):
        hp = self.hp
        opt = torch.optim.Adam([self.slot_images(s) for s in range(self.slots)], lr=hp.lr, betas=(0.5, 0.9),
                               eps=1e-8)
        sched = warmup_cosine(opt, hp.iterations)  # SRe2L's lr_cosine_policy, per step
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def recover_settings(hp: RecoverConfig, seed: int, batch_index: int, images: torch.Tensor, labels: torch.Tensor,
                     lo: torch.Tensor, hi: torch.Tensor, extra: dict | None = None) -> dict:
    """Everything that determines a recovered batch, as a plain dict: the ``recover`` settings
    (:meth:`~.config.RecoverConfig.identity`, all but ``ckpt_every``), the seed and batch index, the
    labels ``(B,)``, a hash of the initial images ``(B, C, H, W)``, the ``(C,)`` pixel bounds, and
    ``extra`` (the caller's data and teacher identity). Stored in every batch file and checkpoint,
    so that ``resume=true`` never reuses a batch of other settings."""
    x = images.detach().float().cpu().contiguous()
    return {"recover": hp.identity(), "seed": int(seed),
            "batch_index": int(batch_index), "labels": [int(v) for v in labels.tolist()],
            "init_images": hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16] + f"/{tuple(x.shape)}",
            "bounds": [lo.tolist(), hi.tolist()], **(extra or {})}


def check_settings(stored: dict | None, settings: dict, path: str | Path) -> None:
    """Refuse to resume from ``path`` (a batch file or checkpoint) recovered with other settings.

    Raises:
        ValueError: the stored settings differ from ``settings`` (or were never recorded); the
            message names the file and the differing keys.
    """
    if stored == settings:
        return
    if not isinstance(stored, dict):
        what = "it records no recovery settings (written before they were recorded)"
    else:
        diffs = []
        for k in sorted(set(stored) | set(settings)):
            a, b = stored.get(k), settings.get(k)
            if k == "recover" and isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"recover.{kk}: {a.get(kk)!r} there, {b.get(kk)!r} now" for kk in sorted(set(a) | set(b))
                          if a.get(kk) != b.get(kk)]
            elif a != b:
                diffs.append(f"{k}: {str(a)[:80]} there, {str(b)[:80]} now")
        what = "it was recovered with other settings (" + "; ".join(diffs) + ")"
    raise ValueError(f"cannot resume from {path}: {what}. Run in a new output directory, or with resume=false "
                     f"to recompute every batch.")


def _recover_trainer(trainer: TrainerFactory, hp: RecoverConfig, ckpt_dir: Path | None, loggers=None,
                     callbacks=()) -> L.Trainer:
    """The Trainer of one recovery fit (``trainer("recover", ...)``, ``hp.iterations`` steps),
    checkpointing to ``ckpt_dir`` every ``hp.ckpt_every`` steps (``last.ckpt``) when given."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cbs = list(callbacks)
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="recover-{step}", every_n_train_steps=hp.ckpt_every,
                                   save_last=True, save_top_k=1))
    return trainer("recover", max_steps=hp.iterations, max_epochs=1, logger=loggers if loggers else False,
                   callbacks=cbs, log_every_n_steps=10, enable_checkpointing=ckpt_dir is not None)


def _resume_path(ckpt_dir: Path | None, resume: bool, settings: list[dict], indices: list[int]) -> str | None:
    """``ckpt_dir/last.ckpt`` when ``resume`` and it holds this round's batches ``indices``, after
    :func:`check_settings` of each batch's ``settings``; ``None`` when there is none, or when it
    holds another round (written under another number of processes: the round starts afresh, a
    warning says so)."""
    if not (resume and ckpt_dir is not None and (Path(ckpt_dir) / "last.ckpt").is_file()):
        return None
    path = str(Path(ckpt_dir) / "last.ckpt")
    stored = check_checkpoint(path, "recovery checkpoint").get("recover_settings")  # weights_only
    per_batch = stored.get("round", [stored]) if isinstance(stored, dict) else [stored]
    held = [d.get("batch_index") if isinstance(d, dict) else None for d in per_batch]
    if isinstance(stored, dict) and held != indices:
        log.warning("recover: %s holds batches %s (recovered under another number of processes), this round is "
                    "%s: recovering it from the start", path, held, indices)
        return None
    for st, se in zip(per_batch, settings):
        check_settings(st, se, path)
    log.info("recover %s: resuming from %s", f"batch {indices[0]}" if len(indices) == 1 else f"batches {indices}", path)
    return path


def _fit_round(fit: L.Trainer, images: list[torch.Tensor], labels: list[torch.Tensor], indices: list[int],
               backbones: list[Backbone], hp: RecoverConfig, lo: torch.Tensor, hi: torch.Tensor, *, seed: int,
               settings: list[dict], ckpt_dir: Path | None, resume: bool) -> tuple[list[torch.Tensor], list[list]]:
    """One fit of :class:`RecoverModule` on a round of batches (one per process; see there) with
    the Trainer ``fit``; returns every batch's recovered images (CPU) and per-step history."""
    module = RecoverModule(images, labels, backbones, hp, lo, hi, seed=seed, batch_index=indices,
                           settings=settings[0] if len(settings) == 1 else {"round": settings})
    ckpt_path = _resume_path(ckpt_dir, resume, settings, indices)
    fit.fit(module, StepLoader(hp.iterations, lambda: module.global_step), ckpt_path=ckpt_path, **safe_fit_kwargs())
    return [module.slot_images(s).detach().cpu() for s in range(len(images))], module.histories


def recover_batch(images: torch.Tensor, labels: torch.Tensor, backbones: list[Backbone], hp: RecoverConfig,
                  lo: torch.Tensor, hi: torch.Tensor, *, seed: int, batch_index: int, ckpt_dir: Path | None,
                  trainer: TrainerFactory | None = None, resume: bool = False, loggers=None, callbacks=(),
                  extra_settings: dict | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Recover one batch (a Lightning fit of :class:`RecoverModule` for ``hp.iterations`` steps,
    its Trainer from ``trainer("recover", ...)``, ``TrainerFactory()`` when ``None``).

    ``ckpt_dir``: checkpoints every ``hp.ckpt_every`` steps (``last.ckpt``), each with the batch's
    :func:`recover_settings` (``extra_settings`` added) and history so far; with ``resume`` and a
    ``last.ckpt`` there, the fit continues from it (same result as an uninterrupted fit).

    Shapes:
        images: ``(B, C, H, W)`` initial images; labels: ``(B,)``; lo, hi: ``(C,)``.
        Returns the recovered ``(B, C, H, W)`` images (CPU) and the per-step history of the whole
        fit (restored from the checkpoint when resumed).

    Raises:
        ValueError: ``resume`` and a ``last.ckpt`` of other settings (:func:`check_settings`), or a
            truncated one. lightning_dd.io.UnsafeFileError: a ``last.ckpt`` that needs arbitrary
            unpickling (refused before Lightning reads it; both reads use ``weights_only=True``).
    """
    quiet_lightning()
    fit = _recover_trainer(trainer or TrainerFactory(), hp, ckpt_dir, loggers, callbacks)
    settings = recover_settings(hp, seed, batch_index, images, labels, lo, hi, extra_settings)
    xs, hists = _fit_round(fit, [images], [labels], [batch_index], backbones, hp, lo, hi, seed=seed,
                           settings=[settings], ckpt_dir=ckpt_dir, resume=resume)
    return xs[0], hists[0]


def pixel_bounds(preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space ``(C,)`` bounds of pixels 0 and 1 under per-channel normalization.

    Raises:
        ValueError: ZCA preprocessing (statistics matching recovers in normalized pixel space: set
            ``data.zca=false``).
    """
    if preprocessing.zca is not None:
        raise ValueError("statistics matching needs data.zca=false (images are clipped to valid pixels)")
    return (0 - preprocessing.mean) / preprocessing.std, (1 - preprocessing.mean) / preprocessing.std


def _file_identity(path: str | Path) -> dict:
    """A file's resolved path, size and modification time (what a cache or resume check keys on)."""
    path = Path(path)
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def recover_batches(hp: RecoverConfig, dm, backbones: list[Backbone], labels: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor, out_dir: Path, *, seed: int, trainer: TrainerFactory, resume: bool = False,
                    loggers: list | None = None, teacher_paths: list) -> dict:
    """Recover every batch of ``hp.batch`` images of ``labels`` ``(N,)`` (finished batches,
    ``out_dir/recover/batch_XXX.pt``, are read back with ``resume``, after :func:`check_settings`).
    Batch ``b`` starts from ``N(0, init_std)`` noise drawn from a generator seeded ``seed * 7919 +
    b``, clipped to ``[lo, hi]`` (``(C,)`` each).

    The batches still to do are recovered in rounds of ``W`` (the Trainer's processes; 1 without
    DDP), one fit per round (:class:`RecoverModule`): rank ``r`` recovers the round's batch ``r``
    (batches ``r, r + W, ...`` of a fresh run), and every rank ends each fit holding the round's
    recovered images. The BN-loss measurements of a batch (before / after, fixed views) are made
    by the rank that recovered it and all-gathered (:func:`~lightning_dd.training.devices.gather_objects`);
    rank 0 writes the batch files (atomically). A round's checkpoints are
    ``out_dir/checkpoints/recover_XXX`` (``XXX``: its first batch; one batch per round without
    DDP); a checkpoint of another round (another number of processes) is not resumed from: that
    round starts afresh. Every rank must see the same ``out_dir`` (one machine, or a shared
    filesystem) for ``resume``.

    Returns:
        ``{"images": [(B_b, C, H, W), ...], "history": per-step dicts of every batch (read-back
        ones included), "bn_start", "bn_end": BN loss on fixed views (first backbone) per batch,
        "bn_full": (start, end) on the whole images per batch, "per_start", "per_end": per backbone,
        per batch}``, batches in order, the same on every rank and for any ``W``.

    Raises:
        ValueError: a finished batch or checkpoint of other settings (:func:`check_settings`).
    """
    extra = {"data": dm.identity(), "teachers": [_file_identity(p) for p in teacher_paths]}
    n, bsz = len(labels), hp.batch
    rec_dir = out_dir / "recover"
    fm = hp.first_bn_multiplier
    done: dict[int, dict] = {}
    todo = []  # (batch, labels, initial images, settings)
    for b, start in enumerate(range(0, n, bsz)):
        y = labels[start:start + bsz]
        path = rec_dir / f"batch_{b:03d}.pt"
        g = torch.Generator().manual_seed(seed * 7919 + b)
        x0 = torch.randn(len(y), *dm.image_shape, generator=g) * hp.init_std
        x0 = torch.maximum(torch.minimum(x0, hi.view(1, -1, 1, 1)), lo.view(1, -1, 1, 1))
        settings = recover_settings(hp, seed, b, x0, y, lo, hi, extra)
        if resume and path.is_file():
            d = load_dict(path, ("images",), "recovered batch")  # weights_only=True
            check_settings(d.get("settings"), settings, path)
            done[b] = d
        else:
            todo.append((b, y, x0, settings))
    i = 0
    while i < len(todo):
        ckpt_dir = out_dir / "checkpoints" / f"recover_{todo[i][0]:03d}"
        fit = _recover_trainer(trainer, hp, ckpt_dir, loggers)
        world, rank = fit.world_size, fit.global_rank
        part, i = todo[i:i + world], i + world
        own = {}
        if rank < len(part):  # this rank's batch: BN loss before (fixed views, every backbone; whole images)
            x0 = part[rank][2]
            own = {"start": [bn_loss_views(bb, x0, hp) for bb in backbones], "full0": bn_loss_of(backbones[0], x0, fm)}
        xs, hists = _fit_round(fit, [p[2] for p in part], [p[1] for p in part], [p[0] for p in part], backbones, hp,
                               lo, hi, seed=seed, settings=[p[3] for p in part], ckpt_dir=ckpt_dir, resume=resume)
        if own:  # ... and after
            x = xs[rank]
            own.update(end=[bn_loss_views(bb, x, hp) for bb in backbones], full1=bn_loss_of(backbones[0], x, fm))
            own = {part[rank][0]: own}
        measured = {b: m for per_rank in gather_objects(own) for b, m in per_rank.items()}
        for (b, y, _, settings), x, hist in zip(part, xs, hists):
            m = measured[b]
            starts, ends, (s0, s1) = m["start"], m["end"], (m["start"][0], m["end"][0])
            log.info("recover batch %d (%d images): BN loss on fixed augmented views %.3f -> %.3f (%.1fx lower); "
                     "on the whole images %.3f -> %.3f", b, len(y), s0, s1, s0 / max(s1, 1e-12), m["full0"], m["full1"])
            for j in range(1, len(backbones)):
                log.info("recover batch %d: backbone %d BN loss on fixed augmented views %.3f -> %.3f (%.1fx lower)",
                         b, j, starts[j], ends[j], starts[j] / max(ends[j], 1e-12))
            done[b] = {"images": x, "labels": y, "loss_bn_start": s0, "loss_bn_end": s1,
                       "loss_bn_full": (m["full0"], m["full1"]), "loss_bn_per_backbone": list(zip(starts, ends)),
                       "settings": settings, "history": hist}
            if rank == 0:  # under DDP every rank holds the batch: rank 0 writes it
                atomic_save(done[b], rec_dir / f"batch_{b:03d}.pt")
    out = {"images": [], "history": [], "bn_start": [], "bn_end": [], "bn_full": [],
           "per_start": [[] for _ in backbones], "per_end": [[] for _ in backbones]}
    for b in sorted(done):
        d = done[b]
        out["images"].append(d["images"]), out["history"].extend(d["history"])
        out["bn_start"].append(d["loss_bn_start"]), out["bn_end"].append(d["loss_bn_end"])
        out["bn_full"].append(tuple(d["loss_bn_full"]))
        for j, (a, e) in enumerate(d["loss_bn_per_backbone"]):
            out["per_start"][j].append(a), out["per_end"][j].append(e)
    return out
