"""Squeeze (SRe2L Sec. 3.1): train BatchNorm teachers on the real data with Lightning, cached by
their settings, or load a given teacher checkpoint. A teacher in training is checkpointed after
every epoch (``<cache>/teachers/<key>/partial/last.ckpt``); a killed run started again continues it
there and ends with the teacher an uninterrupted run trains."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.batches import batch_loader
from lightning_dd.io import atomic_write_text, load_cache, require_keys, safe_fit_kwargs, save_cache
from lightning_dd.training.cache import cache_key
from lightning_dd.methods.images.experts import epoch_checkpoints
from lightning_dd.methods.images.statistics_matching.config import TeacherConfig
from lightning_dd.methods.images.statistics_matching.statistics import device_of
from lightning_dd.nets import build_net_cfg, load_net_file
from lightning_dd.quiet import quiet_lightning

log = logging.getLogger(__name__)

class TeacherModule(L.LightningModule):
    """Trains a teacher on real batches (SRe2L's squeeze): SGD (momentum 0.9, Nesterov or not), cosine lr
    over ``total_steps`` optimizer steps, random crop (4-px padding, or random-resized crop of scale
    0.25-1 at >= 64 px) and flip (kornia), cross-entropy with ``label_smoothing``.

    Args:
        net: the network (BatchNorm). lr: initial lr. weight_decay: L2 weight.
        image_size: ``(H, W)`` of the batches ``x (B, C, H, W)``, ``y (B,)``.
    """

    def __init__(self, net: nn.Module, lr: float, total_steps: int, weight_decay: float, image_size,
                 label_smoothing: float = 0.0, nesterov: bool = False):
        super().__init__()
        import kornia.augmentation as K

        self.net, self.lr, self.total_steps, self.weight_decay = net, lr, total_steps, weight_decay
        self.label_smoothing, self.nesterov = label_smoothing, nesterov
        h, w = image_size
        crop = K.RandomResizedCrop((h, w), scale=(0.25, 1.0)) if h >= 64 else K.RandomCrop((h, w), padding=4)
        self.augment = nn.Sequential(crop, K.RandomHorizontalFlip())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(self.augment(x)), y, label_smoothing=self.label_smoothing)
        self.log("squeeze/train_loss", loss, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=0.9, nesterov=self.nesterov,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / max(1, self.total_steps))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``net`` in eval mode on ``images (N, C, H, W)``,
    ``labels (N,)``, batch by batch on the network's device."""
    net.eval()
    dev = device_of(net)
    correct = sum(int((net(x.to(dev)).argmax(1).cpu() == y).sum())
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / max(1, len(labels))


def squeeze(net_cfg: dict, dm, tcfg: TeacherConfig, cache_root: str | Path, seed: int = 0,
            trainer: TrainerFactory | None = None) -> dict:
    """Train (or load from the cache) one teacher on ``dm``'s training set (SRe2L Sec. 3.1).

    Args:
        net_cfg: ``{"name" | "_target_": ..., **kwargs}`` (a BatchNorm network); an ``epochs`` key
            overrides ``tcfg.epochs`` for this net (e.g. fewer epochs for the extra G-VBSM
            backbones; the cache key holds the epochs actually used).
        dm: a set-up :class:`lightning_dd.data.images.ImageDataModule`.
        tcfg: the squeeze's settings (``epochs``, ``lr``, ``batch_size``, ``weight_decay``,
            ``label_smoothing``).
        cache_root: ``paths.cache_dir/teachers``; the file is ``<key>/teacher.pt`` with the key over
            the data identity, ``net_cfg``, the training settings and ``seed``.
        trainer: the run's Trainer factory (``TrainerFactory()`` when ``None``); its accelerator
            also places the returned network (:func:`run_device`).

    Returns:
        ``{"net": nn.Module (eval, on the run's device), "path": Path, "test_acc": float (fraction),
        "seconds": float, "cached": bool}``; the file is a teacher checkpoint ``{"net_cfg",
        "state_dict", "test_acc", "spec"}`` that ``eval.teacher_ckpt`` / ``method.teacher.ckpt`` accept.

    The cache entry is written atomically with a checksum; a truncated, corrupted or unfitting one
    is reported, deleted and trained again (:func:`lightning_dd.io.load_cache`).

    Raises:
        lightning_dd.io.UnsafeFileError: a cached file that needs arbitrary unpickling (refused).
    """
    trainer = trainer or TrainerFactory()
    net_cfg = dict(net_cfg)
    epochs = net_cfg.pop("epochs", tcfg.epochs)  # a positive int (TeacherConfig checks the nets)
    spec = {"data": dm.identity(), "net": dict(net_cfg), "seed": seed, "epochs": epochs, "lr": tcfg.lr,
            "batch_size": tcfg.batch_size, "weight_decay": tcfg.weight_decay, "label_smoothing": tcfg.label_smoothing,
            "nesterov": tcfg.nesterov}
    path = Path(cache_root) / cache_key(spec) / "teacher.pt"
    dev = run_device(trainer.accelerator)
    built = {}

    def check(d):  # the stored weights must fit this data; else the entry is rebuilt
        require_keys("net_cfg", "state_dict", "test_acc")(d)
        net = build_net_cfg(dict(d["net_cfg"]), dm.image_shape[0], dm.num_classes, dm.image_shape[1:])
        try:
            net.load_state_dict(d["state_dict"])
        except RuntimeError as e:
            raise ValueError(f"weights do not fit the data: {str(e)[:200]}") from None
        built["net"] = net

    d = load_cache(path, "cached teacher", check)  # None: missing, or unusable (reported, deleted)
    if d is not None:
        return {"net": built["net"].to(dev).eval(), "path": path, "test_acc": d["test_acc"], "seconds": 0.0,
                "cached": True}
    quiet_lightning()
    t0 = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    net = build_net_cfg(net_cfg, dm.image_shape[0], dm.num_classes, dm.image_shape[1:])
    loader = batch_loader(dm.train_images, dm.train_labels, tcfg.batch_size, epochs=1, seed=seed)
    steps = epochs * len(loader)
    module = TeacherModule(net, tcfg.lr, steps, tcfg.weight_decay, dm.image_shape[1:], tcfg.label_smoothing,
                           tcfg.nesterov)
    callbacks, resume = epoch_checkpoints(path.parent / "partial", loader.dataset, f"teacher {path.parent.name}")
    trainer("squeeze", max_epochs=epochs, enable_progress_bar=False, callbacks=callbacks,
            enable_checkpointing=True).fit(module, loader, ckpt_path=resume, **safe_fit_kwargs())
    net = net.to(dev).eval()
    acc = accuracy(net, dm.test_images, dm.test_labels)
    secs = time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_cache({"net_cfg": dict(net_cfg), "state_dict": state, "test_acc": acc, "spec": spec,
                "seconds": secs}, path)
    atomic_write_text(json.dumps(spec, indent=1, sort_keys=True, default=str), path.parent / "spec.json")
    shutil.rmtree(path.parent / "partial", ignore_errors=True)  # after teacher.pt: a kill between keeps one
    log.info("teacher %s: %d epochs in %.0fs, test acc %.4f -> %s", net_cfg.get("name", net_cfg.get("_target_")),
             epochs, secs, acc, path)
    return {"net": net, "path": path, "test_acc": acc, "seconds": secs, "cached": False}


def load_teacher_file(path: str | Path, dm, accelerator: str = "auto") -> dict:
    """A teacher checkpoint ``{"net_cfg", "state_dict", ...}`` (``method.teacher.ckpt``) on the run's
    device (:func:`run_device`), with its test accuracy (stored, else measured on ``dm``'s test set).

    Returns:
        ``{"net", "path", "test_acc", "seconds": 0.0, "cached": True}`` (as :func:`squeeze`).

    Raises:
        FileNotFoundError: no file.
        ValueError: not a teacher checkpoint, or its weights do not fit
            the data's shape/classes (:func:`lightning_dd.nets.load_net_file`).
    """
    net, d = load_net_file(path, dm.image_shape[0], dm.num_classes, dm.image_shape[1:],
                           "teacher checkpoint (method.teacher.ckpt)")
    net = net.to(run_device(accelerator)).eval()
    acc = d.get("test_acc")
    return {"net": net, "path": Path(path), "test_acc": acc if acc is not None else accuracy(
        net, dm.test_images, dm.test_labels), "seconds": 0.0, "cached": True}


def load_teachers(tcfg: TeacherConfig, dm, cache_root: str | Path, seed: int, trainer: TrainerFactory) -> list[dict]:
    """Every teacher of ``method.teacher``: the given ``ckpt`` (one), else each of ``nets`` squeezed
    (:func:`squeeze`, cached under ``cache_root``) in order. Returns :func:`squeeze`'s dicts."""
    if tcfg.ckpt:
        return [load_teacher_file(tcfg.ckpt, dm, trainer.accelerator)]
    return [squeeze(n, dm, tcfg, cache_root, seed, trainer) for n in tcfg.nets]
