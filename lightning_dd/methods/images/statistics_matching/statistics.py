"""Statistics to match: BatchNorm hooks (SRe2L Eq. 6), convolution statistics and per-class logits of
the real data (G-VBSM), the backbones prepared for recovery and the BN-loss measurements."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.io import cache_key, load_cache, require_keys, save_cache
from lightning_dd.methods.images.statistics_matching.config import RecoverConfig
from lightning_dd.methods.images.statistics_matching.crops import jitter_crop_flip


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


def patch_stats(x: torch.Tensor, patch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """G-VBSM's patch statistics (``ConvFeatureHook`` in its ``utils.py``): ``x`` resized
    (bilinear, ``align_corners=False``) to the next multiples of ``patch`` in height and width,
    cut into ``patch x patch`` pixel cells; per cell position the mean and biased variance over
    the batch, the channels and the cell's pixels.

    Shapes:
        x: ``(N, C, H, W)``; returns ``(P,)``, ``(P,)`` with ``P = ceil(H / patch) * ceil(W / patch)``.
    """
    n, c, h, w = x.shape
    h4, w4 = -(-h // patch) * patch, -(-w // patch) * patch
    if (h4, w4) != (h, w):
        x = F.interpolate(x, [h4, w4], mode="bilinear", align_corners=False)
    cells = x.reshape(n, c, h4 // patch, patch, w4 // patch, patch).permute(2, 4, 0, 1, 3, 5)
    var, mean = torch.var_mean(cells.reshape((h4 // patch) * (w4 // patch), -1), dim=1, unbiased=False)
    return mean, var


def conv_input_stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """G-VBSM's statistics of a convolution's input ``x`` ``(N, C, H, W)``: per-channel mean and
    biased variance ``(C,)`` (:func:`channel_stats`) and the patch mean and variance ``(P,)``
    (:func:`patch_stats`), as the 4-tuple ``(mean, var, patch_mean, patch_var)``."""
    return (*channel_stats(x), *patch_stats(x))


def eigenvalue_loss(x: torch.Tensor, labels: torch.Tensor, tau: float = 4.0, size: int = 32) -> torch.Tensor:
    """G-VBSM's eigenvalue ("nuclear norm", ``--nuc-norm``) term of its CIFAR recovery
    (``data_synthesis_with_svd_with_db_with_all_statistic.py``): the view ``x`` average-pooled to
    ``size x size`` and flattened; for every class ``c`` in ``labels`` the eigenvalues ``l`` of the
    Gram matrix ``X_c X_c^T`` of its images, and ``KL(softmax(l / tau) || softmax(l))`` with the
    sharpened target detached, summed over the classes (``nn.KLDivLoss(reduction="sum")``). The
    eigenvalues come from ``torch.linalg.eigvalsh`` (the Gram matrix is symmetric; the reference
    takes the real part of ``eigvals``, the same values; the KL does not depend on their order).
    One eigen-decomposition per class present (a loop over classes, not samples).

    Shapes:
        x: ``(B, C, H, W)``; labels: ``(B,)`` int64; returns a scalar.
    """
    flat = F.adaptive_avg_pool2d(x, (size, size)).reshape(len(x), -1)
    total = x.new_zeros(())
    for c in torch.unique(labels).tolist():
        xc = flat[labels == c]
        lam = torch.linalg.eigvalsh(xc @ xc.t()).float()
        target = (lam / tau).softmax(-1).detach()
        total = total + F.kl_div(lam.log_softmax(-1), target, reduction="sum")
    return total


class StatsHooks:
    """Forward hooks that record per-layer batch statistics of a network.

    ``kind="bn"``: the *input* of every ``BatchNorm2d`` (SRe2L Eq. 6), targets = the layer's running
    mean/var. ``kind="conv"``: the *input* of every ``Conv2d`` (G-VBSM's ``ConvFeatureHook``):
    channel and patch statistics (:func:`conv_input_stats`), targets given (see
    :func:`conv_statistics`).

    After a forward pass, ``stats`` is a list of ``(mean (C_l,), var (C_l,))`` (BN) or
    ``(mean (C_l,), var (C_l,), patch_mean (P_l,), patch_var (P_l,))`` (conv), one per layer in
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
        self.ema: list[list[torch.Tensor] | None] = [None] * len(self.layers)  # see loss(momentum=...)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            self.stats[i] = channel_stats(inputs[0]) if self.kind == "bn" else conv_input_stats(inputs[0])
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

    def loss(self, targets: list[tuple[torch.Tensor, ...]] | None = None,
             first_multiplier: float = 1.0, momentum: float = 0.0, keep: list[bool] | None = None) -> torch.Tensor:
        """``sum_l w_l sum_s ||s_l - s*_l||_2`` over the recorded statistics ``s`` of each layer (BN:
        mean and variance, SRe2L Eq. 6 / ``BNFeatureHook``; conv: also the patch mean and variance,
        G-VBSM's ``ConvFeatureHook``) with ``w_0 = first_multiplier``, ``w_l = 1`` otherwise, a
        scalar tensor of the last forward pass; targets default to the BN running statistics and
        must be given for ``kind="conv"`` (see :meth:`targets`).

        ``momentum > 0`` (G-VBSM's ``--training-momentum``, alpha): each statistic is replaced by its
        exponential moving average over the calls, ``e <- momentum e + (1 - momentum) s`` (detached;
        ``e`` starts at 0, as G-VBSM's hooks start from ``0.``), with the gradient of the current
        ``s``: ``e + s - s.detach()``. The averages (``ema``) advance on every call with
        ``momentum > 0``; :meth:`reset_ema` starts them again.

        ``keep``: one bool per layer; a layer with ``False`` contributes 0 and its average does not
        advance (G-VBSM's conv ``--drop-rate``: its hook returns 0 before it updates)."""
        targets = self.targets() if targets is None else targets
        total = 0.0
        for i, (stats, tgt) in enumerate(zip(self.stats, targets)):
            if keep is not None and not keep[i]:
                continue
            w = first_multiplier if i == 0 else 1.0
            if momentum > 0:
                prev = self.ema[i] or [torch.zeros_like(a) for a in stats]
                self.ema[i] = [momentum * e + (1 - momentum) * a.detach() for e, a in zip(prev, stats)]
                stats = [e + a - a.detach() for e, a in zip(self.ema[i], stats)]
            total = total + w * sum(torch.norm(a - t.to(a), 2) for a, t in zip(stats, tgt))
        return total

    def reset_ema(self, ema: list | None = None) -> None:
        """Start the moving averages of :meth:`loss` afresh (``ema=None``) or from a saved ``ema``."""
        self.ema = [None] * len(self.layers) if ema is None else [None if e is None else list(e) for e in ema]

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
def conv_statistics(net: nn.Module, images: torch.Tensor, batch_size: int = 64,
                    return_logits: bool = False):
    """G-VBSM's convolution statistics of the real data (``ConvFeatureHook.pre_hook_fn``): the
    statistics of every ``Conv2d``'s input (:func:`conv_input_stats`: channel mean/variance, patch
    mean/variance) on each batch of ``batch_size`` images (G-VBSM's loader: 64), averaged over the
    batches weighted by their sizes (``sum_b stat_b * |b| / N``; a per-batch variance, not the
    variance over all images), ``net`` in eval mode, accumulated in float64. Runs on the network's
    device batch by batch (``images`` may stay on the CPU); returns CPU float32 tensors.

    Shapes:
        images: ``(N, C, H, W)``. Returns one ``(mean (C_l,), var (C_l,), patch_mean (P_l,),
        patch_var (P_l,))`` per conv layer in module-registration order (that of
        :class:`StatsHooks`); with ``return_logits`` also the network's outputs ``(N, K)`` from the
        same pass: ``(stats, logits)``.
    """
    net.eval()
    dev = device_of(net)
    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    sums: list = [None] * len(layers)

    def hook(i):
        def fn(module, inputs, out):
            x = inputs[0]
            s = [t.double() * x.shape[0] for t in conv_input_stats(x)]
            sums[i] = s if sums[i] is None else [a + b for a, b in zip(sums[i], s)]
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    outs = []
    try:
        for part in images.split(batch_size):
            outs.append(net(part.to(dev)).cpu())
    finally:
        for h in handles:
            h.remove()
    n = len(images)
    out = [tuple((t / n).float().cpu() for t in s) for s in sums]
    return (out, torch.cat(outs)) if return_logits else out


def real_statistics(teacher: dict, dm) -> tuple[list, torch.Tensor]:
    """G-VBSM's statistics of the real training set for one teacher (``{"net", "path"}``, see
    :func:`~.squeeze.squeeze`): the convolution statistics (:func:`conv_statistics`) and the
    per-class mean logits. Cached beside the teacher file (``real_stats-<key>.pt``, keyed by the
    data's identity and the teacher file's size and mtime), so a run reuses them and a changed
    teacher or data set never does; written atomically with a checksum, a corrupted entry is
    recomputed (:func:`lightning_dd.io.load_cache`).

    Shapes:
        returns ``([(mean (C_l,), var (C_l,), patch_mean (P_l,), patch_var (P_l,)), ...],
        class_logits (K, K))``.
    """
    path = Path(teacher["path"])
    st = path.stat()
    key = cache_key({"data": dm.identity(), "teacher": str(path.resolve()), "size": st.st_size,
                       "mtime": st.st_mtime_ns, "conv_stats": "input+patch/batch64"})
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
    BN hooks, and optionally conv hooks with precomputed targets (:func:`conv_statistics`) and
    per-class mean logits ``(K, K)`` (G-VBSM). The hooks run on every forward of the network until
    :meth:`remove`.

    Raises:
        ValueError: the network has no BatchNorm layer (:class:`StatsHooks`).
    """

    def __init__(self, net: nn.Module, conv_targets=None, class_logits: torch.Tensor | None = None):
        self.net = net.eval().requires_grad_(False)
        self.bn = StatsHooks(self.net, "bn")
        self.conv = StatsHooks(self.net, "conv") if conv_targets is not None else None
        self.conv_targets, self.class_logits = conv_targets, class_logits
        # G-VBSM applies its first-layer multiplier once, to the first of its BN and conv hooks in
        # module order: a conv layer (the stem) when conv statistics are matched and it comes first
        first = next(m for m in self.net.modules() if isinstance(m, (nn.BatchNorm2d, nn.Conv2d)))
        self.first_is_conv = self.conv is not None and isinstance(first, nn.Conv2d)

    def stat_losses(self, first_multiplier: float, momentum: float = 0.0, conv_keep: list[bool] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The BN loss and (with conv targets) the conv loss of the last forward pass
        (:meth:`StatsHooks.loss`, ``momentum``: G-VBSM's moving averages, ``conv_keep``: the conv
        layers not dropped this step), ``first_multiplier`` on
        the first hooked layer of the network (its first BN layer, or its first conv layer when that
        comes first and conv statistics are matched: G-VBSM's one ``rescale`` list over both
        kinds); ``None`` for the conv loss without conv targets."""
        conv_first = first_multiplier if self.first_is_conv else 1.0
        bn = self.bn.loss(first_multiplier=1.0 if self.first_is_conv else first_multiplier, momentum=momentum)
        conv = self.conv.loss(self.conv_targets, conv_first, momentum, conv_keep) if self.conv is not None else None
        return bn, conv

    def ema_state(self) -> list:
        """The moving averages of the BN and conv hooks (``[bn.ema, conv.ema]``; see :meth:`StatsHooks.loss`)."""
        return [self.bn.ema, self.conv.ema if self.conv is not None else None]

    def reset_ema(self, state: list | None = None) -> None:
        """Start the moving averages afresh (``None``) or from :meth:`ema_state`'s ``state``."""
        self.bn.reset_ema(None if state is None else state[0])
        if self.conv is not None:
            self.conv.reset_ema(None if state is None else state[1])

    def remove(self) -> None:
        """Remove the BN (and conv) forward hooks from the network (idempotent)."""
        self.bn.remove()
        if self.conv is not None:
            self.conv.remove()

    def to(self, device):
        """Move the network and the G-VBSM targets to ``device``; returns ``self``."""
        self.net.to(device)
        if self.conv_targets is not None:
            self.conv_targets = [tuple(t.to(device) for t in ts) for ts in self.conv_targets]
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
    bn, conv = [], []
    for b in backbones:
        b.to(device_of(b.net))
        b.net(images.to(device_of(b.net)))
        lb, lc = b.stat_losses(hp.first_bn_multiplier)
        bn.append(float(lb))
        conv.append(float(lc) if lc is not None else 1.0)
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
    ``images`` ``(B, C, H, W)`` (:func:`~.crops.jitter_crop_flip` with ``hp.jitter``, ``hp.flip``,
    ``hp.crop_per_image``, ``hp.crop_pad`` and the full ``hp.crop_scale`` range), drawn from ``seed`` so that the same views measure the
    images before and after recovery: the quantity recovery minimizes, without its step-to-step
    sampling noise. With per-image crops the flips are drawn either way (``draw_unused_flips``), so
    the crops do not depend on ``hp.flip``; per-batch views draw one seed each either way."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(views):
        x = jitter_crop_flip(images, g, jitter=hp.jitter, scale=hp.crop_scale, flip=hp.flip,
                             per_image=hp.crop_per_image, pad=hp.crop_pad, draw_unused_flips=True)
        total += bn_loss_of(backbone, x, hp.first_bn_multiplier)
    return total / views
