"""The statistics-matching method class: squeeze -> recover (-> the evaluator relabels on the fly);
SRe2L, CDA and G-VBSM are configs of it (``conf/method/{sre2l,cda,gvbsm}.yaml``)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import ClassVar

import torch

from lightning_dd.core.config import ConfigError
from lightning_dd.data.protocols import ImageData
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.images.base import ImageMethod
from lightning_dd.methods.images.statistics_matching.config import RecoverConfig, TeacherConfig
from lightning_dd.methods.images.statistics_matching.recover import pixel_bounds, recover_batches
from lightning_dd.methods.images.statistics_matching.squeeze import load_teachers
from lightning_dd.methods.images.statistics_matching.statistics import Backbone, real_statistics
from lightning_dd.results import DistilledSet
from lightning_dd.training.devices import ACCELERATORS, require_ddp, run_device

log = logging.getLogger(__name__)


class StatisticsMatching(ImageMethod):
    """SRe2L (arXiv 2306.13092) / CDA (arXiv 2311.18838) / G-VBSM (arXiv 2311.17950): squeeze
    BatchNorm teachers, recover images by matching their statistics, relabel with the teacher
    (see the package doc for the algorithm and every deviation from the reference code).

    Fields: ``ipc``; ``teacher`` (:class:`~.config.TeacherConfig`); ``recover``
    (:class:`~.config.RecoverConfig`).

    Stages: ``squeeze`` (train/cache the teachers only), ``recover`` (squeeze + recover, the set
    saved, no evaluation), ``all`` (then the shared student evaluator with teacher KD).
    """

    stages: ClassVar[tuple[str, ...]] = ("all", "squeeze", "recover")
    teacher: TeacherConfig
    recover: RecoverConfig

    def check(self, ctx: RunContext) -> None:
        """Raises :class:`ConfigError` for ZCA data (images are clipped to valid pixels in the
        normalized space), an accelerator the teachers' own passes cannot run on, or a strategy
        other than one device / ``ddp`` (:func:`~lightning_dd.training.devices.require_ddp`: under
        ``ddp`` the batches are recovered in rounds of one per rank, :func:`~.recover.recover_batches`)."""
        require_ddp(ctx.make_trainer, f"statistics matching ({self.name})")
        if ctx.data.get("zca"):
            raise ConfigError("data.zca: statistics matching needs data.zca=false (images are clipped to valid "
                              "pixels in the normalized space)")
        acc = str(ctx.make_trainer.accelerator).lower()
        if acc not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator: statistics matching runs on {'|'.join(ACCELERATORS)}, got {acc!r}")

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        """Squeeze -> recover; returns the distilled set and the first teacher's checkpoint
        (``extras["teacher_ckpt"]``, the evaluator's KD teacher). ``stage=squeeze`` stops after
        the teachers (no result).

        The set's ``labels`` are the teacher's logits ``(N, K)`` on the whole images (``N = ipc *
        K``, class-major); the class each image was recovered as is ``meta["hard_labels"]``
        ``(N,)``, since the logits' argmax is the teacher's prediction and need not be that class.

        Raises:
            ValueError: ZCA data (:func:`~.recover.pixel_bounds`), a teacher without BatchNorm
                layers, a resume from batches of other settings.
        """
        dm, seed, out_dir = ctx.dm, ctx.seed, Path(ctx.out_dir)
        timings, metrics = {}, {}
        lo, hi = pixel_bounds(dm.preprocessing)  # fails early on ZCA data
        dev = run_device(ctx.make_trainer.accelerator)  # teachers, statistics and soft labels run here

        # 1. squeeze
        t0 = time.perf_counter()
        teachers = load_teachers(self.teacher, dm, Path(ctx.cache_dir) / "teachers", seed, ctx.make_trainer)
        timings["squeeze_s"] = time.perf_counter() - t0
        names = self.teacher.net_names()
        for i, t in enumerate(teachers):
            metrics[f"squeeze/{i}_{names[i]}/test_acc"] = t["test_acc"]
            metrics[f"timings/squeeze_{i}_{names[i]}_s"] = t["seconds"]  # 0 when cached
            log.info("teacher %d (%s): test acc %.2f%% (%s)", i, names[i], 100 * t["test_acc"],
                     "cached" if t["cached"] else f"trained in {t['seconds']:.0f}s")
        metrics["squeeze/teacher_test_acc"] = teachers[0]["test_acc"]
        metrics["squeeze/n_backbones"] = len(teachers)
        teacher_ckpt = str(teachers[0]["path"])
        if ctx.stage == "squeeze":
            return MethodOutput(timings=timings, metrics=metrics, extras={"teacher_ckpt": teacher_ckpt})

        # G-VBSM statistics of the real data (convolution statistics, per-class mean logits)
        rec = self.recover
        k = dm.num_classes
        n = self.ipc * k
        labels = torch.arange(n) % k  # labels cycle through the classes so every batch mixes them
        t0 = time.perf_counter()
        backbones = []
        try:  # the backbones' hooks stay on the teachers only while recovering
            for t in teachers:
                conv_t, class_logits = None, None
                if rec.r_conv > 0 or rec.r_logit > 0:
                    conv_t, class_logits = real_statistics(t, dm)
                backbones.append(Backbone(t["net"], conv_t if rec.r_conv > 0 else None,
                                          class_logits if rec.r_logit > 0 else None))
            timings["statistics_s"] = time.perf_counter() - t0

            # 2. recover, batch by batch
            t0 = time.perf_counter()
            r = recover_batches(rec, dm, backbones, labels, lo, hi, out_dir, seed=seed, trainer=ctx.make_trainer,
                                resume=ctx.resume, loggers=ctx.loggers, teacher_paths=[t["path"] for t in teachers])
        finally:
            for bb in backbones:
                bb.remove()
        timings["recover_s"] = time.perf_counter() - t0
        metrics.update(recover_metrics(r, names, rec.iterations))

        # class-major order (the framework's convention), teacher soft labels on the whole images
        x = torch.cat(r["images"])
        order = torch.argsort(labels * n + torch.arange(n))
        x, y = x[order], labels[order]
        teacher = teachers[0]["net"].to(dev).eval()
        with torch.no_grad():
            soft = torch.cat([teacher(p.to(dev)).float().cpu() for p in x.split(500)])
        metrics["recover/teacher_acc_on_synthetic"] = float((soft.argmax(1) == y).float().mean())

        result = DistilledSet(x, soft, None, dm.classes, dm.preprocessing.state(), method=self.name, ipc=self.ipc,
                              meta={"teacher_ckpt": teacher_ckpt, "recover_iterations": rec.iterations,
                                    "hard_labels": y.clone(),
                                    "labels": "labels: teacher logits on the whole images; meta['hard_labels']: the "
                                              "class each image was recovered as (labels.argmax(1) is the teacher's "
                                              "prediction, which can differ)"})
        return MethodOutput(result=result, extras={"teacher_ckpt": teacher_ckpt, "recover_history": r["history"]},
                            metrics=metrics, timings=timings)

    def save(self, ctx: RunContext[ImageData], out: MethodOutput) -> None:
        """The distilled set (``distilled.pt``, ``distilled.png``: :meth:`ImageMethod.save`) and the
        per-step history of every recovered batch, ``recover_history.json`` (a list of ``{"batch",
        "step", "loss_bn", "crop_scale_min", "backbones"}``; not written when empty)."""
        super().save(ctx, out)
        history = out.extras.get("recover_history")
        if history:
            (Path(ctx.out_dir) / "recover_history.json").write_text(json.dumps(history))


def recover_metrics(r: dict, names: list[str], iterations: int) -> dict:
    """The flat ``recover/*`` metrics of :func:`~.recover.recover_batches`' result ``r``: BN loss
    start -> end on the fixed views (first backbone, mean over batches) and on the whole images,
    every backbone's own (``recover/<i>_<name>/loss_bn_*``, ``names`` one per backbone), the
    minimum reduction over backbones, and the crop-scale / backbone sampling of the history."""
    m = {}
    bn_start, bn_end, bn_full = r["bn_start"], r["bn_end"], r["bn_full"]
    m["recover/loss_bn_start"] = sum(bn_start) / len(bn_start)
    m["recover/loss_bn_end"] = sum(bn_end) / len(bn_end)
    m["recover/loss_bn_reduction"] = m["recover/loss_bn_start"] / max(m["recover/loss_bn_end"], 1e-12)
    m["recover/loss_bn_whole_images_start"] = sum(f[0] for f in bn_full) / len(bn_full)
    m["recover/loss_bn_whole_images_end"] = sum(f[1] for f in bn_full) / len(bn_full)
    reductions = []
    for i, (ps, pe) in enumerate(zip(r["per_start"], r["per_end"])):  # fixed views, averaged over batches
        a, e = sum(ps) / len(ps), sum(pe) / len(pe)
        reductions.append(a / max(e, 1e-12))
        m[f"recover/{i}_{names[i]}/loss_bn_start"] = a
        m[f"recover/{i}_{names[i]}/loss_bn_end"] = e
        m[f"recover/{i}_{names[i]}/loss_bn_reduction"] = reductions[-1]
    m["recover/loss_bn_reduction_min_over_backbones"] = min(reductions)
    m["recover/iterations"] = iterations
    m["recover/n_batches"] = len(r["images"])
    history = r["history"]
    if history:
        m["recover/crop_scale_min_first"] = history[0]["crop_scale_min"]
        m["recover/crop_scale_min_last"] = history[-1]["crop_scale_min"]
        m["recover/backbones_used"] = len(sorted({i for h in history for i in h["backbones"]}))
        m["recover/backbones_per_iter"] = len(history[0]["backbones"])
    return m
