"""Statistics to match: BatchNorm hooks (SRe2L Eq. 6), convolution statistics and per-class logits of
the real data (G-VBSM), the backbones prepared for recovery and the BN-loss measurements."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lightning_dd.io import load_cache, require_keys, save_cache
from lightning_dd.methods.experts import experts_key
from lightning_dd.methods.statistics_matching.config import RecoverConfig
from lightning_dd.methods.statistics_matching.crops import jitter_crop_flip


def device_of(net: nn.Module) -> torch.device:
    """The device of ``net``'s first parameter."""
    return next(net.parameters()).device


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over ``(N, H, W)`` (what BatchNorm normalizes a training
    batch with).

    Shapes:
        x: ``(N, C, H, W)``; returns ``(C,)``, ``(C,)``.
    """
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return mean, var


class StatsHooks:
    """Forward hooks that record per-layer batch statistics of a network.

    ``kind="bn"``: the *input* of every ``BatchNorm2d`` (SRe2L Eq. 6), targets = the layer's running
    mean/var. ``kind="conv"``: the *output* of every ``Conv2d`` (G-VBSM's convolution statistics),
    targets given (see :func:`conv_statistics`).

    After a forward pass, ``stats`` is a list of ``(mean (C_l,), var (C_l,))``, one per layer in
    module-registration order (``net.modules()``; usually, not necessarily, the order the forward
    pass runs them; "the first layer" of ``first_multiplier`` is the first registered). Use as a
    context manager or call :meth:`remove`.

    Raises:
        ValueError: ``kind`` not ``bn``/``conv``, or the network has no such layer.
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
        """BN running ``(mean (C_l,), var (C_l,))`` per layer.

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
        ``w_l = 1`` otherwise (SRe2L Eq. 6), a scalar tensor of the last forward pass; targets default
        to the BN running statistics and must be given for ``kind="conv"`` (see :meth:`targets`)."""
        targets = self.targets() if targets is None else targets
        total = 0.0
        for i, ((m, v), (tm, tv)) in enumerate(zip(self.stats, targets)):
            w = first_multiplier if i == 0 else 1.0
            total = total + w * (torch.norm(m - tm.to(m), 2) + torch.norm(v - tv.to(v), 2))
        return total

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
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
    mode) over all of ``images``, accumulated in float64 batch by batch (G-VBSM's convolution
    statistics of the real data). Runs on the network's device batch by batch (``images`` may stay
    on the CPU); returns CPU tensors.

    Shapes:
        images: ``(N, C, H, W)``. Returns one float32 ``(mean (C_l,), var (C_l,))`` pair per conv
        layer in module-registration order (that of :class:`StatsHooks`); with ``return_logits``
        also the network's outputs ``(N, K)`` from the same pass: ``(pairs, logits)``.
    """
    net.eval()
    dev = device_of(net)
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


def real_statistics(teacher: dict, dm) -> tuple[list, torch.Tensor]:
    """G-VBSM's statistics of the real training set for one teacher (``{"net", "path"}``, see
    :func:`~.squeeze.squeeze`): the convolution statistics (:func:`conv_statistics`) and the
    per-class mean logits. Cached beside the teacher file (``real_stats-<key>.pt``, keyed by the
    data's identity and the teacher file's size and mtime), so a run reuses them and a changed
    teacher or data set never does; written atomically with a checksum, a corrupted entry is
    recomputed (:func:`lightning_dd.io.load_cache`).

    Shapes:
        returns ``([(mean (C_l,), var (C_l,)), ...], class_logits (K, K))``.
    """
    path = Path(teacher["path"])
    st = path.stat()
    key = experts_key({"data": dm.identity(), "teacher": str(path.resolve()), "size": st.st_size,
                       "mtime": st.st_mtime_ns})
    cache = path.parent / f"real_stats-{key}.pt"
    d = load_cache(cache, "cached real-data statistics", require_keys("conv", "class_logits"))
    if d is not None:  # None: missing, or unusable (reported and deleted): computed again
        return d["conv"], d["class_logits"]
    net = teacher["net"]
    conv, logits = conv_statistics(net, dm.train_images, return_logits=True)  # one pass over the data
    class_logits = torch.zeros(dm.num_classes, logits.shape[1]).index_add_(0, dm.train_labels, logits)
    class_logits /= torch.bincount(dm.train_labels, minlength=dm.num_classes).clamp(min=1).unsqueeze(1)
    save_cache({"conv": conv, "class_logits": class_logits}, cache)
    return conv, class_logits


class Backbone:
    """A frozen teacher prepared for recovery: the network (eval mode, no parameter gradients), its
    BN hooks, and optionally conv hooks with precomputed targets and per-class mean logits
    ``(K, K)`` (G-VBSM). The hooks run on every forward of the network until :meth:`remove`.

    Raises:
        ValueError: the network has no BatchNorm layer (:class:`StatsHooks`).
    """

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
        """Move the network and the G-VBSM targets to ``device``; returns ``self``."""
        self.net.to(device)
        if self.conv_targets is not None:
            self.conv_targets = [(m.to(device), v.to(device)) for m, v in self.conv_targets]
        if self.class_logits is not None:
            self.class_logits = self.class_logits.to(device)
        return self


@torch.no_grad()
def backbone_weights(backbones: list[Backbone], images: torch.Tensor, hp: RecoverConfig
                     ) -> tuple[list[float], list[float]]:
    """Per-backbone weights of the BN and conv losses in recovery.

    ``hp.backbone_norm``: ``none`` (every weight 1: each sampled backbone's loss enters the mean
    over the sampled backbones as it is -- G-VBSM's unweighted form; it sums where this averages,
    the same under Adam, see the package doc) or ``start``: backbone ``i``'s BN (conv) loss is
    weighted ``L_0(x0) / L_i(x0)``, its value on the batch's initial ``images`` ``(B, C, H, W)``
    relative to the first backbone's, so that every backbone starts at the first one's scale. The
    raw sums differ by orders of magnitude between architectures (e.g. 56 BN layers in
    ShuffleNetV2 vs 3 in ConvNet-3), and without it the deepest backbone dominates the gradient.
    Computed from the initial images only, so a resumed fit gets the same weights.

    Returns:
        ``(bn_weights, conv_weights)``, one float per backbone each.
    """
    n = len(backbones)
    if hp.backbone_norm == "none" or n <= 1:
        return [1.0] * n, [1.0] * n
    fm = hp.first_bn_multiplier
    bn, conv = [], []
    for b in backbones:
        dev = device_of(b.net)
        b.net(images.to(dev))
        bn.append(float(b.bn.loss(first_multiplier=fm)))
        conv.append(float(b.conv.loss([(m.to(dev), v.to(dev)) for m, v in b.conv_targets], fm))
                    if b.conv is not None else 1.0)
    return [bn[0] / max(v, 1e-12) for v in bn], [conv[0] / max(v, 1e-12) for v in conv]


@torch.no_grad()
def bn_loss_of(backbone: Backbone, images: torch.Tensor, first_multiplier: float) -> float:
    """The BN-statistics loss (SRe2L Eq. 6) of un-augmented ``images`` ``(B, C, H, W)`` on one backbone."""
    backbone.net(images.to(device_of(backbone.net)))
    return float(backbone.bn.loss(first_multiplier=first_multiplier))


@torch.no_grad()
def bn_loss_views(backbone: Backbone, images: torch.Tensor, hp: RecoverConfig, views: int = 8,
                  seed: int = 12345) -> float:
    """The BN-statistics loss (SRe2L Eq. 6) averaged over ``views`` fixed augmented views of
    ``images`` ``(B, C, H, W)`` (:func:`~.crops.jitter_crop_flip` with ``hp.jitter``, ``hp.flip``
    and the full ``hp.crop_scale`` range), drawn from ``seed`` so that the same views measure the
    images before and after recovery: the quantity recovery minimizes, without its step-to-step
    sampling noise. The flips are drawn either way (``draw_unused_flips``), so the crops do not
    depend on ``hp.flip``."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(views):
        x = jitter_crop_flip(images, g, jitter=hp.jitter, scale=hp.crop_scale, flip=hp.flip,
                             draw_unused_flips=True)
        total += bn_loss_of(backbone, x, hp.first_bn_multiplier)
    return total / views
