"""The step-checkpointed fit the families share: a LightningModule that draws its own batches,
fitted for a number of optimizer steps over a :class:`lightning_dd.data.batches.StepLoader`,
checkpointed every N steps and resumable from the last checkpoint."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.batches import StepLoader


def fit_steps(module: L.LightningModule, make_trainer: TrainerFactory, stage: str, steps: int,
              ckpt_dir: str | Path | None, ckpt_every: int, resume_from: str | None = None, loggers=None,
              callbacks: list[Callback] | tuple = (), log_every_n_steps: int = 10) -> L.Trainer:
    """Fit ``module`` for ``steps`` optimizer steps (``make_trainer(stage, max_steps=steps, ...)``,
    one epoch of a :class:`StepLoader` that starts at the module's ``global_step``, so a resumed fit
    continues at its step). With ``ckpt_dir``: Lightning's ``ModelCheckpoint`` writes
    ``<stage>-step=N.ckpt`` every ``ckpt_every`` steps (keeping the latest) and ``last.ckpt``.
    ``resume_from``: a checkpoint to continue from (``RunContext.resume_from``). Returns the
    Trainer (its ``global_step`` is the number of steps done)."""
    cbs = list(callbacks)
    if ckpt_dir is not None:
        cbs.insert(0, ModelCheckpoint(dirpath=ckpt_dir, filename=f"{stage}-{{step}}", every_n_train_steps=ckpt_every,
                                      save_last=True, save_top_k=1))
    trainer = make_trainer(stage, max_steps=steps, max_epochs=1, logger=loggers if loggers else False,
                           callbacks=cbs, log_every_n_steps=log_every_n_steps,
                           enable_checkpointing=ckpt_dir is not None)
    trainer.fit(module, StepLoader(steps, lambda: module.global_step), ckpt_path=resume_from)
    return trainer
