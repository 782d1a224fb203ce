"""The contract every method keeps: one class per method, built from its config node.

``conf/method/<name>.yaml`` names the class in ``_target_`` and sets its hyperparameters, which are
the class's typed fields (a pydantic model): ``hydra.utils.instantiate(cfg.method)`` builds the
method and validates every value before any data is read. The runner then calls
:meth:`Method.run` with a :class:`RunContext` (the set-up DataModule, the output directory, the
loggers, the Trainer factory) and, for ``stage=all``, :meth:`Method.evaluate` on what it returned.
The runner knows no method by name. Adding a method::

    # my_pkg/my_method.py
    class MyMethod(ImageMethod):              # or Method / GraphMethod
        \"\"\"What it is (paper, arXiv id).\"\"\"
        ipc: PositiveInt = 10
        lr: PositiveFloat = 0.1
        def run(self, ctx):                    # LightningModules fitted with ctx.trainer(...)
            ...
            return MethodOutput(result=DistilledSet(...))

    # conf/method/my_method.yaml
    _target_: my_pkg.my_method.MyMethod
    name: my_method
    ipc: 10

and ``python train.py method=my_method``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from lightning_dd.core.config import PositiveInt, Typed
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.evaluate.images import ImageEvalConfig, evaluate_with_baselines
from lightning_dd.io import check_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a method gets from the runner.

    Attributes:
        cfg: the whole composed run config (``eval``, ``net``, ``augment``, ``paths``, ...), resolved.
        dm: the set-up DataModule (built from ``data._target_``).
        out_dir: the run directory (Hydra's output dir).
        loggers: the run's Lightning loggers (CSV, W&B) for the method's main stage.
        callbacks: run-level callbacks for the main stage (synthetic-image grids, periodic evaluation).
        trainer: the Trainer factory from ``conf/trainer``; every stage builds its Trainer with it.
        seed, stage, resume, ckpt_path: the run's own keys.
    """

    cfg: DictConfig
    dm: Any
    out_dir: Path
    loggers: list
    callbacks: list
    trainer: TrainerFactory
    seed: int = 0
    stage: str = "all"
    resume: bool = False
    ckpt_path: str | None = None

    def resume_from(self, ckpt: Path, what: str) -> str | None:
        """The checkpoint a stage resumes from: ``ckpt_path`` when given, else ``ckpt`` when
        ``resume=true`` and it exists; logs the choice. ``resume=true`` without a checkpoint says
        so and starts fresh. The checkpoint is read with ``weights_only=True`` first
        (:func:`lightning_dd.io.check_checkpoint`).

        Raises:
            lightning_dd.io.UnsafeFileError: it needs arbitrary unpickling. ValueError: truncated or
                not a Lightning checkpoint (the message names the file).
        """
        if self.ckpt_path:
            check_checkpoint(self.ckpt_path, f"{what} checkpoint (ckpt_path)")
            log.info("resuming %s from %s", what, self.ckpt_path)
            return str(self.ckpt_path)
        if self.resume:
            if Path(ckpt).is_file():
                check_checkpoint(ckpt, f"{what} checkpoint")
                log.info("resuming %s from %s", what, ckpt)
                return str(ckpt)
            log.warning("resume=true but there is no checkpoint at %s: %s starts from scratch", ckpt, what)
        return None


@dataclass
class MethodOutput:
    """What :meth:`Method.run` returns.

    Attributes:
        result: the artifact to save and evaluate (a :class:`lightning_dd.results.DistilledSet`),
            or ``None`` (a stage that stops early, or a method that saves its own artifact).
        init: the set before optimization (evaluated as ``baseline/init``).
        extras: anything the method's own :meth:`Method.evaluate` needs (e.g. a teacher path).
        metrics, timings: flat metrics and stage durations (seconds) for ``metrics.json``.
    """

    result: Any = None
    init: Any = None
    extras: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


class Method(Typed):
    """Base class of every method: typed hyperparameters as fields, :meth:`run` and :meth:`evaluate`.

    Class attributes:
        stages: the values ``stage`` may take for this method (``all`` runs everything and the
            evaluation; the others stop after that stage).
        eval_schema: the typed model of the ``eval`` node this method's evaluator reads
            (validated by the runner before any work); ``None`` = not validated.
    """

    stages: ClassVar[tuple[str, ...]] = ("all",)
    eval_schema: ClassVar[type | None] = None
    name: str

    def run(self, ctx: RunContext) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self, ctx: RunContext, out: MethodOutput) -> dict:
        """Flat metrics of ``out`` (``eval/<net>/acc_mean``, baselines, ...); default: none."""
        return {}

    def check(self, ctx_cfg: DictConfig) -> None:
        """Cross-key checks that need the rest of the config (e.g. the net), before any work.
        Raises :class:`lightning_dd.core.config.ConfigError`. Default: none."""


class ImageMethod(Method):
    """A method whose result is a :class:`lightning_dd.results.DistilledSet` of images, judged by the
    shared student evaluator with its baselines (``eval`` node: :class:`ImageEvalConfig`).

    ``MethodOutput.extras["teacher_ckpt"]`` (optional): a teacher the evaluator uses for KD when
    ``eval.teacher_ckpt`` is unset.
    """

    eval_schema: ClassVar[type | None] = ImageEvalConfig
    ipc: PositiveInt = 10

    def evaluate(self, ctx: RunContext, out: MethodOutput) -> dict:
        if out.result is None:
            return {}
        return evaluate_with_baselines(ctx.cfg, ctx.dm, out.result, ctx.trainer, out.init,
                                       out.extras.get("teacher_ckpt"))
