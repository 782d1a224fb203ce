"""QAT-ViT as a framework method: FP model -> PTQ baseline -> QAT with and without the
variation-aware regularizer -> integer export, per-layer report and test accuracies
(Huang et al., arXiv 2307.00331, TMLR 2024). See the package docstring for the pieces."""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import lightning as L
import torch
from pydantic import Field

from lightning_dd.core.config import ConfigError, Fraction, NonNegFloat, NonNegInt, PositiveInt
from lightning_dd.data.batches import batch_loader
from lightning_dd.data.protocols import ImageData, ImageFolderData
from lightning_dd.io import atomic_save, atomic_write_text, cache_key, load_cache, load_dict, require_keys, safe_load, save_cache
from lightning_dd.methods.base import Method, MethodOutput, RunContext
from lightning_dd.methods.quantization.qat_vit.model import (calibrate, export_quantized, load_quantized, quantize_vit,
                                                             quantized_layers, quantizers)
from lightning_dd.methods.quantization.qat_vit.regularizer import within_bin_variance
from lightning_dd.methods.quantization.qat_vit.training import Pass, QATModule, fp_module, fp_spec, images_per_step
from lightning_dd.nets import build_net_cfg
from lightning_dd.nets.vit import ViT, load_vit_state
from lightning_dd.nets.weight_selection import weight_selection
from lightning_dd.quiet import quiet_lightning
from lightning_dd.training.devices import run_device
from lightning_dd.training.metrics import accuracy
from lightning_dd.training.optim import OptimizerFactory, ScheduleFactory

log = logging.getLogger(__name__)

Bits = Annotated[int, Field(ge=2, le=8)]


