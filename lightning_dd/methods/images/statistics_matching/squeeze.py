"""Squeeze (SRe2L Sec. 3.1): train BatchNorm teachers on the real data with Lightning, cached by
their settings, or load a given teacher checkpoint. A teacher in training is checkpointed after
every epoch (``<cache>/teachers/<key>/partial/last.ckpt``); a killed run started again continues it
there and ends with the teacher an uninterrupted run trains."""
from __future__ import annotations

import json
import logging
import shutil
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.batches import batch_loader
from lightning_dd.io import atomic_write_text, cache_key, load_cache, require_keys, safe_fit_kwargs, save_cache
from lightning_dd.methods.images.experts import epoch_checkpoints
from lightning_dd.methods.images.statistics_matching.config import TeacherConfig
from lightning_dd.nets import build_net_cfg, load_net_file
from lightning_dd.quiet import quiet_lightning
from lightning_dd.training.devices import run_device
from lightning_dd.training.metrics import accuracy
from lightning_dd.training.schedules import warmup_cosine
from lightning_dd.training.supervised import SupervisedModule, recipe_spec

log = logging.getLogger(__name__)


def teacher_module(net: torch.nn.Module, teacher: TeacherConfig, total_steps: int, image_size) -> SupervisedModule:
    """The squeeze's LightningModule (SRe2L Sec. 3.1): ``teacher.optimizer`` on every parameter
    (the configs: SGD, momentum 0.9), ``teacher.scheduler`` over ``total_steps`` optimizer steps
    without warmup (the configs: cosine from the lr to 0), random crop + flip, cross-entropy with
    ``label_smoothing`` (:class:`~lightning_dd.training.supervised.SupervisedModule`)."""
    return SupervisedModule(net, teacher.optimizer, teacher.scheduler, total_steps, 0, image_size,
                            teacher.label_smoothing, "squeeze/train_loss")


def teacher_spec(teacher: TeacherConfig) -> dict:
    """The optimizer's part of a teacher's cache key: ``lr``, ``weight_decay``, ``nesterov`` (its
    keywords), plus a ``recipe`` entry only for a recipe other than SGD with momentum 0.9 and the
    cosine (:func:`~lightning_dd.training.supervised.recipe_spec`)."""
    return recipe_spec(teacher.optimizer, teacher.scheduler, {k: k for k in ("lr", "weight_decay", "nesterov")},
                       partial(torch.optim.SGD, momentum=0.9), warmup_cosine)


def squeeze(net_cfg: dict, dm, teacher: TeacherConfig, cache_root: str | Path, seed: int = 0,
            trainer: TrainerFactory | None = None) -> dict:
    """Train (or load from the cache) one teacher on ``dm``'s training set (SRe2L Sec. 3.1).

    Args:
        net_cfg: ``{"name" | "_target_": ..., **kwargs}`` (a BatchNorm network); an ``epochs`` key
            overrides ``teacher.epochs`` for this net (e.g. fewer epochs for the extra G-VBSM
            backbones; the cache key holds the epochs actually used).
        dm: a set-up :class:`lightning_dd.data.images.ImageDataModule`.
        teacher: the squeeze's settings (``epochs``, ``batch_size``, ``optimizer``, ``scheduler``,
            ``label_smoothing``).
        cache_root: ``paths.cache_dir/teachers``; the file is ``<key>/teacher.pt`` with the key over
            the data identity, ``net_cfg``, the training settings and ``seed``.
        trainer: the run's Trainer factory (``TrainerFactory()`` when ``None``); its accelerator
            also places the returned network (:func:`~lightning_dd.training.devices.run_device`).

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
    epochs = net_cfg.pop("epochs", teacher.epochs)  # a positive int (TeacherConfig checks the nets)
    spec = {"data": dm.identity(), "net": dict(net_cfg), "seed": seed, "epochs": epochs,
            "batch_size": teacher.batch_size, "label_smoothing": teacher.label_smoothing, **teacher_spec(teacher)}
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
    loader = batch_loader(dm.train_images, dm.train_labels, teacher.batch_size, epochs=1, seed=seed)
    steps = epochs * len(loader)
    module = teacher_module(net, teacher, steps, dm.image_shape[1:])
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
    device (:func:`~lightning_dd.training.devices.run_device`), with its test accuracy (stored, else
    measured on ``dm``'s test set).

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


def load_teachers(teacher: TeacherConfig, dm, cache_root: str | Path, seed: int, trainer: TrainerFactory) -> list[dict]:
    """Every teacher of ``method.teacher``: the given ``ckpt`` (one), else each of ``nets`` squeezed
    (:func:`squeeze`, cached under ``cache_root``) in order. Returns :func:`squeeze`'s dicts."""
    if teacher.ckpt:
        return [load_teacher_file(teacher.ckpt, dm, trainer.accelerator)]
    return [squeeze(n, dm, teacher, cache_root, seed, trainer) for n in teacher.nets]
