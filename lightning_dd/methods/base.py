"""The contract every method keeps: one class per method, built from its config node.

``conf/method/<name>.yaml`` names the class in ``_target_`` and holds every hyperparameter's
default; the class declares them as typed fields (a pydantic model), so
``hydra.utils.instantiate(cfg.method)`` builds the method and validates every value before any
data is read. The runner validates the rest of the run once (``net``, ``augment``, the method's
``eval`` schema, ``logger``, ``trainer``) into a :class:`RunContext` and calls
:meth:`Method.check`, then :meth:`Method.run`, :meth:`Method.save` and, for ``stage=all``,
:meth:`Method.evaluate`. The runner knows no method and no family by name; a method reads only the
typed context, never the raw config.

Each family has a base class (``lightning_dd.methods.images.base.ImageMethod``,
``lightning_dd.methods.graphs.graph_run.GraphMethod``, ...) that names the DataModule
:class:`typing.Protocol` it reads (``data_protocol``, checked before ``run``), its evaluator's
settings (``eval_schema``) and how its result saves itself. Adding a method::

    # my_pkg/my_method.py
    class MyMethod(ImageMethod):
        \"\"\"What it is (paper, arXiv id).\"\"\"
        lr: PositiveFloat                         # no default here: conf/method/my_method.yaml holds it
        def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
            ...                                   # LightningModules fitted with ctx.make_trainer(...)
            return MethodOutput(result=DistilledSet(...))

    # conf/method/my_method.yaml
    _target_: my_pkg.my_method.MyMethod
    name: my_method
    ipc: 10
    lr: 0.1

and ``python train.py method=my_method``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from lightning_dd.augment.dsa import AugmentSettings
from lightning_dd.core.config import LoggerSettings, Typed
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.io import check_checkpoint

log = logging.getLogger(__name__)

D = TypeVar("D")


@dataclass(frozen=True)
class RunContext(Generic[D]):
    """What a method gets from the runner: typed, resolved settings, validated before any data is read.

    Attributes:
        dm: the set-up DataModule (built from ``data._target_``); it satisfies the method's
            ``data_protocol``. ``None`` while :meth:`Method.check` runs (before any data is read).
        data: the resolved ``data`` node as a plain dict (recorded in artifacts, so that
            ``evaluate.py`` can rebuild the test set).
        net: the resolved ``net`` node (``{"name" | "_target_": ..., **kwargs}``, built with
            :func:`lightning_dd.nets.build_net_cfg`).
        eval: the validated ``eval`` node, an instance of the method's ``eval_schema`` (``None``
            when the method has none).
        augment: the validated ``augment`` node (DSA).
        logger: the validated ``logger`` node's image and periodic-evaluation settings.
        make_trainer: the Trainer factory from ``conf/trainer``; every stage builds its Trainer with it.
        out_dir: the run directory (Hydra's output dir). cache_dir: ``paths.cache_dir``.
        loggers: the run's Lightning loggers (CSV, W&B) for the method's main stage.
        seed, stage, resume, ckpt_path: the run's own keys.
    """

    dm: D
    data: dict
    net: dict
    eval: Any
    augment: AugmentSettings
    logger: LoggerSettings
    make_trainer: TrainerFactory
    out_dir: Path
    cache_dir: Path
    loggers: list = field(default_factory=list)
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
        result: the artifact to save (:meth:`Method.save`) and evaluate (a
            :class:`lightning_dd.results.DistilledSet`, a condensed graph, ...), or ``None``.
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
    """Base class of every method: typed hyperparameters as fields, :meth:`run`, :meth:`save` and
    :meth:`evaluate`.

    Class attributes:
        stages: the values ``stage`` may take for this method (``all`` runs everything and the
            evaluation; the others stop after that stage).
        eval_schema: the typed model of the ``eval`` node this method's evaluator reads
            (validated by the runner before any work, handed over as ``ctx.eval``); ``None`` = none.
        data_protocol: the :class:`typing.Protocol` (``runtime_checkable``) the DataModule must
            satisfy; the runner checks it before ``run``. ``None`` = any.
    """

    stages: ClassVar[tuple[str, ...]] = ("all",)
    eval_schema: ClassVar[type | None] = None
    data_protocol: ClassVar[type | None] = None
    name: str

    def check(self, ctx: RunContext) -> None:
        """Cross-key checks that need the rest of the run's settings (the net, the trainer), before
        any work; ``ctx.dm`` is ``None`` here. Raises :class:`lightning_dd.core.config.ConfigError`.
        Default: none."""

    def run(self, ctx: RunContext) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, ctx: RunContext, out: MethodOutput) -> None:
        """Write ``out``'s artifacts and pictures into ``ctx.out_dir`` (rank 0 only). Default: none
        (a method that writes its files during :meth:`run`)."""

    def evaluate(self, ctx: RunContext, out: MethodOutput) -> dict:
        """Flat metrics of ``out`` (``eval/<net>/acc_mean``, baselines, ...); default: none."""
        return {}
