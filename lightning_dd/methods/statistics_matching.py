"""Statistics matching: SRe2L (arXiv 2306.13092), CDA (arXiv 2311.18838) and G-VBSM (arXiv 2311.17950).

SRe2L ("Squeeze, Recover and Relabel") decouples distillation into three stages:

1. **Squeeze** (SRe2L Sec. 3.1): train a BatchNorm teacher on the real data (a LightningModule,
   :class:`TeacherModule`), cached under ``paths.cache_dir/teachers/<key>`` keyed by the data's
   identity and every training setting; or load ``method.teacher.ckpt``.
2. **Recover** (SRe2L Sec. 3.2, Eq. 5-7): optimize synthetic images from noise with Adam and a
   cosine lr so that the teacher classifies them as their class (cross-entropy) while the batch
   statistics at every BatchNorm layer match the layer's running statistics:
   ``R_BN(x) = sum_l ||mu_l(x) - running_mean_l||_2 + ||sigma_l^2(x) - running_var_l||_2``,
   the first layer weighted ``first_bn_multiplier`` times (the reference code's 10), total loss
   ``CE + r_bn * R_BN``. Each step sees a random jitter (roll), flip and random-resized crop of the
   images (SRe2L's "multi-crop optimization", Sec. 3.2). Images are recovered in batches of
   ``recover.batch`` (each batch mixes all classes, so that its statistics resemble the real
   data's); every batch is its own LightningModule fit (:class:`RecoverModule`), checkpointed
   every ``recover.ckpt_every`` steps and resumable with ``resume=true``. Finished batches
   (``recover/batch_XXX.pt``) and checkpoints record the settings that determine the batch
   (:func:`recover_settings`) and its per-step history; a resume refuses those of other settings
   (:func:`check_settings`) and writes the history of every batch to ``recover_history.json``.
   * **CDA** (Sec. 3): the random-resized crop's lower scale bound follows an easy-to-hard
     curriculum, from ``crop_scale[1]`` (whole images) down to ``crop_scale[0]`` (0.08), by a
     ``cosine`` | ``linear`` | ``step`` schedule reaching its end at ``milestone`` x iterations
     (:func:`crop_scale_min`).
   * **G-VBSM** (Sec. 3): several backbones (``teacher.nets``); each step samples
     ``backbones_per_iter`` of them and takes the *mean* of their losses (every term: CE, BN, conv,
     logit; :meth:`RecoverModule.losses`). G-VBSM sums them; with a fixed number of sampled
     backbones the mean is the sum times a constant ``1 / backbones_per_iter``, which Adam's
     update (gradient over its running RMS) does not see except through ``eps``, so the two
     recover the same images; the recorded numbers used the mean. Besides BN statistics it matches
     convolution statistics (per-channel mean/var of every conv output, precomputed once on the
     real data, :func:`conv_statistics`; weight ``r_conv``) and the real data's per-class mean
     logits (``r_logit``, MSE), a simplified form of its soft-label/logit matching. The BN/conv
     losses of the backbones enter that mean as they are (``backbone_norm=none``) or rescaled to the
     first backbone's scale on the initial batch (``start``, :func:`backbone_weights`); a net's own
     ``epochs`` key overrides ``teacher.epochs``. ``metrics.json`` gets every backbone's BN loss
     start -> end (``recover/<i>_<name>/loss_bn_*``).
3. **Relabel** (SRe2L Sec. 3.3, FKD arXiv 2112.01528): the framework's student evaluator uses the
   on-the-fly form: the teacher's logits on each augmented batch (``eval.label_mode=teacher``),
   with the teacher this method returns. Only when asked (``relabel.epochs`` > 0; default 0, as
   nothing in the framework reads it) are FKD's stored labels written: per epoch and image, one
   random-resized crop + flip and the teacher's top-k probabilities on it (:func:`relabel_fkd`,
   ``fkd_labels.pt``), so a student can replay exactly those crops and targets
   (:func:`replay_fkd`).

The teachers, their statistics passes and test accuracy, the soft labels and the relabeling run
on the run's device (``trainer.accelerator``, :func:`run_device`), like the Lightning fits.

Deviations from the reference code (SRe2L's ``recover_cifar.py`` / ImageNet recovery, CDA's
``recover_cda_in1k.py``, G-VBSM's recovery), kept on purpose and documented here:

* **Jitter**: the roll offsets are drawn from ``U{-j, ..., j}`` per axis; the reference code draws
  ``random.randint(0, j)``, i.e. ``U{0, ..., j}`` (a circular roll, so the two differ only in the
  range of offsets: ``2j + 1`` instead of ``j + 1`` values). The roll is applied before the crop
  here; CDA's code crops first and rolls the crop.
* **Crops and flips per image**: every image of a batch gets its own random-resized crop and flip
  (:func:`sample_crops`); the reference code applies torchvision's ``RandomResizedCrop`` and
  ``RandomHorizontalFlip`` to the whole batch tensor, i.e. one crop box and one flip per step
  for all images.
* **First-layer multiplier on conv statistics**: ``first_bn_multiplier`` weights the first BN
  layer's term (as SRe2L) and, in G-VBSM's conv loss, also the first conv layer's term
  (:meth:`StatsHooks.loss`); SRe2L has no conv term, and G-VBSM's code applies its first-layer
  multiplier once, to the first layer of its combined list of BN and conv hooks.

Images live in model space (the DataModule's normalization), clipped to the valid pixel range
after every step. The BN-statistics loss before and after recovery (``recover/loss_bn_start``,
``recover/loss_bn_end`` in ``metrics.json``) is measured on the same fixed augmented views
(:func:`bn_loss_views`), i.e. on the objective recovery minimizes; the loss of the whole,
un-augmented images is reported beside it (``recover/loss_bn_whole_images_*``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from lightning_dd.data.batches import batch_loader
from lightning_dd.data.readers import atomic_save
from lightning_dd.methods.experts import experts_key
from lightning_dd.nets import build_net, load_net_file
from lightning_dd.quiet import quiet_lightning
from lightning_dd.results import DistilledSet

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Augmentation with explicit parameters (replayable): random-resized crops, flips, jitter
# ----------------------------------------------------------------------------------------------
def sample_crops(n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), trials: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes, torchvision's algorithm vectorized over ``n`` images: area
    fraction ~ U(scale), log aspect ratio ~ U(log ratio), the first of ``trials`` draws that fits,
    else the whole image.

    Returns:
        ``(n, 4)`` float32 boxes ``(x0, y0, x1, y1)`` in pixels, inclusive corners.

    Raises:
        ValueError: ``scale`` not within ``(0, 1]`` or decreasing.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    area = height * width
    u = torch.rand(n, trials, 4, generator=generator)
    target = area * (lo + (hi - lo) * u[..., 0])
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(logr)
    w = torch.sqrt(target * ar).round()
    h = torch.sqrt(target / ar).round()
    ok = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    x0 = (u[rows, pick, 2] * (width - w + 1)).floor().clamp(max=width - w)
    y0 = (u[rows, pick, 3] * (height - h + 1)).floor().clamp(max=height - h)
    full = first < 0
    w, h = torch.where(full, float(width), w), torch.where(full, float(height), h)
    x0, y0 = torch.where(full, 0.0, x0), torch.where(full, 0.0, y0)
    return torch.stack([x0, y0, x0 + w - 1, y0 + h - 1], 1).float()


CROP_SCHEDULES = ("none", "cosine", "linear", "step")


def _whole(boxes: torch.Tensor, height: int, width: int) -> bool:
    """Whether every box of :func:`sample_crops` is the whole image (always so at scale 1)."""
    return bool((boxes == torch.tensor([0.0, 0.0, width - 1.0, height - 1.0])).all())


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box and resize it back to ``(H, W)`` (bilinear), mirrored where
    ``flips``: one batched ``affine_grid`` + ``grid_sample`` (differentiable in ``images``; the
    same sampling as kornia's ``crop_and_resize`` with ``align_corners=True`` at about half its
    cost on CPU, which matters in a loop of thousands of recovery steps).

    Args:
        images: ``(N, C, H, W)``. boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` pixels (see :func:`sample_crops`).
        flips: ``(N,)`` bool or ``None``.

    Returns:
        ``(N, C, H, W)``; ``images`` itself when no image is flipped and every box is the whole
        image (scale 1, SRe2L's CIFAR setting: nothing to resample).
    """
    n, c, h, w = images.shape
    if flips is None and _whole(boxes, h, w):
        return images
    x0, y0, x1, y1 = boxes.to(images).unbind(1)
    sx = (x1 - x0) / max(w - 1, 1)
    if flips is not None:  # mirroring = sampling the crop right to left
        sx = torch.where(flips.to(images.device), -sx, sx)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (x0 + x1) / max(w - 1, 1) - 1
    theta[:, 1, 1] = (y1 - y0) / max(h - 1, 1)
    theta[:, 1, 2] = (y0 + y1) / max(h - 1, 1) - 1
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def crop_scale_min(iteration: int, iterations: int, schedule: str, start: float = 1.0, end: float = 0.08,
                   milestone: float = 1.0) -> float:
    """CDA's easy-to-hard curriculum (arXiv 2311.18838, Sec. 3.2) on the lower bound of the
    random-resized crop's scale, as CDA's code computes it (``recover_cda_in1k.py``): while
    ``iteration < milestone * iterations`` the progress is ``p = iteration / (milestone *
    iterations)`` and the bound goes from ``start`` (large crops, easy) towards ``end`` (0.08,
    hard); from ``milestone * iterations`` on it is ``end``. With ``milestone=1`` the last
    iteration is one step short of ``end``, as in CDA.

    Args:
        schedule: ``cosine`` (``end + (start - end) * (1 + cos(pi p)) / 2``), ``linear``
            (``end + (start - end) * (1 - p)``), ``step`` (``start`` until the milestone, then
            ``end``), or ``none`` (always ``end``: SRe2L).
        milestone: fraction of the iterations in ``(0, 1]``.

    Raises:
        ValueError: unknown schedule or milestone outside ``(0, 1]``.
    """
    if schedule not in CROP_SCHEDULES:
        raise ValueError(f"method.recover.crop_schedule must be {'|'.join(CROP_SCHEDULES)}, got {schedule!r}")
    if not 0 < milestone <= 1:
        raise ValueError(f"method.recover.milestone must be in (0, 1], got {milestone}")
    span = milestone * iterations
    if schedule == "none" or iteration >= span:
        return end
    p = iteration / span
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return end + (start - end) * (1 - p)
    return start  # step


