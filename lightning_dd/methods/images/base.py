"""The image family's base class: a method whose result is a :class:`lightning_dd.results.DistilledSet`
of images, read from an :class:`lightning_dd.data.protocols.ImageData` DataModule and judged by the
shared student evaluator with its baselines (``eval`` node:
:class:`lightning_dd.evaluate.images.ImageEvalConfig`)."""
from __future__ import annotations

from typing import ClassVar

from lightning.pytorch.callbacks import Callback

from lightning_dd.core.config import PositiveInt
from lightning_dd.data.protocols import ImageData
from lightning_dd.evaluate.images import ImageEvalConfig, ImageEvaluator
from lightning_dd.methods.base import Method, MethodOutput, RunContext
from lightning_dd.viz import PeriodicEvaluation, SyntheticImageLogger, save_grid


class ImageMethod(Method):
    """Base of the image family (see the module docstring).

    ``MethodOutput.extras["teacher_ckpt"]`` (optional): a teacher the evaluator uses for KD when
    ``eval.teacher_ckpt`` is unset.

    Fields:
        ipc: images per class of the result.
    """

    eval_schema: ClassVar[type | None] = ImageEvalConfig
    data_protocol: ClassVar[type | None] = ImageData
    ipc: PositiveInt

    @staticmethod
    def evaluator(ctx: RunContext[ImageData]) -> ImageEvaluator:
        """The run's image evaluator: ``ctx.eval`` with the run's net, DSA and Trainer factory."""
        return ImageEvaluator(ctx.eval, ctx.net, ctx.augment.build_dsa(), ctx.make_trainer)

    def callbacks(self, ctx: RunContext[ImageData]) -> list[Callback]:
        """The main stage's run-level callbacks: the synthetic-image grid every ``logger.image_every``
        iterations (``<out_dir>/images/``, and W&B) and, with ``logger.eval_every > 0``, a one-seed
        evaluation of the current set every that many iterations (``distill/eval_acc``)."""
        dm = ctx.dm
        cbs: list[Callback] = [SyntheticImageLogger(dm.preprocessing, ctx.out_dir / "images", ctx.logger.image_every,
                                                    nrow=self.ipc, classes=dm.classes)]
        if ctx.logger.eval_every:
            ev, epochs = self.evaluator(ctx), ctx.logger.eval_epochs
            cbs.append(PeriodicEvaluation(lambda x, y, lr: ev.quick(dm, x, y, lr, epochs), ctx.logger.eval_every))
        return cbs

    def save(self, ctx: RunContext[ImageData], out: MethodOutput) -> None:
        """``distilled.pt`` (the set, with the data and net configs that ``evaluate.py`` rebuilds the
        test set and the network from) and ``distilled.png`` (the set, one row per class)."""
        result = out.result
        if result is None:
            return
        result.meta["data"] = dict(ctx.data)
        result.meta["net"] = dict(ctx.net)
        result.save(ctx.out_dir / "distilled.pt")
        save_grid(result.images, ctx.dm.preprocessing, ctx.out_dir / "distilled.png", labels=result.hard_labels(),
                  classes=result.classes, title=f"{result.method}, IPC {result.ipc}")

    def evaluate(self, ctx: RunContext[ImageData], out: MethodOutput) -> dict:
        if out.result is None:
            return {}
        return self.evaluator(ctx).with_baselines(ctx.dm, out.result, out.init, out.extras.get("teacher_ckpt"))
