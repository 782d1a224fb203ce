"""Recover (SRe2L Sec. 3.2, Eq. 5-7; CDA; G-VBSM): optimize batches of synthetic images from noise
so that frozen BatchNorm teachers classify them as their class while their batch statistics match
the teachers' running statistics. Every batch is one Lightning fit of :class:`RecoverModule`,
checkpointed and resumable; finished batches and checkpoints record the settings that determine
them (:func:`recover_settings`) and a resume refuses others (:func:`check_settings`)."""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.batches import StepLoader
from lightning_dd.io import atomic_save, check_checkpoint, load_dict, safe_fit_kwargs
from lightning_dd.methods.statistics_matching.config import RecoverConfig
from lightning_dd.methods.statistics_matching.crops import crop_scale_min, jitter_crop_flip
from lightning_dd.methods.statistics_matching.statistics import (Backbone, backbone_weights, bn_loss_of,
                                                                 bn_loss_views)
from lightning_dd.quiet import quiet_lightning

log = logging.getLogger(__name__)


class RecoverModule(L.LightningModule):
    """Recovers one batch of synthetic images (SRe2L Sec. 3.2; CDA; G-VBSM): the only trainable
    state is ``images`` (so checkpoints hold just the images and Adam's moments). One optimizer
    step per (dummy) batch: loss ``CE + r_bn R_BN + r_conv R_conv + r_logit R_logit`` (SRe2L Eq. 7
    plus G-VBSM's terms) on the step's augmented view, Adam (betas 0.5, 0.9), cosine lr, pixels
    clipped to ``[lo, hi]`` after every step.

    Args:
        images: ``(B, C, H, W)`` initial images in model space. labels: ``(B,)`` int64.
        backbones: :class:`~.statistics.Backbone` list (not saved in checkpoints).
        hp: the ``recover`` settings.
        lo, hi: ``(C,)`` model-space bounds of valid pixels (clipping).
        seed, batch_index: every step's randomness is keyed by ``(seed, batch_index, step)``, so a
            resumed run draws what an uninterrupted one would.
        settings: what determines this batch (:func:`recover_settings`), saved in every checkpoint
            with the per-step ``history`` so far (a resumed fit checks the one and continues the other).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, backbones: list[Backbone], hp: RecoverConfig,
                 lo: torch.Tensor, hi: torch.Tensor, seed: int = 0, batch_index: int = 0,
                 settings: dict | None = None):
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("lo", lo.view(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("hi", hi.view(1, -1, 1, 1).clone(), persistent=False)
        self.backbones, self.hp, self.seed, self.batch_index = backbones, hp, seed, batch_index
        self.history: list[dict] = []
        self.settings = settings
        self.bn_weights, self.conv_weights = backbone_weights(backbones, images, hp)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recover_settings"] = self.settings
        checkpoint["recover_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("recover_history", []))

    def on_fit_start(self):
        for b in self.backbones:
            b.to(self.device)

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of ``step``: seeded ``seed * 1_000_003 + batch_index * 10_007 + step``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch_index * 10_007 + step)

    def augment(self, step: int) -> tuple[torch.Tensor, float, list[int]]:
        """The step's augmented view ``(B, C, H, W)`` of the images (:func:`~.crops.jitter_crop_flip`
        with the crop scale ``[crop_scale_min(step), crop_scale[1]]``), that lower bound, and the
        sorted indices of the backbones the step uses (``backbones_per_iter`` of them, drawn from the
        same generator after the view; all of them, without a draw, when there are no more)."""
        hp, x = self.hp, self.images
        g = self.generator(step)
        smin = crop_scale_min(step, hp.iterations, hp.crop_schedule, hp.crop_scale[1], hp.crop_scale[0],
                              hp.milestone)
        x = jitter_crop_flip(x, g, jitter=hp.jitter, scale=(smin, hp.crop_scale[1]), flip=hp.flip)
        k = min(hp.backbones_per_iter, len(self.backbones))
        chosen = sorted(torch.randperm(len(self.backbones), generator=g)[:k].tolist()) if k < len(self.backbones) \
            else list(range(len(self.backbones)))
        return x, smin, chosen

    def losses(self, x: torch.Tensor, chosen: list[int]) -> dict[str, torch.Tensor]:
        """CE, BN, conv and logit losses (scalar tensors; zero where a term is off) of ``x``
        ``(B, C, H, W)``, each the mean over the ``chosen`` backbones (G-VBSM sums; a constant
        factor Adam does not see, see the package doc)."""
        hp = self.hp
        out = {"ce": 0.0, "bn": 0.0, "conv": 0.0, "logit": 0.0}
        for i in chosen:
            b = self.backbones[i]
            logits = b.net(x)
            out["ce"] = out["ce"] + F.cross_entropy(logits, self.labels)
            out["bn"] = out["bn"] + self.bn_weights[i] * b.bn.loss(first_multiplier=hp.first_bn_multiplier)
            if b.conv is not None and hp.r_conv > 0:
                out["conv"] = out["conv"] + self.conv_weights[i] * b.conv.loss(b.conv_targets, hp.first_bn_multiplier)
            if b.class_logits is not None and hp.r_logit > 0:
                out["logit"] = out["logit"] + F.mse_loss(logits, b.class_logits[self.labels])
        zero = torch.zeros((), device=x.device)
        return {k: (v / len(chosen) if torch.is_tensor(v) else zero) for k, v in out.items()}

    def training_step(self, batch, batch_idx):
        step = self.global_step
        x, smin, chosen = self.augment(step)
        ls = self.losses(x, chosen)
        hp = self.hp
        loss = ls["ce"] + hp.r_bn * ls["bn"] + hp.r_conv * ls["conv"] + hp.r_logit * ls["logit"]
        rec = {"recover/loss": loss.detach(), "recover/loss_ce": ls["ce"].detach(),
               "recover/loss_bn": ls["bn"].detach(), "recover/crop_scale_min": smin,
               "recover/batch": float(self.batch_index)}
        if hp.r_conv > 0:
            rec["recover/loss_conv"] = ls["conv"].detach()
        if hp.r_logit > 0:
            rec["recover/loss_logit"] = ls["logit"].detach()
        if self.trainer.loggers and ((step + 1) % 10 == 0 or step + 1 == hp.iterations):
            # logged at the run-wide step batch_index * iterations + step: every batch is its own fit
            # (whose steps restart at 0), and a resumed run's logs replace only what they log again
            row = {k: float(v) for k, v in rec.items()}
            for lg in self.trainer.loggers:
                lg.log_metrics(row, step=self.batch_index * hp.iterations + step)
        self.history.append({"batch": self.batch_index, "step": step, "loss_bn": float(ls["bn"].detach()),
                             "crop_scale_min": smin, "backbones": chosen})
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # keep pixels valid (SRe2L's clip), before any checkpoint of this step
            self.images.copy_(torch.maximum(torch.minimum(self.images, self.hi), self.lo))

    def configure_optimizers(self):
        hp = self.hp
        opt = torch.optim.Adam([self.images], lr=hp.lr, betas=(0.5, 0.9), eps=1e-8)
        total = hp.iterations
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
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
    from lightning.pytorch.callbacks import ModelCheckpoint

    quiet_lightning()
    trainer = trainer or TrainerFactory()
    settings = recover_settings(hp, seed, batch_index, images, labels, lo, hi, extra_settings)
    module = RecoverModule(images, labels, backbones, hp, lo, hi, seed=seed, batch_index=batch_index,
                           settings=settings)
    cbs = list(callbacks)
    ckpt_path = None
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="recover-{step}", every_n_train_steps=hp.ckpt_every,
                                   save_last=True, save_top_k=1))
        if resume and (Path(ckpt_dir) / "last.ckpt").is_file():
            ckpt_path = str(Path(ckpt_dir) / "last.ckpt")
            stored = check_checkpoint(ckpt_path, "recovery checkpoint").get("recover_settings")  # weights_only
            check_settings(stored, settings, ckpt_path)
            log.info("recover batch %d: resuming from %s", batch_index, ckpt_path)
    iters = hp.iterations
    fit = trainer("recover", max_steps=iters, max_epochs=1, logger=loggers if loggers else False, callbacks=cbs,
                  log_every_n_steps=10, enable_checkpointing=ckpt_dir is not None)
    fit.fit(module, StepLoader(iters, lambda: module.global_step), ckpt_path=ckpt_path, **safe_fit_kwargs())
    return module.images.detach().cpu(), module.history


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
    ``out_dir/recover/batch_XXX.pt``, are read back with ``resume``, after :func:`check_settings`;
    a batch's checkpoints are ``out_dir/checkpoints/recover_XXX``). Batch ``b`` starts from
    ``N(0, init_std)`` noise drawn from a generator seeded ``seed * 7919 + b``, clipped to
    ``[lo, hi]`` (``(C,)`` each).

    Returns:
        ``{"images": [(B_b, C, H, W), ...], "history": per-step dicts of every batch (read-back
        ones included), "bn_start", "bn_end": BN loss on fixed views (first backbone) per batch,
        "bn_full": (start, end) on the whole images per batch, "per_start", "per_end": per backbone,
        per batch}``.

    Raises:
        ValueError: a finished batch or checkpoint of other settings (:func:`check_settings`).
    """
    extra = {"data": dm.identity(), "teachers": [_file_identity(p) for p in teacher_paths]}
    n, bsz = len(labels), hp.batch
    rec_dir = out_dir / "recover"
    images, history = [], []
    fm = hp.first_bn_multiplier
    bn_start, bn_end, bn_full = [], [], []
    nb = len(backbones)
    per_start, per_end = [[] for _ in range(nb)], [[] for _ in range(nb)]  # every backbone, per batch
    for b, start in enumerate(range(0, n, bsz)):
        y = labels[start:start + bsz]
        done = rec_dir / f"batch_{b:03d}.pt"
        g = torch.Generator().manual_seed(seed * 7919 + b)
        x0 = torch.randn(len(y), *dm.image_shape, generator=g) * hp.init_std
        x0 = torch.maximum(torch.minimum(x0, hi.view(1, -1, 1, 1)), lo.view(1, -1, 1, 1))
        settings = recover_settings(hp, seed, b, x0, y, lo, hi, extra)
        if resume and done.is_file():
            d = load_dict(done, ("images",), "recovered batch")  # weights_only=True
            check_settings(d.get("settings"), settings, done)
            images.append(d["images"]), bn_start.append(d["loss_bn_start"]), bn_end.append(d["loss_bn_end"])
            bn_full.append(d["loss_bn_full"])
            for i, (a, e) in enumerate(d["loss_bn_per_backbone"]):
                per_start[i].append(a), per_end[i].append(e)
            history += d["history"]
            continue
        starts = [bn_loss_views(bb, x0, hp) for bb in backbones]
        s0, f0 = starts[0], bn_loss_of(backbones[0], x0, fm)
        x, hist = recover_batch(x0, y, backbones, hp, lo, hi, seed=seed, batch_index=b,
                                ckpt_dir=out_dir / "checkpoints" / f"recover_{b:03d}", trainer=trainer,
                                resume=resume, loggers=loggers, extra_settings=extra)
        ends = [bn_loss_views(bb, x, hp) for bb in backbones]
        s1, f1 = ends[0], bn_loss_of(backbones[0], x, fm)
        log.info("recover batch %d (%d images): BN loss on fixed augmented views %.3f -> %.3f (%.1fx lower); "
                 "on the whole images %.3f -> %.3f", b, len(y), s0, s1, s0 / max(s1, 1e-12), f0, f1)
        for i in range(1, nb):
            log.info("recover batch %d: backbone %d BN loss on fixed augmented views %.3f -> %.3f (%.1fx lower)",
                     b, i, starts[i], ends[i], starts[i] / max(ends[i], 1e-12))
        for i in range(nb):
            per_start[i].append(starts[i]), per_end[i].append(ends[i])
        atomic_save({"images": x, "labels": y, "loss_bn_start": s0, "loss_bn_end": s1, "loss_bn_full": (f0, f1),
                     "loss_bn_per_backbone": list(zip(starts, ends)), "settings": settings, "history": hist}, done)
        images.append(x), bn_start.append(s0), bn_end.append(s1), bn_full.append((f0, f1))
        history += hist
    return {"images": images, "history": history, "bn_start": bn_start, "bn_end": bn_end, "bn_full": bn_full,
            "per_start": per_start, "per_end": per_end}
