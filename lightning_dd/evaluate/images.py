"""The image-set evaluation of a run: a result on every ``eval.nets`` architecture, then the
baselines (``init``, ``random``) through the same student evaluator (:mod:`.student`), and the
typed ``eval`` node (:class:`ImageEvalConfig`) validated before any work."""
from __future__ import annotations

import logging
from typing import Literal

import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import field_validator

from lightning_dd.augment.dsa import DSA
from lightning_dd.core.config import NonNegFloat, PositiveFloat, PositiveInt, Typed
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.evaluate.student import evaluate_set
from lightning_dd.nets import load_net_file, net_target
from lightning_dd.results import DistilledSet

log = logging.getLogger(__name__)


class ImageEvalConfig(Typed):
    """``conf/eval/default.yaml``: the student evaluator (MTT/DATM protocol) and its baselines."""

    nets: list[str]
    num_eval: PositiveInt = 5
    epochs: PositiveInt = 1000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 0.01
    use_learned_lr: bool = True
    momentum: NonNegFloat = 0.9
    weight_decay: NonNegFloat = 5e-4
    precision: str | None = None
    augment: Literal["dsa", "crop_flip", "none"] = "dsa"
    schedule: Literal["step", "cosine"] = "step"  # lr x0.1 at half | cosine per epoch (evaluate.student.lr_schedule)
    label_mode: Literal["auto", "hard", "soft", "teacher"] = "auto"
    soft_loss: Literal["soft_ce", "kl", "mse_ce"] = "soft_ce"
    temperature: PositiveFloat = 1.0
    teacher_ckpt: str | None = None
    seed: int = 0
    parallel_seeds: Literal["auto", "vmap", "sequential"] = "auto"
    baselines: list[Literal["init", "random"]] = ["init", "random"]
    full_data_acc: dict[str, float] = {}

    @field_validator("nets")
    @classmethod
    def _known_nets(cls, nets: list[str]) -> list[str]:
        if not nets:
            raise ValueError("at least one architecture is needed")
        for n in nets:
            net_target({"name": n})  # raises ValueError listing the known names
        return nets


def eval_net_cfg(net_cfg: dict, name: str) -> dict:
    """The net config used to evaluate on architecture ``name``: ``net_cfg`` (the run's own net) when
    it is the same architecture, otherwise that architecture's defaults."""
    return dict(net_cfg) if name == net_cfg.get("name") else {"name": name}


def evaluate_result(cfg: DictConfig, dm, result: DistilledSet, prefix: str, make_trainer: TrainerFactory,
                    lr: float | None = None, num_eval: int | None = None, teacher: torch.nn.Module | None = None,
                    nets: list[str] | None = None, epochs: int | None = None) -> dict:
    """Evaluate ``result`` on every ``eval.nets`` architecture (or ``nets``) for ``eval.epochs`` (or
    ``epochs``); flat metrics under ``prefix`` (``<prefix>/<net>/acc_mean``, ...)."""
    ev = cfg.eval
    dsa = DSA(**cfg.augment.dsa) if ev.augment == "dsa" else None
    if lr is None:
        lr = result.lr if (result.lr is not None and ev.use_learned_lr) else ev.lr
    net_cfg = OmegaConf.to_container(cfg.net, resolve=True)
    metrics = {}
    for name in nets or ev.nets:
        r = evaluate_set(result.images, result.labels, dm.test_images, dm.test_labels, dm.num_classes,
                         eval_net_cfg(net_cfg, name), lr=lr, epochs=epochs or ev.epochs, batch_size=ev.batch_size,
                         num_eval=num_eval or ev.num_eval, seed=ev.seed, dsa=dsa, momentum=ev.momentum,
                         weight_decay=ev.weight_decay, make_trainer=make_trainer, augment=ev.augment,
                         label_mode=ev.label_mode, soft_loss_kind=ev.soft_loss, temperature=ev.temperature,
                         teacher=teacher, precision=ev.get("precision"),
                         parallel_seeds=ev.get("parallel_seeds", "auto"), schedule=ev.get("schedule", "step"))
        metrics.update(r.metrics(prefix))
        log.info("%s/%s: %.2f ± %.2f %% over %d runs (%.0fs)", prefix, name, 100 * r.mean, 100 * r.std,
                 len(r.accs), r.seconds)
    return metrics


def quick_eval(cfg: DictConfig, dm, make_trainer: TrainerFactory, images, labels, lr) -> float:
    """One-seed evaluation of a set during distillation on the run's own net, ``logger.eval_epochs``
    epochs (the same evaluator settings as the final evaluation otherwise)."""
    current = DistilledSet(images, labels, lr, dm.classes, {}, method="current")
    m = evaluate_result(cfg, dm, current, "periodic", make_trainer, num_eval=1, nets=[cfg.net.name],
                        epochs=cfg.logger.eval_epochs)
    return m[f"periodic/{cfg.net.name}/acc_mean"]


def evaluate_with_baselines(cfg: DictConfig, dm, result: DistilledSet, make_trainer: TrainerFactory,
                            init: DistilledSet | None = None, teacher_ckpt: str | None = None) -> dict:
    """``eval/...`` for ``result``, then each of ``eval.baselines`` through the same evaluator:
    ``init`` (the method's initialization), ``random`` (a random real subset of the same IPC,
    hard labels, ``eval.lr``). Adds ``eval/<net>/improvement_over_random`` (accuracy points as a
    fraction, DD-Ranking's IOR idea) when both are there, and ``eval/<net>/gap_to_full`` when
    ``eval.full_data_acc`` (the architecture's full-data accuracy) is given. The KD teacher is
    ``eval.teacher_ckpt``, else ``teacher_ckpt`` (the one a method trained, e.g. SRe2L's)."""
    teacher_ckpt = cfg.eval.get("teacher_ckpt") or teacher_ckpt
    teacher = load_teacher(teacher_ckpt, dm) if teacher_ckpt else None
    metrics = evaluate_result(cfg, dm, result, "eval", make_trainer, teacher=teacher)
    for b in cfg.eval.baselines:
        if b == "init" and init is not None:
            metrics.update(evaluate_result(cfg, dm, init, "baseline/init", make_trainer, teacher=teacher))
        elif b == "random":
            x, y = dm.random_subset(result.ipc, int(cfg.eval.seed))
            rnd = DistilledSet(x, y, None, dm.classes, dm.preprocessing.state(), "random", result.ipc)
            metrics.update(evaluate_result(cfg, dm, rnd, "baseline/random", make_trainer, lr=cfg.eval.lr,
                                           teacher=teacher))
    full = cfg.eval.get("full_data_acc") or {}
    for name in cfg.eval.nets:
        acc = metrics[f"eval/{name}/acc_mean"]
        if f"baseline/random/{name}/acc_mean" in metrics:
            metrics[f"eval/{name}/improvement_over_random"] = acc - metrics[f"baseline/random/{name}/acc_mean"]
        if name in full:
            metrics[f"eval/{name}/gap_to_full"] = float(full[name]) - acc
    return metrics


def load_teacher(path: str, dm) -> torch.nn.Module:
    """A teacher saved as ``{"net_cfg": {"name": ..., ...}, "state_dict": ...}`` (``torch.save``).

    Raises:
        FileNotFoundError: no file.
        ValueError: not a teacher checkpoint, or one that does not
            fit ``dm`` (:func:`lightning_dd.nets.load_net_file`).
    """
    return load_net_file(path, dm.image_shape[0], dm.num_classes, dm.image_shape[1:],
                         "teacher checkpoint (eval.teacher_ckpt)")[0]
