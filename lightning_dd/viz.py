"""Pictures of synthetic sets: image grids saved as PNG and logged to W&B during distillation."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def image_grid(images: torch.Tensor, preprocessing, nrow: int) -> torch.Tensor:
    """``(N, C, H, W)`` model-space images -> ``(3, H', W')`` grid in [0, 1] (ZCA undone, clipped)."""
    import torchvision

    x = preprocessing.inverse(images.detach().float().cpu()).clamp(0, 1)
    if x.shape[-1] < 32:  # upsample tiny images (digits) so the grid is readable
        x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    return torchvision.utils.make_grid(x, nrow=nrow, padding=1, pad_value=1.0)


def save_grid(images: torch.Tensor, preprocessing, path: str | Path, nrow: int) -> None:
    import torchvision

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(image_grid(images, preprocessing, nrow), str(path))


class SyntheticImageLogger(L.Callback):
    """Every ``every`` training steps (and at the end), save the module's ``images`` as a PNG grid
    and log it to W&B (key ``synthetic_images``) when a W&B logger is attached."""

    def __init__(self, preprocessing, out_dir: str | Path, every: int, nrow: int):
        self.pre, self.out_dir, self.every, self.nrow = preprocessing, Path(out_dir), every, nrow

    def _log(self, trainer, module):
        images = getattr(module, "images", None)
        if images is None:
            return
        step = trainer.global_step
        save_grid(images, self.pre, self.out_dir / f"step_{step:06d}.png", self.nrow)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image("synthetic_images", [image_grid(images, self.pre, self.nrow)], step=step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self._log(trainer, module)

    def on_train_end(self, trainer, module):
        self._log(trainer, module)


class PeriodicEvaluation(L.Callback):
    """Every ``every`` training steps, evaluate the module's current set (``module.current_set()``
    -> ``(images, labels, lr)``) with ``evaluate(images, labels, lr) -> accuracy`` and log it as
    ``distill/eval_acc`` (MTT/DATM's periodic evaluation during distillation)."""

    def __init__(self, evaluate, every: int):
        self.evaluate, self.every = evaluate, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every or step % self.every or not hasattr(module, "current_set"):
            return
        acc = float(self.evaluate(*module.current_set()))
        for lg in trainer.loggers:
            lg.log_metrics({"distill/eval_acc": acc}, step=step)