class QATViT(Method):
    """Variation-aware low-bit QAT of a ViT (``conf/method/qat_vit.yaml``; the net is ``net``, a
    :class:`lightning_dd.nets.vit.ViT` (DeiT) or :class:`lightning_dd.nets.swin.Swin`).

    Stages: ``fp`` (train or load the FP model; cached under ``paths.cache_dir/qat_vit_fp``),
    ``ptq`` (+ calibrated post-training quantization), ``qat`` (+ QAT without and with the
    regularizer, export to ``quantized.pt``, per-layer report ``layers.csv`` / ``layers.json``),
    ``all`` (+ test accuracies: ``eval/{fp,ptq,qat_noreg,qat}/acc`` and ``eval/qat/export_acc``).

    Fields (defaults = the paper's DeiT/ImageNet settings):
        bits / act_bits: weight / activation bits of the blocks (``act_bits`` null = ``bits``);
            keep_bits: patch embedding and head. grad_scale: step-gradient convention.
        fp_ckpt: an FP checkpoint (ours ``{"state_dict"}``, or timm/DeiT with fused qkv, optionally
            under ``"model"``) instead of training one; loaded strictly.
        fp_*: FP training (``fp_optimizer`` and per-step ``fp_scheduler``, config partials: AdamW,
            ``fp_warmup_epochs`` of warmup then cosine; crop/flip, label smoothing); ``fp_seed``: its
            seed (null = the run's ``seed``; a number lets runs of several seeds quantize one
            cached FP model, as the paper's runs all start from one pretrained DeiT).
        fp_init_from / fp_init: weight selection (arXiv 2311.18823): initialize the FP model from a
            larger ViT checkpoint instead of at random.
        epochs, optimizer (a config partial: AdamW; its lr is the peak of the reference's per-pass
            cosine), batch_size (views per step = images x num_crops), num_crops,
            crop_scale, warmup_epochs: QAT, in the reference's epoch arithmetic (a ``num_crops``-view
            pass counts as ``num_crops`` epochs; the last ones train single-crop:
            :func:`~.training.qat_passes`). reg_weight / reg_start: the regularizer's peak weight
            and the training fraction before it starts.
        calib_images: images of the batch that calibrates the activation steps.
        eval_per_class: test accuracies on this many test images per class (the first ones; null =
            the whole test set; CPU presets only, to keep six evaluations cheap).
        stream_train: read the training images from disk through the DataModule's
            ``streaming_dataset("train")`` (ImageNet; every view its own random-resized crop of the
            original image) instead of the in-memory tensors; ``loader_workers`` workers;
            ``stream_per_class`` files per class (null = all; independent of ``data.train_per_class``,
            which then only sizes the in-memory calibration sample).
        baselines: ``ptq`` and/or ``qat_noreg``, run in the same run.
    """

    stages: ClassVar[tuple[str, ...]] = ("fp", "ptq", "qat", "all")
    data_protocol: ClassVar[type] = ImageData
    name: str
    bits: Bits
    act_bits: Bits | None
    keep_bits: Bits
    grad_scale: Literal["reference", "lsq"]
    fp_ckpt: str | None
    fp_init_from: str | None
    fp_epochs: PositiveInt
    fp_batch_size: PositiveInt
    fp_optimizer: OptimizerFactory
    fp_scheduler: ScheduleFactory
    fp_warmup_epochs: NonNegInt
    fp_seed: NonNegInt | None
    label_smoothing: Fraction
    drop_path: Fraction
    epochs: PositiveInt
    optimizer: OptimizerFactory
    batch_size: PositiveInt
    num_crops: PositiveInt
    crop_scale: tuple[Fraction, Fraction]
    warmup_epochs: NonNegInt
    reg_weight: NonNegFloat
    reg_start: Fraction
    calib_images: PositiveInt
    stream_train: bool
    stream_per_class: PositiveInt | None
    eval_per_class: PositiveInt | None
    loader_workers: NonNegInt
    baselines: list[Literal["ptq", "qat_noreg"]]

    def check(self, ctx: RunContext) -> None:
        from hydra.utils import get_class

        from lightning_dd.methods.quantization.qat_vit.model import QUANTIZABLE

        target = str(ctx.net.get("_target_", ""))
        try:  # a net built by name (no _target_, e.g. ConvNet) is not quantizable either
            ok = bool(target) and issubclass(get_class(target), QUANTIZABLE)
        except (ImportError, ValueError, TypeError):  # not a class path at all
            ok = False
        if not ok:
            raise ConfigError("net: QAT-ViT quantizes a lightning_dd.nets.vit.ViT or nets.swin.Swin (net=vit_tiny_cifar, "
                              f"deit_tiny, swin_tiny); got {target or ctx.net.get('name')!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"method.crop_scale: need 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if self.batch_size < self.num_crops:
            raise ConfigError(f"method.batch_size ({self.batch_size}) is the number of views per step: at least "
                              f"num_crops ({self.num_crops})")

    # ------------------------------------------------------------------------------------ stages

    def _net_cfg(self, ctx: RunContext) -> dict:
        return {**ctx.net, "drop_path": self.drop_path}

    def _build(self, ctx: RunContext, net_cfg: dict) -> ViT:
        dm = ctx.dm
        return build_net_cfg(net_cfg, dm.image_shape[0], dm.num_classes, dm.image_shape[1:])

    def fp_model(self, ctx: RunContext) -> tuple[ViT, dict]:
        """The FP ViT: ``fp_ckpt`` loaded strictly (fused qkv split), else trained once and cached.
        Returns ``(net in eval mode on the run's device, info)``."""
        dm, dev, net_cfg = ctx.dm, run_device(ctx.make_trainer.accelerator), self._net_cfg(ctx)
        if self.fp_ckpt:
            d = safe_load(self.fp_ckpt, "FP checkpoint (method.fp_ckpt)")
            state = d.get("state_dict", d.get("model", d)) if isinstance(d, dict) else None
            if not isinstance(state, dict):
                raise ValueError(f"{self.fp_ckpt}: not a state dict nor a dict holding one")
            net = load_vit_state(self._build(ctx, net_cfg), state)
            return net.to(dev).eval(), {"path": self.fp_ckpt, "cached": True, "seconds": 0.0}
        fp_seed = ctx.seed if self.fp_seed is None else self.fp_seed
        spec = {"data": dm.identity(), "net": net_cfg, "seed": fp_seed, "epochs": self.fp_epochs,
                "batch": self.fp_batch_size, "warmup": self.fp_warmup_epochs,
                **fp_spec(self.fp_optimizer, self.fp_scheduler),
                "ls": self.label_smoothing, "init_from": self.fp_init_from,
                "stream": [self.stream_train, self.stream_per_class] if self.stream_train else None}
        path = Path(ctx.cache_dir) / "qat_vit_fp" / cache_key(spec) / "fp.pt"
        built = {}

        def check(d):  # weights that do not fit the net make the entry unusable (ValueError): retrained
            require_keys("net_cfg", "state_dict")(d)
            built["net"] = load_vit_state(self._build(ctx, net_cfg), d["state_dict"])

        if load_cache(path, "cached FP ViT", check) is not None:  # None: missing, or unusable (deleted)
            log.info("FP ViT from the cache %s", path)
            return built["net"].to(dev).eval(), {"path": str(path), "cached": True, "seconds": 0.0}
        quiet_lightning()
        L.seed_everything(fp_seed, verbose=False)
        t0 = time.perf_counter()
        net = self._build(ctx, net_cfg)
        if self.fp_init_from:
            src = load_dict(self.fp_init_from, ("state_dict",), "weight-selection source (method.fp_init_from)")
            weight_selection(net, src["state_dict"])  # fused (timm, official) or separate q/k/v
        loader = self._loader(ctx, self.fp_batch_size, fp_seed)
        steps = self.fp_epochs * len(loader)
        module = fp_module(net, self.fp_optimizer, self.fp_scheduler, steps, self.fp_warmup_epochs * len(loader),
                           dm.image_shape[1:], self.label_smoothing)
        ctx.make_trainer("fp", max_epochs=self.fp_epochs, logger=ctx.loggers).fit(module, loader)
        net = net.to(dev).eval()
        secs = time.perf_counter() - t0
        acc = accuracy(net, dm.test_images, dm.test_labels) if self.eval_per_class is None else None
        save_cache({"net_cfg": net_cfg, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "test_acc": acc, "spec": spec, "seconds": secs}, path)
        atomic_write_text(json.dumps(spec, indent=1, sort_keys=True, default=str), path.parent / "spec.json")
        log.info("FP ViT: %d epochs in %.0fs -> %s", self.fp_epochs, secs, path)
        return net, {"path": str(path), "cached": False, "seconds": secs}

    def _loader(self, ctx: RunContext, batch: int, seed: int | None = None, views: int | None = None):
        """Training batches ``(x, y (B,))``, shuffled by ``seed`` (null = the run's): in-memory
        tensors ``x (B, C, H, W)``, or streamed from disk: ``x (B, C, H, W)`` one standard crop
        per image (``views`` None), or ``x (B, views, C, H, W)``, each view its own random-resized
        crop (``crop_scale``) of the original image. Every pass ends with a smaller last batch."""
        seed = ctx.seed if seed is None else seed
        if not self.stream_train:
            return batch_loader(ctx.dm.train_images, ctx.dm.train_labels, batch, epochs=1, seed=seed)
        from lightning_dd.data.imagenet import image_folder_dataset

        dm = ctx.dm
        if not isinstance(dm, ImageFolderData):
            raise ConfigError(f"method.stream_train: {type(dm).__name__} is not an image-folder DataModule")
        ds = image_folder_dataset(dm.root, "train", dm.layout, dm.image_size, dm.resize_size, self.stream_per_class,
                                  dm.subset_seed, views=views, scale=tuple(self.crop_scale))
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=False,
                                           generator=torch.Generator().manual_seed(seed),
                                           num_workers=self.loader_workers)

    def ptq(self, ctx: RunContext, fp: ViT) -> ViT:
        """Post-training quantization: :func:`quantize_vit` of ``fp``, weight steps by the MSE fit,
        activation steps from the first ``calib_images`` training images (no training)."""
        q = quantize_vit(fp, self.bits, self.act_bits, self.keep_bits, self.grad_scale)
        g = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(len(ctx.dm.train_images), generator=g)[: self.calib_images]
        return calibrate(q, ctx.dm.train_images[idx])

    def qat(self, ctx: RunContext, fp: ViT, init: ViT, reg_weight: float, prefix: str) -> tuple[ViT, QATModule]:
        """QAT of a copy of ``init`` (the calibrated PTQ model) against ``fp``, with ``reg_weight``,
        over the reference's passes (:func:`~.training.qat_passes`)."""
        import copy

        quiet_lightning()
        L.seed_everything(ctx.seed, verbose=False)
        student = copy.deepcopy(init).train()

        def loader_for(p: Pass):
            k = module.current_epoch
            return self._loader(ctx, images_per_step(self.batch_size, self.num_crops, p.crops),
                                ctx.seed * 100_003 + k, views=p.crops)

        module = QATModule(student, fp, self.optimizer, self.epochs, self.num_crops, self.warmup_epochs,
                           loader_for, self.crop_scale, reg_weight, self.reg_start, prefix, ctx.seed)
        ctx.make_trainer(prefix, max_epochs=len(module.passes), reload_dataloaders_every_n_epochs=1,
                    logger=ctx.loggers).fit(module)
        return student.eval(), module

    def run(self, ctx: RunContext) -> MethodOutput:
        timings, metrics, models = {}, {}, {}
        t0 = time.perf_counter()
        fp, info = self.fp_model(ctx)
        timings["fp_s"] = time.perf_counter() - t0
        models["fp"] = fp
        extras = {"models": models, "fp_path": info["path"]}
        if ctx.stage == "fp":  # the FP model's test accuracy still reported (weight selection compares it)
            xs, ys = self._test_set(ctx)
            acc = accuracy(fp, xs, ys)
            log.info("FP ViT: test accuracy %.2f%% on %d images", 100 * acc, len(ys))
            return MethodOutput(extras=extras, timings=timings, metrics={"eval/fp/acc": acc})
        t0 = time.perf_counter()
        ptq = self.ptq(ctx, fp)
        timings["ptq_s"] = time.perf_counter() - t0
        models["ptq"] = ptq
        if ctx.stage == "ptq":
            return MethodOutput(extras=extras, timings=timings)
        trained = {}
        runs = [("qat_noreg", 0.0)] if "qat_noreg" in self.baselines else []
        for prefix, reg in runs + [("qat", self.reg_weight)]:
            t0 = time.perf_counter()
            model, module = self.qat(ctx, fp, ptq, reg, prefix)
            timings[f"{prefix}_s"] = time.perf_counter() - t0
            models[prefix], trained[prefix] = model, module
            metrics.update(self._variation(model, module, prefix))
        extras["export"] = export_quantized(models["qat"], self._net_cfg(ctx), self.bits, self.act_bits or self.bits,
                                            self.keep_bits, self.grad_scale)
        extras["osc_rates"] = {k: m.last_rates for k, m in trained.items()}
        return MethodOutput(extras=extras, metrics=metrics, timings=timings)

    def save(self, ctx: RunContext, out: MethodOutput) -> None:
        """After stage ``qat`` or ``all``: the integer export ``quantized.pt``
        (:func:`~.model.export_quantized`) and the per-quantizer report ``layers.csv`` /
        ``layers.json`` of the PTQ and QAT models (:meth:`_report`); nothing after ``fp`` / ``ptq``."""
        if "export" not in out.extras:
            return
        atomic_save(out.extras["export"], ctx.out_dir / "quantized.pt")
        self._report(ctx.out_dir, out.extras["models"], out.extras["osc_rates"])

    # ------------------------------------------------------------------------------ measurements

    def _variation(self, model: ViT, module: QATModule, prefix: str) -> dict:
        """Mean within-bin variance and oscillation rate (last epoch) over the target-bit layers."""
        layers = {n: m for n, m in quantized_layers(model).items() if m.wq.bits == self.bits}
        var = [within_bin_variance(m.weight, m.wq.step, m.wq.qn, m.wq.qp) for m in layers.values()]
        rates = module.last_rates
        osc = [rates[n] for n in layers if n in rates]
        return {f"{prefix}/bin_var": sum(var) / max(1, len(var)), f"{prefix}/osc_rate": sum(osc) / max(1, len(osc))}

    def _report(self, out_dir: Path, models: dict, osc_rates: dict) -> None:
        """``layers.csv`` / ``layers.json``: one row per quantizer of the QAT model(s) and PTQ
        (``osc_rates``: per QAT model, its layers' oscillation rates in the last pass)."""
        rows = []
        for which in ("ptq", "qat_noreg", "qat"):
            if which not in models:
                continue
            model = models[which]
            rates = osc_rates.get(which, {})
            layers = quantized_layers(model)
            for name, q in quantizers(model).items():
                owner = name.rsplit(".", 1)[0]
                row = {"model": which, "quantizer": name, "kind": q.kind, "bits": q.bits, "signed": q.signed,
                       "step": float(q.step.detach()), "offset": float(q.beta.detach()) if q.beta is not None else 0.0,
                       "bin_var": "", "quant_mse": "", "osc_rate": ""}
                if q.kind == "weight" and owner in layers:
                    w = layers[owner].weight.detach()
                    row["bin_var"] = within_bin_variance(w, q.step.detach(), q.qn, q.qp)
                    row["quant_mse"] = float(((q(w) - w) ** 2).mean() / (q.step.detach() ** 2))
                    row["osc_rate"] = rates.get(owner, "")
                rows.append(row)
        with open(out_dir / "layers.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        (out_dir / "layers.json").write_text(json.dumps(rows, indent=1))

    def _test_set(self, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The test images ``(N, C, H, W)`` and labels ``(N,)`` accuracies are measured on: the
        first ``eval_per_class`` of every class, or all."""
        xs, ys = ctx.dm.test_images, ctx.dm.test_labels
        if self.eval_per_class:
            keep = torch.cat([(ys == c).nonzero().flatten()[: self.eval_per_class] for c in range(ctx.dm.num_classes)])
            xs, ys = xs[keep], ys[keep]
        return xs, ys

    def evaluate(self, ctx: RunContext, out: MethodOutput) -> dict:
        """Test accuracy (fraction) of every model of the run, ``eval/<model>/acc`` (PTQ only when
        ``ptq`` is in ``baselines``), and of the integer export (the dict :meth:`save` writes to
        ``quantized.pt``, rebuilt by :func:`~.model.load_quantized`): ``eval/qat/export_acc`` and
        ``eval/qat/export_agree`` (share of test predictions equal to the fake-quantized model's;
        1.0 expected)."""
        dm, res = ctx.dm, {}
        dev = run_device(ctx.make_trainer.accelerator)
        xs, ys = self._test_set(ctx)
        if self.eval_per_class:
            res["eval/test_images"] = len(ys)
        for name, model in out.extras.get("models", {}).items():
            if name == "ptq" and "ptq" not in self.baselines:  # QAT's start, reported in layers.csv only
                continue
            res[f"eval/{name}/acc"] = accuracy(model.to(dev), xs, ys)
        export = out.extras.get("export")
        if export is not None:
            q = load_quantized(export, dm.image_shape[0], dm.num_classes, dm.image_shape[1:]).to(dev)
            ref = out.extras["models"]["qat"].to(dev).eval()
            agree = correct = 0
            with torch.no_grad():
                for x, y in zip(xs.split(500), ys.split(500)):
                    pq = q(x.to(dev)).argmax(1).cpu()
                    agree += int((pq == ref(x.to(dev)).argmax(1).cpu()).sum())
                    correct += int((pq == y).sum())
            res["eval/qat/export_acc"] = correct / max(1, len(ys))
            res["eval/qat/export_agree"] = agree / max(1, len(ys))
        return res