def run_device(accelerator: str = "auto") -> torch.device:
    """The device a one-device Lightning run with ``trainer.accelerator`` computes on: ``cpu``;
    ``gpu``/``cuda`` -> ``cuda``; ``mps``; ``auto`` -> ``cuda`` if available, else ``mps`` if
    available, else ``cpu`` (Lightning's order). The teachers, their statistics passes, test
    accuracy, soft labels and relabeling run there, not only the Lightning fits.

    Raises:
        ValueError: an accelerator this method does not run on.
    """
    a = str(accelerator).lower()
    if a == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if a in ("gpu", "cuda"):
        return torch.device("cuda")
    if a in ("cpu", "mps"):
        return torch.device(a)
    raise ValueError(f"trainer.accelerator must be auto|cpu|gpu|cuda|mps for statistics matching, got {accelerator!r}")


def _device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


# ----------------------------------------------------------------------------------------------
# Statistics: BN hooks, convolution statistics
# ----------------------------------------------------------------------------------------------
def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` ``(N, C, H, W)`` over ``(N, H, W)`` -> ``(C,)``, ``(C,)``
    (what BatchNorm normalizes a training batch with)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return mean, var


class StatsHooks:
    """Forward hooks that record per-layer batch statistics of a network.

    ``kind="bn"``: the *input* of every ``BatchNorm2d`` (SRe2L Eq. 6), targets = the layer's running
    mean/var. ``kind="conv"``: the *output* of every ``Conv2d`` (G-VBSM's convolution statistics),
    targets given (see :func:`conv_statistics`).

    After a forward pass, ``stats`` is a list of ``(mean (C,), var (C,))``, one per layer in
    module-registration order (``net.modules()``; usually, not necessarily, the order the forward
    pass runs them; "the first layer" of ``first_multiplier`` is the first registered). Use as a
    context manager or call :meth:`remove`.

    Raises:
        ValueError: the network has no such layer.
    """

    def __init__(self, net: nn.Module, kind: str = "bn"):
        if kind not in ("bn", "conv"):
            raise ValueError(f"kind must be bn|conv, got {kind!r}")
        self.kind = kind
        self.layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d if kind == "bn" else nn.Conv2d)]
        if not self.layers:
            raise ValueError(f"{type(net).__name__} has no {'BatchNorm2d' if kind == 'bn' else 'Conv2d'} layer "
                             "to match statistics at (use a BatchNorm teacher, e.g. net.norm=batchnorm)")
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            self.stats[i] = channel_stats(inputs[0] if self.kind == "bn" else output)
        return fn

    def targets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """BN running ``(mean, var)`` per layer.

        Raises:
            ValueError: ``kind="conv"`` (convolutions keep no statistics: pass the targets to
            :meth:`loss`, e.g. from :func:`conv_statistics`).
        """
        if self.kind != "bn":
            raise ValueError("conv statistics hooks have no built-in targets: pass them to loss() "
                             "(see conv_statistics)")
        return [(m.running_mean, m.running_var) for m in self.layers]

    def loss(self, targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
             first_multiplier: float = 1.0) -> torch.Tensor:
        """``sum_l w_l (||mu_l - mu*_l||_2 + ||var_l - var*_l||_2)`` with ``w_0 = first_multiplier``,
        ``w_l = 1`` otherwise (SRe2L Eq. 6; targets default to the BN running statistics, and must be
        given for ``kind="conv"``, see :meth:`targets`)."""
        targets = self.targets() if targets is None else targets
        total = 0.0
        for i, ((m, v), (tm, tv)) in enumerate(zip(self.stats, targets)):
            w = first_multiplier if i == 0 else 1.0
            total = total + w * (torch.norm(m - tm.to(m), 2) + torch.norm(v - tv.to(v), 2))
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.no_grad()
def conv_statistics(net: nn.Module, images: torch.Tensor, batch_size: int = 500,
                    return_logits: bool = False):
    """Exact per-channel mean and (biased) variance of every ``Conv2d`` output of ``net`` (eval
    mode) over all of ``images`` ``(N, C, H, W)``, accumulated in float64 batch by batch
    (G-VBSM's convolution statistics of the real data). Returns one ``(mean (C_l,), var (C_l,))``
    float32 pair per conv layer in module-registration order (that of :class:`StatsHooks`); with
    ``return_logits`` also the network's outputs ``(N, K)`` from the same pass. Runs on the
    network's device batch by batch (``images`` may stay on the CPU); returns CPU tensors."""
    net.eval()
    dev = _device_of(net)
    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    sums: list = [None] * len(layers)
    count = [0] * len(layers)

    def hook(i):
        def fn(module, inputs, out):
            o = out.double()
            s = torch.stack([o.sum((0, 2, 3)), o.pow(2).sum((0, 2, 3))])
            sums[i] = s if sums[i] is None else sums[i] + s
            count[i] += o.shape[0] * o.shape[2] * o.shape[3]
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    outs = []
    try:
        for part in images.split(batch_size):
            outs.append(net(part.to(dev)).cpu())
    finally:
        for h in handles:
            h.remove()
    out = []
    for s, n in zip(sums, count):
        mean = s[0] / n
        out.append((mean.float().cpu(), (s[1] / n - mean * mean).clamp(min=0).float().cpu()))
    return (out, torch.cat(outs)) if return_logits else out


# ----------------------------------------------------------------------------------------------
# Squeeze: teacher training (Lightning), cached by config
# ----------------------------------------------------------------------------------------------
class TeacherModule(L.LightningModule):
    """Trains a teacher on real batches (SRe2L's squeeze): SGD (momentum 0.9, Nesterov), cosine lr
    over ``total_steps``, random crop (4-px padding, or random-resized crop at >= 64 px) and flip
    (kornia), cross-entropy with ``label_smoothing``."""

    def __init__(self, net: nn.Module, lr: float, total_steps: int, weight_decay: float, image_size,
                 label_smoothing: float = 0.0):
        super().__init__()
        import kornia.augmentation as K

        self.net, self.lr, self.total_steps, self.weight_decay = net, lr, total_steps, weight_decay
        self.label_smoothing = label_smoothing
        h, w = image_size
        crop = K.RandomResizedCrop((h, w), scale=(0.25, 1.0)) if h >= 64 else K.RandomCrop((h, w), padding=4)
        self.augment = nn.Sequential(crop, K.RandomHorizontalFlip())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(self.augment(x)), y, label_smoothing=self.label_smoothing)
        self.log("squeeze/train_loss", loss, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=0.9, nesterov=True,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / max(1, self.total_steps))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (fraction) of ``net`` in eval mode on ``images (N, C, H, W)``, ``labels (N,)``,
    batch by batch on the network's device."""
    net.eval()
    dev = _device_of(net)
    correct = sum(int((net(x.to(dev)).argmax(1).cpu() == y).sum())
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / max(1, len(labels))


def squeeze(net_cfg: dict, dm, tcfg: dict, cache_root: str | Path, seed: int = 0, accelerator: str = "auto") -> dict:
    """Train (or load from the cache) one teacher on ``dm``'s training set.

    Args:
        net_cfg: ``{"name": ..., **kwargs}`` (a BatchNorm network).
        dm: a set-up :class:`lightning_dd.data.images.ImageDataModule`.
        tcfg: ``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``label_smoothing``; an ``epochs``
            key in ``net_cfg`` overrides ``tcfg["epochs"]`` for this net (e.g. fewer epochs for the
            extra G-VBSM backbones; the cache key holds the epochs actually used).
        cache_root: ``paths.cache_dir/teachers``; the file is ``<key>/teacher.pt`` with the key over
            the data identity, ``net_cfg``, the training settings and ``seed``.

    Returns:
        ``{"net": nn.Module (eval, on the run's device, :func:`run_device`), "path": Path, "test_acc": float,
        "seconds": float, "cached": bool}``;
        the file is a teacher checkpoint ``{"net_cfg", "state_dict", "test_acc", "spec"}`` that
        ``eval.teacher_ckpt`` / ``method.teacher.ckpt`` accept.
    """
    net_cfg = dict(net_cfg)
    tcfg = {**tcfg, **({"epochs": net_cfg.pop("epochs")} if "epochs" in net_cfg else {})}
    spec = {"data": dm.identity(), "net": dict(net_cfg), "seed": seed,
            **{k: tcfg[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "label_smoothing")}}
    path = Path(cache_root) / experts_key(spec) / "teacher.pt"
    dev = run_device(accelerator)
    if path.is_file():
        net, d = load_net_file(path, dm.image_shape[0], dm.num_classes, dm.image_shape[1:], "cached teacher")
        return {"net": net.to(dev).eval(), "path": path, "test_acc": d["test_acc"], "seconds": 0.0, "cached": True}
    quiet_lightning()
    t0 = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    kwargs = dict(net_cfg)
    net = build_net(kwargs.pop("name"), dm.image_shape[0], dm.num_classes, dm.image_shape[1:], **kwargs)
    loader = batch_loader(dm.train_images, dm.train_labels, int(tcfg["batch_size"]), epochs=1, seed=seed)
    steps = int(tcfg["epochs"]) * len(loader)
    module = TeacherModule(net, float(tcfg["lr"]), steps, float(tcfg["weight_decay"]), dm.image_shape[1:],
                           float(tcfg["label_smoothing"]))
    trainer = L.Trainer(max_epochs=int(tcfg["epochs"]), accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_progress_bar=False)
    trainer.fit(module, loader)
    net = net.to(dev).eval()
    acc = accuracy(net, dm.test_images, dm.test_labels)
    secs = time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_save({"net_cfg": dict(net_cfg), "state_dict": state, "test_acc": acc, "spec": spec,
                 "seconds": secs}, path)
    (path.parent / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True, default=str))
    log.info("teacher %s: %d epochs in %.0fs, test acc %.4f -> %s", net_cfg["name"], tcfg["epochs"], secs, acc, path)
    return {"net": net, "path": path, "test_acc": acc, "seconds": secs, "cached": False}


def load_teacher_file(path: str | Path, dm, accelerator: str = "auto") -> dict:
    """A teacher checkpoint ``{"net_cfg", "state_dict", ...}`` (``method.teacher.ckpt``) on the run's
    device (:func:`run_device`), with its test accuracy (stored, else measured on ``dm``'s test set).

    Raises:
        FileNotFoundError: no file. ValueError: not a teacher checkpoint, or its weights do not fit
        the data's shape/classes (:func:`lightning_dd.nets.load_net_file`).
    """
    net, d = load_net_file(path, dm.image_shape[0], dm.num_classes, dm.image_shape[1:],
                           "teacher checkpoint (method.teacher.ckpt)")
    net = net.to(run_device(accelerator)).eval()
    acc = d.get("test_acc")
    return {"net": net, "path": Path(path), "test_acc": acc if acc is not None else accuracy(
        net, dm.test_images, dm.test_labels), "seconds": 0.0, "cached": True}


# ----------------------------------------------------------------------------------------------
# Recover
# ----------------------------------------------------------------------------------------------
class Backbone:
    """A frozen teacher prepared for recovery: the network (eval mode), its BN hooks, and
    optionally conv hooks with precomputed targets and per-class mean logits (G-VBSM).
    The hooks run on every forward of the network until :meth:`remove`."""

    def __init__(self, net: nn.Module, conv_targets=None, class_logits: torch.Tensor | None = None):
        self.net = net.eval().requires_grad_(False)
        self.bn = StatsHooks(self.net, "bn")
        self.conv = StatsHooks(self.net, "conv") if conv_targets is not None else None
        self.conv_targets, self.class_logits = conv_targets, class_logits

    def remove(self) -> None:
        """Remove the BN (and conv) forward hooks from the network (idempotent)."""
        self.bn.remove()
        if self.conv is not None:
            self.conv.remove()

    def to(self, device):
        self.net.to(device)
        if self.conv_targets is not None:
            self.conv_targets = [(m.to(device), v.to(device)) for m, v in self.conv_targets]
        if self.class_logits is not None:
            self.class_logits = self.class_logits.to(device)
        return self


def check_backbone_norm(value) -> str:
    """``recover.backbone_norm`` as a string.

    Raises:
        ValueError: not ``none`` or ``start``."""
    if str(value) not in ("none", "start"):
        raise ValueError(f"method.recover.backbone_norm must be none|start, got {value!r}")
    return str(value)


@torch.no_grad()
def backbone_weights(backbones: list[Backbone], images: torch.Tensor, hp: dict) -> tuple[list[float], list[float]]:
    """Per-backbone weights of the BN and conv losses in recovery.

    ``hp["backbone_norm"]``: ``none`` (default; every weight 1: each sampled backbone's loss enters
    the mean over the sampled backbones as it is -- G-VBSM's unweighted form; it sums where this
    averages, the same under Adam, see the module doc) or ``start``: backbone ``i``'s BN (conv) loss
    is weighted ``L_0(x0) / L_i(x0)``,
    its value on the batch's initial ``images`` relative to the first backbone's, so that every
    backbone starts at the first one's scale. The raw sums differ by orders of magnitude between
    architectures (e.g. 56 BN layers in ShuffleNetV2 vs 3 in ConvNet-3), and without it the
    deepest backbone dominates the gradient. Computed from the initial images only, so a resumed
    fit gets the same weights.
    """
    n = len(backbones)
    if check_backbone_norm(hp.get("backbone_norm", "none")) == "none" or n <= 1:
        return [1.0] * n, [1.0] * n
    fm = float(hp["first_bn_multiplier"])
    bn, conv = [], []
    for b in backbones:
        dev = next(b.net.parameters()).device
        b.net(images.to(dev))
        bn.append(float(b.bn.loss(first_multiplier=fm)))
        conv.append(float(b.conv.loss([(m.to(dev), v.to(dev)) for m, v in b.conv_targets], fm))
                    if b.conv is not None else 1.0)
    return [bn[0] / max(v, 1e-12) for v in bn], [conv[0] / max(v, 1e-12) for v in conv]


class RecoverModule(L.LightningModule):
    """Recovers one batch of synthetic images (SRe2L Sec. 3.2; CDA; G-VBSM): the only trainable
    state is ``images`` (so checkpoints hold just the images and Adam's moments).

    Args:
        images: ``(B, C, H, W)`` initial images in model space. labels: ``(B,)`` int64.
        backbones: :class:`Backbone` list (not saved in checkpoints).
        hp: ``recover`` settings: iterations, lr, r_bn, first_bn_multiplier, jitter, flip,
            crop_scale ``[min, max]``, crop_schedule, milestone, backbones_per_iter, r_conv, r_logit,
            backbone_norm (see :func:`backbone_weights`).
        lo, hi: ``(C,)`` model-space bounds of valid pixels (clipping).
        seed, batch_index: every step's randomness is keyed by ``(seed, batch_index, step)``, so a
            resumed run draws what an uninterrupted one would.
        settings: what determines this batch (:func:`recover_settings`), saved in every checkpoint
            with the per-step ``history`` so far (a resumed fit checks the one and continues the other).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, backbones: list[Backbone], hp: dict,
                 lo: torch.Tensor, hi: torch.Tensor, seed: int = 0, batch_index: int = 0,
                 settings: dict | None = None):
        super().__init__()
        self.images = nn.Parameter(images.clone())
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("lo", lo.view(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("hi", hi.view(1, -1, 1, 1).clone(), persistent=False)
        self.backbones, self.hp, self.seed, self.batch_index = backbones, hp, seed, batch_index
        self.history: list[dict] = []
        self.settings = settings
        self.bn_weights, self.conv_weights = backbone_weights(backbones, images, hp)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recover_settings"] = self.settings
        checkpoint["recover_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("recover_history", []))

    def on_fit_start(self):
        for b in self.backbones:
            b.to(self.device)

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch_index * 10_007 + step)

    def augment(self, step: int) -> tuple[torch.Tensor, float, list[int]]:
        """The step's augmented view of the images, its crop-scale lower bound and the indices of
        the backbones it uses."""
        hp, x = self.hp, self.images
        g = self.generator(step)
        n, _, h, w = x.shape
        j = int(hp["jitter"])
        if j > 0:  # SRe2L's jitter: roll the whole batch by (dx, dy)
            dx, dy = (torch.randint(-j, j + 1, (2,), generator=g)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        smin = crop_scale_min(step, int(hp["iterations"]), hp["crop_schedule"], float(hp["crop_scale"][1]),
                              float(hp["crop_scale"][0]), float(hp["milestone"]))
        boxes = sample_crops(n, h, w, (smin, float(hp["crop_scale"][1])), g)
        flips = torch.rand(n, generator=g) < 0.5 if hp["flip"] else None
        x = crop_resize(x, boxes, flips)
        k = min(int(hp["backbones_per_iter"]), len(self.backbones))
        chosen = sorted(torch.randperm(len(self.backbones), generator=g)[:k].tolist()) if k < len(self.backbones) \
            else list(range(len(self.backbones)))
        return x, smin, chosen

    def losses(self, x: torch.Tensor, chosen: list[int]) -> dict[str, torch.Tensor]:
        """CE, BN, conv and logit losses of ``x``, each the mean over the ``chosen`` backbones (G-VBSM
        sums; a constant factor Adam does not see, see the module doc)."""
        hp = self.hp
        out = {"ce": 0.0, "bn": 0.0, "conv": 0.0, "logit": 0.0}
        for i in chosen:
            b = self.backbones[i]
            logits = b.net(x)
            out["ce"] = out["ce"] + F.cross_entropy(logits, self.labels)
            out["bn"] = out["bn"] + self.bn_weights[i] * b.bn.loss(first_multiplier=float(hp["first_bn_multiplier"]))
            if b.conv is not None and float(hp["r_conv"]) > 0:
                out["conv"] = out["conv"] + self.conv_weights[i] * b.conv.loss(b.conv_targets,
                                                                                float(hp["first_bn_multiplier"]))
            if b.class_logits is not None and float(hp["r_logit"]) > 0:
                out["logit"] = out["logit"] + F.mse_loss(logits, b.class_logits[self.labels])
        zero = torch.zeros((), device=x.device)
        return {k: (v / len(chosen) if torch.is_tensor(v) else zero) for k, v in out.items()}

    def training_step(self, batch, batch_idx):
        step = self.global_step
        x, smin, chosen = self.augment(step)
        ls = self.losses(x, chosen)
        hp = self.hp
        loss = ls["ce"] + float(hp["r_bn"]) * ls["bn"] + float(hp["r_conv"]) * ls["conv"] + \
            float(hp["r_logit"]) * ls["logit"]
        rec = {"recover/loss": loss.detach(), "recover/loss_ce": ls["ce"].detach(),
               "recover/loss_bn": ls["bn"].detach(), "recover/crop_scale_min": smin,
               "recover/batch": float(self.batch_index)}
        if float(hp["r_conv"]) > 0:
            rec["recover/loss_conv"] = ls["conv"].detach()
        if float(hp["r_logit"]) > 0:
            rec["recover/loss_logit"] = ls["logit"].detach()
        if self.trainer.loggers:
            self.log_dict(rec, logger=True, on_step=True, on_epoch=False)
        self.history.append({"batch": self.batch_index, "step": step, "loss_bn": float(ls["bn"].detach()),
                             "crop_scale_min": smin, "backbones": chosen})
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # keep pixels valid (SRe2L's clip), before any checkpoint of this step
            self.images.copy_(torch.maximum(torch.minimum(self.images, self.hi), self.lo))

    def configure_optimizers(self):
        hp = self.hp
        opt = torch.optim.Adam([self.images], lr=float(hp["lr"]), betas=(0.5, 0.9), eps=1e-8)
        total = int(hp["iterations"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def bn_loss_of(backbone: Backbone, images: torch.Tensor, first_multiplier: float) -> float:
    """The BN-statistics loss (SRe2L Eq. 6) of un-augmented ``images`` ``(B, C, H, W)`` on one backbone."""
    backbone.net(images.to(next(backbone.net.parameters()).device))
    return float(backbone.bn.loss(first_multiplier=first_multiplier))


@torch.no_grad()
def bn_loss_views(backbone: Backbone, images: torch.Tensor, hp: dict, views: int = 8, seed: int = 12345) -> float:
    """The BN-statistics loss (SRe2L Eq. 6) averaged over ``views`` fixed augmented views of
    ``images`` ``(B, C, H, W)`` -- jitter, flips (where ``hp["flip"]``) and random-resized crops over
    the full ``hp["crop_scale"]`` range, drawn from ``seed`` so that the same views measure the images
    before and after recovery: the quantity recovery minimizes, without its step-to-step sampling
    noise. The flips are drawn either way, so the crops do not depend on ``hp["flip"]``."""
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(views):
        x = images
        j = int(hp["jitter"])
        if j > 0:
            dx, dy = torch.randint(-j, j + 1, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        boxes = sample_crops(n, h, w, tuple(float(v) for v in hp["crop_scale"]), g)
        flips = torch.rand(n, generator=g) < 0.5
        flips = flips if hp.get("flip", True) else None
        x = crop_resize(x, boxes, flips)
        total += bn_loss_of(backbone, x, float(hp["first_bn_multiplier"]))
    return total / views


def recover_settings(hp: dict, seed: int, batch_index: int, images: torch.Tensor, labels: torch.Tensor,
                     lo: torch.Tensor, hi: torch.Tensor, extra: dict | None = None) -> dict:
    """Everything that determines a recovered batch, as a plain dict: the ``recover`` settings
    (but ``ckpt_every``), the seed and batch index, the labels, a hash of the initial images, the
    pixel bounds, and ``extra`` (the caller's data and teacher identity). Stored in every batch
    file and checkpoint, so that ``resume=true`` never reuses a batch of other settings."""
    x = images.detach().float().cpu().contiguous()
    return {"recover": {k: v for k, v in hp.items() if k != "ckpt_every"}, "seed": int(seed),
            "batch_index": int(batch_index), "labels": [int(v) for v in labels.tolist()],
            "init_images": hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16] + f"/{tuple(x.shape)}",
            "bounds": [lo.tolist(), hi.tolist()], **(extra or {})}


def check_settings(stored: dict | None, settings: dict, path: str | Path) -> None:
    """Refuse to resume from ``path`` (a batch file or checkpoint) recovered with other settings.

    Raises:
        ValueError: the stored settings differ from ``settings`` (or were never recorded); the
        message names the file and the differing keys.
    """
    if stored == settings:
        return
    if not isinstance(stored, dict):
        what = "it records no recovery settings (written before they were recorded)"
    else:
        diffs = []
        for k in sorted(set(stored) | set(settings)):
            a, b = stored.get(k), settings.get(k)
            if k == "recover" and isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"recover.{kk}: {a.get(kk)!r} there, {b.get(kk)!r} now" for kk in sorted(set(a) | set(b))
                          if a.get(kk) != b.get(kk)]
            elif a != b:
                diffs.append(f"{k}: {str(a)[:80]} there, {str(b)[:80]} now")
        what = "it was recovered with other settings (" + "; ".join(diffs) + ")"
    raise ValueError(f"cannot resume from {path}: {what}. Run in a new output directory, or with resume=false "
                     f"to recompute every batch.")


def recover_batch(images: torch.Tensor, labels: torch.Tensor, backbones: list[Backbone], hp: dict,
                  lo: torch.Tensor, hi: torch.Tensor, *, seed: int, batch_index: int, ckpt_dir: Path | None,
                  resume: bool = False, loggers=None, callbacks=(), accelerator: str = "auto",
                  progress: bool = False, extra_settings: dict | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Recover one batch (a Lightning fit of :class:`RecoverModule` for ``hp["iterations"]`` steps).

    ``ckpt_dir``: checkpoints every ``hp["ckpt_every"]`` steps (``last.ckpt``), each with the
    batch's :func:`recover_settings` (``extra_settings`` added) and history so far; with ``resume``
    and a ``last.ckpt`` there, the fit continues from it (same result as an uninterrupted fit).

    Returns:
        the recovered ``(B, C, H, W)`` images (CPU) and the per-step history of the whole fit
        (restored from the checkpoint when resumed).

    Raises:
        ValueError: ``resume`` and a ``last.ckpt`` of other settings (:func:`check_settings`).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    quiet_lightning()
    settings = recover_settings(hp, seed, batch_index, images, labels, lo, hi, extra_settings)
    module = RecoverModule(images, labels, backbones, hp, lo, hi, seed=seed, batch_index=batch_index,
                           settings=settings)
    cbs = list(callbacks)
    ckpt_path = None
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="recover-{step}",
                                   every_n_train_steps=int(hp["ckpt_every"]),
                                   save_last=True, save_top_k=1))
        if resume and (Path(ckpt_dir) / "last.ckpt").is_file():
            ckpt_path = str(Path(ckpt_dir) / "last.ckpt")
            stored = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("recover_settings")
            check_settings(stored, settings, ckpt_path)
            log.info("recover batch %d: resuming from %s", batch_index, ckpt_path)
    iters = int(hp["iterations"])
    trainer = L.Trainer(max_steps=iters, max_epochs=-1, accelerator=accelerator, devices=1,
                        logger=loggers if loggers else False, callbacks=cbs, log_every_n_steps=10,
                        enable_checkpointing=ckpt_dir is not None, enable_model_summary=False,
                        num_sanity_val_steps=0, enable_progress_bar=progress)
    trainer.fit(module, DataLoader(range(iters), batch_size=None), ckpt_path=ckpt_path)
    return module.images.detach().cpu(), module.history


def pixel_bounds(preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space ``(C,)`` bounds of pixels 0 and 1 under per-channel normalization.

    Raises:
        ValueError: ZCA preprocessing (statistics matching recovers in normalized pixel space: set
        ``data.zca=false``).
    """
    if preprocessing.zca is not None:
        raise ValueError("statistics matching needs data.zca=false (images are clipped to valid pixels)")
    return (0 - preprocessing.mean) / preprocessing.std, (1 - preprocessing.mean) / preprocessing.std


# ----------------------------------------------------------------------------------------------
# Relabel (FKD-style stored soft labels)
# ----------------------------------------------------------------------------------------------
def relabel_seed(seed: int, epoch: int) -> int:
    """The seed of relabel epoch ``epoch``'s crops and flips: a hash of ``("relabel", seed, epoch)``,
    a stream apart from recovery's (``seed * 1_000_003 + batch * 10_007 + step``, which the former
    ``seed * 1_000_003 + epoch`` repeated for batch 0)."""
    return int(hashlib.sha1(f"relabel|{int(seed)}|{int(epoch)}".encode()).hexdigest()[:15], 16)


@torch.no_grad()
def relabel_fkd(teacher: nn.Module, images: torch.Tensor, epochs: int, topk: int, scale=(0.08, 1.0),
                seed: int = 0, batch_size: int = 500, temperature: float = 1.0) -> dict:
    """FKD-style relabeling (arXiv 2112.01528; SRe2L Sec. 3.3): for every epoch and image, one
    random-resized crop + flip and the teacher's top-``topk`` softmax probabilities on it.

    Args:
        teacher: the teacher (eval mode; runs on its device, batch by batch). images: ``(N, C, H, W)``
            model space (may stay on the CPU).

    Returns:
        ``{"boxes": (E, N, 4) float32 pixels, "flips": (E, N) bool, "topk_values": (E, N, k) float16,
        "topk_indices": (E, N, k) int64, "num_classes": K, "scale", "seed", "temperature"}``.
    """
    teacher.eval()
    dev = _device_of(teacher)
    n, _, h, w = images.shape
    boxes, flips, vals, idxs = [], [], [], []
    for e in range(epochs):
        g = torch.Generator().manual_seed(relabel_seed(seed, e))
        b = sample_crops(n, h, w, tuple(scale), g)
        f = torch.rand(n, generator=g) < 0.5
        logits = torch.cat([teacher(crop_resize(x.to(dev), bb, ff)).float().cpu() for x, bb, ff in
                            zip(images.split(batch_size), b.split(batch_size), f.split(batch_size))])
        p = F.softmax(logits / temperature, 1)
        v, i = p.topk(min(topk, p.shape[1]), 1)
        boxes.append(b), flips.append(f), vals.append(v.half()), idxs.append(i)
    k = int(logits.shape[1])
    return {"boxes": torch.stack(boxes), "flips": torch.stack(flips), "topk_values": torch.stack(vals),
            "topk_indices": torch.stack(idxs), "num_classes": k, "scale": list(scale), "seed": seed,
            "temperature": temperature}


def replay_fkd(images: torch.Tensor, labels: dict, epoch: int, index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored crops and soft targets of ``epoch`` (see :func:`relabel_fkd`).

    Args:
        images: ``(N, C, H, W)`` the distilled images. index: ``(B,)`` which images (default all).

    Returns:
        ``(B, C, H, W)`` crops and ``(B, K)`` target probabilities: the top-k probabilities in place,
        renormalized to sum to 1, zero elsewhere.

    Raises:
        IndexError: ``epoch`` beyond the stored epochs.
    """
    if not 0 <= epoch < labels["boxes"].shape[0]:
        raise IndexError(f"epoch {epoch} not stored (have {labels['boxes'].shape[0]})")
    idx = torch.arange(images.shape[0]) if index is None else index
    crops = crop_resize(images[idx], labels["boxes"][epoch][idx], labels["flips"][epoch][idx])
    v = labels["topk_values"][epoch][idx].float()
    t = torch.zeros(len(idx), labels["num_classes"]).scatter_(1, labels["topk_indices"][epoch][idx], v)
    return crops, t / t.sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------
def _teachers(cfg, dm) -> list[dict]:
    t = cfg.method.teacher
    if t.get("ckpt"):
        return [load_teacher_file(t.ckpt, dm, cfg.trainer.accelerator)]
    tcfg = OmegaConf.to_container(t, resolve=True)
    nets = tcfg["nets"]
    if not nets:
        raise ValueError("method.teacher.nets is empty: give at least one BatchNorm backbone or method.teacher.ckpt")
    return [squeeze(n, dm, tcfg, Path(cfg.paths.cache_dir) / "teachers", int(cfg.seed), cfg.trainer.accelerator)
            for n in nets]


def real_statistics(teacher: dict, dm) -> tuple[list, torch.Tensor]:
    """G-VBSM's statistics of the real training set for one teacher: the convolution statistics
    (:func:`conv_statistics`) and the per-class mean logits ``(K, K)``. Cached beside the teacher
    file (``real_stats-<key>.pt``, keyed by the data's identity and the teacher file's size and
    mtime), so a run reuses them and a changed teacher or data set never does.
    """
    path = Path(teacher["path"])
    st = path.stat()
    key = experts_key({"data": dm.identity(), "teacher": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns})
    cache = path.parent / f"real_stats-{key}.pt"
    if cache.is_file():
        d = torch.load(cache)
        return d["conv"], d["class_logits"]
    net = teacher["net"]
    conv, logits = conv_statistics(net, dm.train_images, return_logits=True)  # one pass over the data
    class_logits = torch.zeros(dm.num_classes, logits.shape[1]).index_add_(0, dm.train_labels, logits)
    class_logits /= torch.bincount(dm.train_labels, minlength=dm.num_classes).clamp(min=1).unsqueeze(1)
    atomic_save({"conv": conv, "class_logits": class_logits}, cache)
    return conv, class_logits


def _file_identity(path: str | Path) -> dict:
    """A file's resolved path, size and modification time (what a cache or resume check keys on)."""
    path = Path(path)
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recover_batches(cfg, dm, backbones: list[Backbone], rec: dict, labels: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, out_dir: Path, loggers: list, teacher_paths: list) -> dict:
    """Recover every batch of ``rec["batch"]`` images (finished batches are read back with
    ``resume=true``, after :func:`check_settings`); returns the images, the per-step history (of
    every batch, read-back ones included) and the BN losses before/after, per batch (and per
    backbone)."""
    seed = int(cfg.seed)
    extra = {"data": dm.identity(), "teachers": [_file_identity(p) for p in teacher_paths]}
    n, bsz = len(labels), int(rec["batch"])
    rec_dir = out_dir / "recover"
    images, history = [], []
    fm = float(rec["first_bn_multiplier"])
    bn_start, bn_end, bn_full = [], [], []
    nb = len(backbones)
    per_start, per_end = [[] for _ in range(nb)], [[] for _ in range(nb)]  # every backbone, per batch
    for b, start in enumerate(range(0, n, bsz)):
        y = labels[start:start + bsz]
        done = rec_dir / f"batch_{b:03d}.pt"
        g = torch.Generator().manual_seed(seed * 7919 + b)
        x0 = torch.randn(len(y), *dm.image_shape, generator=g) * float(rec["init_std"])
        x0 = torch.maximum(torch.minimum(x0, hi.view(1, -1, 1, 1)), lo.view(1, -1, 1, 1))
        settings = recover_settings(rec, seed, b, x0, y, lo, hi, extra)
        if cfg.get("resume") and done.is_file():
            d = torch.load(done)
            check_settings(d.get("settings"), settings, done)
            images.append(d["images"]), bn_start.append(d["loss_bn_start"]), bn_end.append(d["loss_bn_end"])
            bn_full.append(d["loss_bn_full"])
            for i, (a, e) in enumerate(d["loss_bn_per_backbone"]):
                per_start[i].append(a), per_end[i].append(e)
            history += d["history"]
            continue
        starts = [bn_loss_views(bb, x0, rec) for bb in backbones]
        s0, f0 = starts[0], bn_loss_of(backbones[0], x0, fm)
        x, hist = recover_batch(x0, y, backbones, rec, lo, hi, seed=seed, batch_index=b,
                                ckpt_dir=out_dir / "checkpoints" / f"recover_{b:03d}", resume=bool(cfg.get("resume")),
                                loggers=loggers, accelerator=cfg.trainer.accelerator,
                                progress=bool(cfg.trainer.enable_progress_bar), extra_settings=extra)
        ends = [bn_loss_views(bb, x, rec) for bb in backbones]
        s1, f1 = ends[0], bn_loss_of(backbones[0], x, fm)
        log.info("recover batch %d (%d images): BN loss on fixed augmented views %.3f -> %.3f (%.1fx lower); "
                 "on the whole images %.3f -> %.3f", b, len(y), s0, s1, s0 / max(s1, 1e-12), f0, f1)
        for i in range(1, nb):
            log.info("recover batch %d: backbone %d BN loss on fixed augmented views %.3f -> %.3f (%.1fx lower)",
                     b, i, starts[i], ends[i], starts[i] / max(ends[i], 1e-12))
        for i in range(nb):
            per_start[i].append(starts[i]), per_end[i].append(ends[i])
        atomic_save({"images": x, "labels": y, "loss_bn_start": s0, "loss_bn_end": s1, "loss_bn_full": (f0, f1),
                     "loss_bn_per_backbone": list(zip(starts, ends)), "settings": settings, "history": hist}, done)
        images.append(x), bn_start.append(s0), bn_end.append(s1), bn_full.append((f0, f1))
        history += hist
    return {"images": images, "history": history, "bn_start": bn_start, "bn_end": bn_end, "bn_full": bn_full,
            "per_start": per_start, "per_end": per_end}


def validate_settings(hp) -> None:
    """Check the ``method`` settings a run would otherwise reject only after the squeeze (minutes to
    hours later): ``ipc``, ``recover.batch``, ``recover.iterations``, ``recover.crop_scale``,
    ``recover.crop_schedule``, ``recover.milestone``, ``recover.backbone_norm``,
    ``relabel.crop_scale``.

    Raises:
        ValueError: naming the key and the value.
    """
    rec, rl = hp.recover, hp.relabel

    def scale(key, v):
        try:
            lo, hi = (float(x) for x in v)
            ok = 0 < lo <= hi <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"method.{key} must be [min, max] with 0 < min <= max <= 1, got {v}")

    for key, v in (("ipc", hp.ipc), ("recover.batch", rec.batch), ("recover.iterations", rec.iterations)):
        if int(v) <= 0:
            raise ValueError(f"method.{key} must be positive, got {v}")
    scale("recover.crop_scale", list(rec.crop_scale))
    scale("relabel.crop_scale", list(rl.crop_scale))
    crop_scale_min(0, 1, rec.crop_schedule, milestone=float(rec.milestone))  # checks schedule and milestone
    check_backbone_norm(rec.get("backbone_norm", "none"))


def run_statistics_matching(cfg, dm, out_dir: Path, loggers: list, callbacks: list) -> dict:
    """Squeeze -> recover -> relabel (SRe2L / CDA / G-VBSM by ``method`` settings).

    Returns ``{"result": DistilledSet, "teacher_ckpt": path of the first teacher (the student
    evaluator's KD teacher), "timings", "metrics"}``. ``stage=squeeze`` stops after the teachers.
    The set's ``labels`` are the teacher's logits ``(N, K)`` on the whole images; the class each
    image was recovered as is kept in ``meta["hard_labels"]`` ``(N,)`` (class-major), since the
    logits' argmax is the teacher's prediction and need not be that class.

    Raises:
        ValueError: bad settings (ZCA data, no teachers, :func:`validate_settings`, checked before
        the squeeze), or a teacher without BatchNorm layers.
    """
    hp = cfg.method
    validate_settings(hp)
    seed = int(cfg.seed)
    timings, metrics = {}, {}
    out_dir = Path(out_dir)
    lo, hi = pixel_bounds(dm.preprocessing)  # fails early on ZCA data
    dev = run_device(cfg.trainer.accelerator)  # teachers, statistics, soft labels and relabel run here

    # 1. squeeze
    t0 = time.perf_counter()
    teachers = _teachers(cfg, dm)
    timings["squeeze_s"] = time.perf_counter() - t0
    for i, t in enumerate(teachers):
        name = OmegaConf.select(cfg, f"method.teacher.nets.{i}.name") or "ckpt"
        metrics[f"squeeze/{i}_{name}/test_acc"] = t["test_acc"]
        metrics[f"timings/squeeze_{i}_{name}_s"] = t["seconds"]  # 0 when cached
        log.info("teacher %d (%s): test acc %.2f%% (%s)", i, name, 100 * t["test_acc"],
                 "cached" if t["cached"] else f"trained in {t['seconds']:.0f}s")
    metrics["squeeze/teacher_test_acc"] = teachers[0]["test_acc"]
    metrics["squeeze/n_backbones"] = len(teachers)
    if cfg.get("stage", "all") == "squeeze":
        return {"result": None, "timings": timings, "metrics": metrics, "teacher_ckpt": str(teachers[0]["path"])}

    # G-VBSM statistics of the real data (convolution statistics, per-class mean logits)
    rec = OmegaConf.to_container(hp.recover, resolve=True)
    ipc, k = int(hp.ipc), dm.num_classes
    n = ipc * k
    labels = torch.arange(n) % k  # labels cycle through the classes so every batch mixes them
    t0 = time.perf_counter()
    backbones = []
    try:  # the backbones' hooks stay on the teachers only while recovering
        for t in teachers:
            conv_t, class_logits = None, None
            if float(rec["r_conv"]) > 0 or float(rec["r_logit"]) > 0:
                conv_t, class_logits = real_statistics(t, dm)
            backbones.append(Backbone(t["net"], conv_t if float(rec["r_conv"]) > 0 else None,
                                      class_logits if float(rec["r_logit"]) > 0 else None))
        timings["statistics_s"] = time.perf_counter() - t0

        # 2. recover, batch by batch
        t0 = time.perf_counter()
        r = _recover_batches(cfg, dm, backbones, rec, labels, lo, hi, out_dir, loggers,
                             [t["path"] for t in teachers])
    finally:
        for bb in backbones:
            bb.remove()
    images, history, nb = r["images"], r["history"], len(backbones)
    bn_start, bn_end, bn_full, per_start, per_end = (r[key] for key in ("bn_start", "bn_end", "bn_full",
                                                                         "per_start", "per_end"))
    x = torch.cat(images)
    timings["recover_s"] = time.perf_counter() - t0
    metrics["recover/loss_bn_start"] = sum(bn_start) / len(bn_start)
    metrics["recover/loss_bn_end"] = sum(bn_end) / len(bn_end)
    metrics["recover/loss_bn_reduction"] = metrics["recover/loss_bn_start"] / max(metrics["recover/loss_bn_end"], 1e-12)
    metrics["recover/loss_bn_whole_images_start"] = sum(f[0] for f in bn_full) / len(bn_full)
    metrics["recover/loss_bn_whole_images_end"] = sum(f[1] for f in bn_full) / len(bn_full)
    names = [OmegaConf.select(cfg, f"method.teacher.nets.{i}.name") or "ckpt" for i in range(nb)] \
        if not cfg.method.teacher.get("ckpt") else ["ckpt"]
    reductions = []
    for i in range(nb):  # every backbone's own BN loss, start -> end (fixed views, averaged over batches)
        a, e = sum(per_start[i]) / len(per_start[i]), sum(per_end[i]) / len(per_end[i])
        reductions.append(a / max(e, 1e-12))
        metrics[f"recover/{i}_{names[i]}/loss_bn_start"] = a
        metrics[f"recover/{i}_{names[i]}/loss_bn_end"] = e
        metrics[f"recover/{i}_{names[i]}/loss_bn_reduction"] = reductions[-1]
    metrics["recover/loss_bn_reduction_min_over_backbones"] = min(reductions)
    metrics["recover/iterations"] = int(rec["iterations"])
    metrics["recover/n_batches"] = len(images)
    if history:
        metrics["recover/crop_scale_min_first"] = history[0]["crop_scale_min"]
        metrics["recover/crop_scale_min_last"] = history[-1]["crop_scale_min"]
        used = sorted({i for h in history for i in h["backbones"]})
        metrics["recover/backbones_used"] = len(used)
        metrics["recover/backbones_per_iter"] = len(history[0]["backbones"])
        (out_dir / "recover_history.json").write_text(json.dumps(history))

    # class-major order (the framework's convention), teacher soft labels on the whole images
    order = torch.argsort(labels * n + torch.arange(n))
    x, y = x[order], labels[order]
    teacher = teachers[0]["net"].to(dev).eval()
    with torch.no_grad():
        soft = torch.cat([teacher(p.to(dev)).float().cpu() for p in x.split(500)])
    metrics["recover/teacher_acc_on_synthetic"] = float((soft.argmax(1) == y).float().mean())

    # 3. relabel (FKD-style stored crops + top-k probabilities)
    t0 = time.perf_counter()
    rl = OmegaConf.to_container(hp.relabel, resolve=True)
    if int(rl["epochs"]) > 0:
        fkd = relabel_fkd(teacher, x, int(rl["epochs"]), int(rl["topk"]), tuple(rl["crop_scale"]), seed,
                          temperature=float(rl["temperature"]))
        atomic_save(fkd, out_dir / "fkd_labels.pt")
    timings["relabel_s"] = time.perf_counter() - t0

    result = DistilledSet(x, soft, None, dm.classes, dm.preprocessing.state(), method=hp.name, ipc=ipc,
                          meta={"teacher_ckpt": str(teachers[0]["path"]), "recover_iterations": int(rec["iterations"]),
                                "hard_labels": y.clone(),
                                "labels": "labels: teacher logits on the whole images; meta['hard_labels']: the "
                                          "class each image was recovered as (labels.argmax(1) is the teacher's "
                                          "prediction, which can differ)" +
                                          ("; fkd_labels.pt: per-epoch crops" if int(rl["epochs"]) > 0 else "")})
    return {"result": result, "teacher_ckpt": str(teachers[0]["path"]), "timings": timings, "metrics": metrics}
