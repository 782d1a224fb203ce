"""One Trainer factory for every stage (experts, distillation, teachers, recovery, condensation,
evaluation), built from ``conf/trainer``: accelerator, devices, strategy and precision set there
reach every ``lightning.Trainer`` of a run.

Example::

    make = TrainerFactory(accelerator="auto", precision="bf16-mixed")
    trainer = make("distill", max_steps=100, logger=loggers)
"""
from __future__ import annotations

from typing import Any

import inspect

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class LogRowBeforeCheckpoint(Callback):
    """Writes a training step's logged row before that step's checkpoint.

    Lightning saves step checkpoints in ``ModelCheckpoint.on_train_batch_end`` and writes the
    step's row to the loggers only after every callback's ``on_train_batch_end`` (the fit loop's
    ``update_train_step_metrics``). A run killed between the two resumes after a step whose row was
    never written: the CSV log (and W&B) would miss it for good. This callback runs before every
    ``ModelCheckpoint`` (Lightning orders those last), makes the logger connector write the row at
    once, and has the loop's own write of the same step skipped, so each row is written once.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if not trainer.loggers:
            return
        connector = trainer._logger_connector
        connector.update_train_step_metrics()

        def skip_once() -> None:  # the loop's call for this step: already written; back to the method
            del connector.update_train_step_metrics

        connector.update_train_step_metrics = skip_once


class SafeTrainer(L.Trainer):
    """A ``lightning.Trainer`` whose :meth:`fit` resumes from ``ckpt_path`` with
    ``torch.load(weights_only=True)``: a checkpoint that would need arbitrary unpickling (code
    execution) is refused. Lightning 2.6 passes ``weights_only=None`` (torch's default, which an
    environment variable can turn unsafe), so every stage's Trainer sets it explicitly.
    It also carries :class:`LogRowBeforeCheckpoint`, so a killed run never resumes after a step whose
    logged row was lost."""

    _FIT_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(L.Trainer.fit).parameters

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        super().__init__(*args, callbacks=[LogRowBeforeCheckpoint(), *callbacks], **kwargs)

    def fit(self, *args, **kwargs):
        if self._FIT_TAKES_WEIGHTS_ONLY:
            kwargs.setdefault("weights_only", True)
        return super().fit(*args, **kwargs)


class TrainerFactory:
    """Builds the ``lightning.Trainer`` of each stage from the run-wide settings plus the stage's own.

    Args:
        accelerator, devices, strategy, precision, num_nodes: passed to every Trainer (Lightning's
            meaning); a stage cannot override them, so ``trainer.precision=bf16-mixed`` reaches all.
        enable_progress_bar: progress bars of the run's long stages; inner trainings (experts,
            evaluation runs) pass their own ``False``.
        compile: ``torch.compile`` networks where verified (read by the stages that train nets;
            not a Trainer argument).
        deterministic, benchmark: Lightning's flags, for every Trainer.
    """

    RUN_WIDE = ("accelerator", "devices", "strategy", "precision", "num_nodes")

    def __init__(self, accelerator: str = "auto", devices: Any = 1, strategy: Any = "auto",
                 precision: Any = "32-true", num_nodes: int = 1, enable_progress_bar: bool = True,
                 compile: bool = False, deterministic: Any = None, benchmark: Any = None):
        self.accelerator, self.devices, self.strategy = accelerator, devices, strategy
        self.precision, self.num_nodes = precision, num_nodes
        self.enable_progress_bar, self.compile = enable_progress_bar, compile
        self.deterministic, self.benchmark = deterministic, benchmark

    def kwargs(self) -> dict:
        """The run-wide Trainer arguments."""
        return {"accelerator": self.accelerator, "devices": self.devices, "strategy": self.strategy,
                "precision": self.precision, "num_nodes": self.num_nodes}

    def __call__(self, stage: str, **stage_kwargs) -> L.Trainer:
        """A Trainer (:class:`SafeTrainer`: resumes load with ``weights_only=True``) for ``stage`` (a label: experts, distill, evaluate, ...) with the stage's own arguments
        (``max_steps``, ``logger``, ``callbacks``, ...); defaults: no logger, no checkpointing,
        no model summary, no sanity validation, the factory's progress-bar setting.

        Raises:
            ValueError: when the stage tries to set a run-wide argument.
        """
        clash = sorted(set(stage_kwargs) & set(self.RUN_WIDE))
        if clash:
            raise ValueError(f"stage {stage!r} sets {clash}: these come from conf/trainer (trainer.<key>=...)")
        kw = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              "num_sanity_val_steps": 0, "enable_progress_bar": self.enable_progress_bar,
              "deterministic": self.deterministic, "benchmark": self.benchmark, **stage_kwargs}
        return SafeTrainer(**self.kwargs(), **kw)


def release_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if a DDP fit left one, at the end of a
    run: Lightning keeps it for the process's lifetime, and a gloo group still alive at interpreter
    exit can abort the process (``terminate called without an active exception``, exit code -6)
    after all its work is done. A later fit in the same process (a Hydra sweep) initializes a new one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
