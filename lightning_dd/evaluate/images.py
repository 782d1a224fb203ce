"""The image-set evaluation of a run: a result on every ``eval.nets`` architecture, then the
baselines (``init``, ``random``) through the same student evaluator (:mod:`.student`), and the
typed ``eval`` node (:class:`ImageEvalConfig`) validated before any work."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ConfigDict, field_validator

from lightning_dd.augment.dsa import DSA
from lightning_dd.core.config import PositiveFloat
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.protocols import ImageData
from lightning_dd.evaluate.student import StudentSettings, evaluate_set
from lightning_dd.nets import load_net_file, net_target
from lightning_dd.results import DistilledSet

log = logging.getLogger(__name__)


class ImageEvalConfig(StudentSettings):
    """``conf/eval/default.yaml`` (which holds every default): the student evaluator (MTT/DATM
    protocol, :class:`StudentSettings`) and what the run evaluates with it: ``nets`` (architectures);
    ``lr`` (for sets without a learned lr, e.g. random subsets) and ``use_learned_lr``; ``teacher_ckpt``
    (KD teacher of ``label_mode=teacher``); ``baselines`` (``init``: the method's initialization,
    ``random``: a random real subset of the same IPC); ``full_data_acc`` (``{net: full-data
    accuracy}`` -> ``eval/<net>/gap_to_full``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    nets: list[str]
    lr: PositiveFloat
    use_learned_lr: bool
    teacher_ckpt: str | None
    baselines: list[Literal["init", "random"]]
    full_data_acc: dict[str, float]

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


@dataclass(frozen=True)
class ImageEvaluator:
    """The image-set evaluation of a run: the typed ``eval`` settings plus what the run shares with it.

    Args:
        settings: the validated ``eval`` node.
        net: the run's resolved net config (``{"name": ..., **kwargs}``); an ``eval.nets`` entry of
            the same architecture is evaluated with it, others with their defaults.
        dsa: the run's DSA (``augment.dsa``), used when ``settings.augment == "dsa"``.
        make_trainer: the run's Trainer factory.
    """

    settings: ImageEvalConfig
    net: dict
    dsa: DSA | None
    make_trainer: TrainerFactory

    def evaluate(self, dm: ImageData, result: DistilledSet, prefix: str, lr: float | None = None,
                 num_eval: int | None = None, teacher: torch.nn.Module | None = None, nets: list[str] | None = None,
                 epochs: int | None = None) -> dict:
        """Evaluate ``result`` on every ``eval.nets`` architecture (or ``nets``) for ``eval.epochs`` (or
        ``epochs``) on ``dm``'s test set; flat metrics under ``prefix`` (``<prefix>/<net>/acc_mean``, ...).
        ``lr``: default the set's learned lr when ``eval.use_learned_lr``, else ``eval.lr``."""
        ev = self.settings
        dsa = self.dsa if ev.augment == "dsa" else None
        if lr is None:
            lr = result.lr if (result.lr is not None and ev.use_learned_lr) else ev.lr
        metrics = {}
        for name in nets or ev.nets:
            r = evaluate_set(result.images, result.labels, dm.test_images, dm.test_labels, dm.num_classes,
                             eval_net_cfg(self.net, name), ev, lr=lr, epochs=epochs, num_eval=num_eval, dsa=dsa,
                             make_trainer=self.make_trainer, teacher=teacher)
            metrics.update(r.metrics(prefix))
            log.info("%s/%s: %.2f ± %.2f %% over %d runs (%.0fs)", prefix, name, 100 * r.mean, 100 * r.std,
                     len(r.accs), r.seconds)
        return metrics

    def quick(self, dm: ImageData, images: torch.Tensor, labels: torch.Tensor, lr, epochs: int) -> float:
        """One-seed evaluation of a set during distillation on the run's own net for ``epochs``
        (``logger.eval_epochs``); the final evaluation's settings otherwise. Returns the accuracy (fraction)."""
        current = DistilledSet(images, labels, lr, dm.classes, {}, method="current")
        name = self.net["name"]
        return self.evaluate(dm, current, "periodic", num_eval=1, nets=[name], epochs=epochs)[f"periodic/{name}/acc_mean"]

    def with_baselines(self, dm: ImageData, result: DistilledSet, init: DistilledSet | None = None,
                       teacher_ckpt: str | None = None) -> dict:
        """``eval/...`` for ``result``, then each of ``eval.baselines`` through the same evaluator:
        ``init`` (the method's initialization), ``random`` (a random real subset of the same IPC,
        hard labels, ``eval.lr``). Adds ``eval/<net>/improvement_over_random`` (accuracy points as a
        fraction, DD-Ranking's IOR idea) when both are there, and ``eval/<net>/gap_to_full`` when
        ``eval.full_data_acc`` (the architecture's full-data accuracy) is given. The KD teacher is
        ``eval.teacher_ckpt``, else ``teacher_ckpt`` (the one a method trained, e.g. SRe2L's)."""
        ev = self.settings
        teacher_ckpt = ev.teacher_ckpt or teacher_ckpt
        teacher = load_teacher(teacher_ckpt, dm) if teacher_ckpt else None
        metrics = self.evaluate(dm, result, "eval", teacher=teacher)
        for b in ev.baselines:
            if b == "init" and init is not None:
                metrics.update(self.evaluate(dm, init, "baseline/init", teacher=teacher))
            elif b == "random":
                x, y = dm.random_subset(result.ipc, int(ev.seed))
                rnd = DistilledSet(x, y, None, dm.classes, dm.preprocessing.state(), "random", result.ipc)
                metrics.update(self.evaluate(dm, rnd, "baseline/random", lr=ev.lr, teacher=teacher))
        for name in ev.nets:
            acc = metrics[f"eval/{name}/acc_mean"]
            if f"baseline/random/{name}/acc_mean" in metrics:
                metrics[f"eval/{name}/improvement_over_random"] = acc - metrics[f"baseline/random/{name}/acc_mean"]
            if name in ev.full_data_acc:
                metrics[f"eval/{name}/gap_to_full"] = float(ev.full_data_acc[name]) - acc
        return metrics


def load_teacher(path: str, dm: ImageData) -> torch.nn.Module:
    """A teacher saved as ``{"net_cfg": {"name": ..., ...}, "state_dict": ...}`` (``torch.save``).

    Raises:
        FileNotFoundError: no file.
        ValueError: not a teacher checkpoint, or one that does not
            fit ``dm`` (:func:`lightning_dd.nets.load_net_file`).
    """
    return load_net_file(path, dm.image_shape[0], dm.num_classes, dm.image_shape[1:],
                         "teacher checkpoint (eval.teacher_ckpt)")[0]
